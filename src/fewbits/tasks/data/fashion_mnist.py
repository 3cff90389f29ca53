"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (IDX files, gzip)."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
_SIZES = {"train": 60_000, "test": 10_000}
_FILES = {"train": "train", "test": "t10k"}
MEAN, STD = 0.2860, 0.3530  # training-set pixel statistics, for normalisation


def _read_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: install Debian's 'dataset-fashion-mnist' "
                                "(apt-get install dataset-fashion-mnist)")
    raw = gzip.decompress(path.read_bytes())
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: not an IDX file of the expected kind (magic {found:#x}, expected {magic:#x})")
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, file holds {data.size} values (truncated?)")
    return data.reshape(shape)


def load_fashion_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 [N, 28, 28], labels int64 [N])`` for ``split`` in train / test."""
    if split not in _SIZES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    stem = _FILES[split]
    images = _read_idx(FASHION_DIR / f"{stem}-images-idx3-ubyte.gz", 0x803, 3)
    labels = _read_idx(FASHION_DIR / f"{stem}-labels-idx1-ubyte.gz", 0x801, 1)
    if images.shape != (_SIZES[split], 28, 28) or labels.shape != (_SIZES[split],) or labels.max() > 9:
        raise ValueError(f"Fashion-MNIST {split}: unexpected shapes {images.shape}, {labels.shape}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] → float [N, 1, 28, 28], standardised."""
    return ((images.float() / 255.0 - MEAN) / STD).unsqueeze(1)
