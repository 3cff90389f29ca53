"""The fashion-cnn task's model: three conv-BN-ReLU blocks and two linear layers (~98k parameters)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "fashion_cnn.pt"
CHECKPOINT_SCHEMA = 1


def fashion_cnn() -> nn.Sequential:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 64), nn.Flatten(),
                         nn.Linear(64 * 3 * 3, 128), nn.ReLU(), nn.Linear(128, 10))


def load_fashion_cnn(path: Path = CHECKPOINT) -> nn.Sequential:
    """The trained model from the committed checkpoint (``make train`` rebuilds it)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run 'make train' to train the fashion-cnn checkpoint")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("schema_version") != CHECKPOINT_SCHEMA:
        raise ValueError(f"{path}: not a fewbits fashion-cnn checkpoint of schema {CHECKPOINT_SCHEMA}")
    model = fashion_cnn()
    model.load_state_dict(data["state_dict"], strict=True)
    return model.eval()
