"""The Fashion-MNIST models: fashion-cnn (three conv-BN-ReLU blocks and two linear layers, ~98k
parameters) and fashion-mlp (LeNet-300-100, the fully connected net of the Deep Compression paper,
~266k parameters)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "fashion_cnn.pt"
MLP_CHECKPOINT = CHECKPOINT.with_name("fashion_mlp.pt")
CHECKPOINT_SCHEMA = 1


def fashion_cnn() -> nn.Sequential:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 64), nn.Flatten(),
                         nn.Linear(64 * 3 * 3, 128), nn.ReLU(), nn.Linear(128, 10))


def fashion_mlp() -> nn.Sequential:
    """LeNet-300-100: 784 → 300 → 100 → 10 with ReLUs."""
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, 10))


MODELS = {"cnn": (fashion_cnn, CHECKPOINT), "mlp": (fashion_mlp, MLP_CHECKPOINT)}


def load_fashion_mlp() -> nn.Sequential:
    return load_fashion_cnn(MLP_CHECKPOINT, "mlp")


def load_fashion_cnn(path: Path = CHECKPOINT, kind: str = "cnn") -> nn.Sequential:
    """The trained model from the committed checkpoint (``make train`` rebuilds it)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run 'make train' to train the fashion-{kind} checkpoint")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("schema_version") != CHECKPOINT_SCHEMA:
        raise ValueError(f"{path}: not a fewbits fashion-{kind} checkpoint of schema {CHECKPOINT_SCHEMA}")
    model = MODELS[kind][0]()
    model.load_state_dict(data["state_dict"], strict=True)
    return model.eval()
