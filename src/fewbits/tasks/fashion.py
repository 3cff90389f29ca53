"""fashion-cnn: the project's small CNN on Fashion-MNIST, top-1 on the 10k test images."""
from __future__ import annotations

from .base import Task, classification_task
from .data.fashion_mnist import load_fashion_mnist, normalise
from .models.fashion_cnn import load_fashion_cnn


def fashion_task(small: bool = False) -> Task:
    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    if small:
        x_test, y_test = x_test[:2000], y_test[:2000]
    return classification_task(
        "fashion-cnn", "3×conv-BN-ReLU + 2 linear (98k parameters) on Fashion-MNIST, committed checkpoint",
        load_fashion_cnn(), normalise(x_train[-512:]), normalise(x_test), y_test,
        train=lambda: (normalise(x_train), y_train))
