"""fashion-cnn and fashion-mlp: the project's small CNN and LeNet-300-100 on Fashion-MNIST, top-1
on the 10k test images."""
from __future__ import annotations

from .base import Task, classification_task
from .data.fashion_mnist import load_fashion_mnist, normalise
from .models.fashion_cnn import load_fashion_cnn, load_fashion_mlp


def _fashion(name: str, description: str, model, small: bool) -> Task:
    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    if small:
        x_test, y_test = x_test[:2000], y_test[:2000]
    return classification_task(name, description, model, normalise(x_train[-512:]), normalise(x_test), y_test,
                               train=lambda: (normalise(x_train), y_train))


def fashion_task(small: bool = False) -> Task:
    return _fashion("fashion-cnn", "3×conv-BN-ReLU + 2 linear (98k parameters) on Fashion-MNIST, committed checkpoint",
                    load_fashion_cnn(), small)


def fashion_mlp_task(small: bool = False) -> Task:
    return _fashion("fashion-mlp", "LeNet-300-100 (266k parameters) on Fashion-MNIST, committed checkpoint",
                    load_fashion_mlp(), small)
