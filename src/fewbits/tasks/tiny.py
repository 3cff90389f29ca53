"""The tiny tasks for tests: sklearn's 8×8 digits and MNIST-1D, each trained here in seconds."""
from __future__ import annotations

import functools

import torch
from torch import nn

from .base import Task, classification_task, fit


@functools.lru_cache(maxsize=None)
def _digits_model_and_data():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the digits task needs scikit-learn: pip install scikit-learn") from None
    data = load_digits()  # bundled with scikit-learn, no download
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=g)
    train, test = order[:1300], order[1300:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(32 * 16, 10))
    fit(model, x[train], y[train], epochs=15)
    return model, x[train][:256], x[test], y[test], (x[train], y[train])


def digits_task(small: bool = False) -> Task:
    model, x_cal, x_test, y_test, train = _digits_model_and_data()
    return classification_task("digits", "tiny CNN on sklearn's 1,797 8×8 digits (trained on load)",
                               _fresh(model), x_cal, x_test, y_test, train=lambda: train)


@functools.lru_cache(maxsize=None)
def _mnist1d_model_and_data():
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise ImportError("the mnist1d task needs the mnist1d package: pip install mnist1d") from None
    data = make_dataset(get_dataset_args())  # generated locally: get_dataset would download
    x = torch.tensor(data["x"], dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data["y"], dtype=torch.int64)
    x_test = torch.tensor(data["x_test"], dtype=torch.float32).unsqueeze(1)
    y_test = torch.tensor(data["y_test"], dtype=torch.int64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 32, 5, padding=2), nn.ReLU(), nn.Conv1d(32, 32, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Conv1d(32, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(32 * 10, 10))
    fit(model, x, y, epochs=30)
    return model, x[:256], x_test, y_test, (x, y)


def mnist1d_task(small: bool = False) -> Task:
    model, x_cal, x_test, y_test, train = _mnist1d_model_and_data()
    return classification_task("mnist1d", "1-D CNN on MNIST-1D (generated and trained on load)",
                               _fresh(model), x_cal, x_test, y_test, train=lambda: train)


def _fresh(model: nn.Module) -> nn.Module:
    """A copy, so a caller's changes never reach the cached trained model."""
    import copy

    return copy.deepcopy(model).eval()
