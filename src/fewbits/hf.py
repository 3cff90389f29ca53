"""A Hugging Face model directory as a model fewbits quantizes: offline, one output tensor.

``load_hf_model(dir)`` reads ``config.json`` and the weights from a local directory (nothing is
downloaded: ``local_files_only``) with the Auto class the config's architecture names — causal
LM, sequence classification, masked LM, or the bare model — and wraps it in :class:`HFOutput`,
which returns the logits (or the last hidden state) as one tensor, the form calibration,
evaluation and the ONNX export take. Inputs are token ids ``[batch, length]`` (int64), given
positionally, or a dict of the model's keyword inputs (``input_ids``, ``attention_mask``, …).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# config.architectures suffix → the transformers Auto class that builds it
_AUTO = (("ForCausalLM", "AutoModelForCausalLM"), ("LMHeadModel", "AutoModelForCausalLM"),
         ("ForSequenceClassification", "AutoModelForSequenceClassification"),
         ("ForMaskedLM", "AutoModelForMaskedLM"), ("ForTokenClassification", "AutoModelForTokenClassification"))


class HFOutput(nn.Module):
    """A Hugging Face model returning one tensor: ``logits`` when it has them, else the last
    hidden state. ``use_cache`` is off (no key/value cache in the outputs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True,
                         **kwargs)
        logits = getattr(out, "logits", None)
        return logits if logits is not None else out.last_hidden_state


def auto_class_name(architectures) -> str:
    """The Auto class for a config's ``architectures`` list (the bare model when none matches)."""
    for arch in architectures or ():
        for suffix, auto in _AUTO:
            if arch.endswith(suffix):
                return auto
    return "AutoModel"


def load_hf_model(directory, option: str = "--hf-model") -> nn.Module:
    """The model saved in ``directory`` (``save_pretrained``'s layout: config.json and
    safetensors / bin weights), in eval mode and float32, wrapped in :class:`HFOutput`."""
    path = Path(directory)
    if not (path / "config.json").is_file():
        raise ValueError(f"{option}: {path} is not a Hugging Face model directory (no config.json)")
    try:
        import transformers
    except ImportError:
        raise ValueError(f"{option}: the transformers package is not installed (pip install transformers)") from None
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        auto = getattr(transformers, auto_class_name(getattr(config, "architectures", None)))
        model = auto.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{option}: {path} could not be loaded ({type(err).__name__}: {first[:200]})") from None
    return HFOutput(model.eval()).eval()


def tokenized_batches(directory, text_file, length: int, batch_size: int, option: str = "--calib-text") -> list:
    """Calibration batches from a text file with the directory's own tokenizer: the file's tokens
    in windows of ``length``, ``batch_size`` windows per batch (token ids ``[b, length]``)."""
    import transformers

    text_path = Path(text_file)
    if not text_path.is_file():
        raise ValueError(f"{option}: file {text_path} not found")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"{option}: {directory} has no tokenizer ({type(err).__name__})") from None
    ids = torch.tensor(tokenizer(text_path.read_text())["input_ids"], dtype=torch.int64)
    windows = ids[: len(ids) // length * length].reshape(-1, length)
    if not len(windows):
        raise ValueError(f"{option}: {text_path} has {len(ids)} tokens, fewer than one window of {length}")
    return list(windows.split(batch_size))


__all__ = ["HFOutput", "load_hf_model", "auto_class_name", "tokenized_batches"]
