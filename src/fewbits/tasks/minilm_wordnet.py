"""minilm-wordnet: all-MiniLM-L6-v2 retrieving WordNet definitions from example sentences.

Each of 1,000 noun synsets with an example sentence gives a query (the example) and a document
(its definition); Recall@1 is the share of queries whose nearest document is their own. Beside
it: cosine of every embedding to the fp32 model's, and the overlap of each query's top-10
documents with fp32's. Calibration uses definitions of other synsets; training (distillation
only: there are no labels) the next 4,096 definitions of synsets without examples.
"""
from __future__ import annotations

import torch

from .base import Task
from .data.wordnet import read_glosses
from .models.minilm import embed, load_minilm, pooled_embedding

BATCH = 32


def _pairs_and_calibration(n_eval: int, n_cal: int, n_train: int = 0):
    with_examples, others = [], []
    for definition, examples in read_glosses("noun"):
        (with_examples if examples else others).append((definition, examples))
    pairs = [(d, ex[0]) for d, ex in with_examples[:n_eval]]
    return pairs, [d for d, _ in others[:n_cal]], [d for d, _ in others[n_cal:n_cal + n_train]]



def _embed_all(model, tokenizer, texts):
    return torch.cat([embed(model, tokenizer, texts[i:i + BATCH]) for i in range(0, len(texts), BATCH)])


def minilm_task(small: bool = False) -> Task:
    model, tokenizer = load_minilm()
    pairs, cal_texts, train_texts = _pairs_and_calibration(200 if small else 1000, 64 if small else 256,
                                                           256 if small else 4096)
    docs, queries = [d for d, _ in pairs], [q for _, q in pairs]

    def batches(texts):
        return [dict(tokenizer(texts[i:i + BATCH], padding=True, truncation=True, max_length=128,
                               return_tensors="pt")) for i in range(0, len(texts), BATCH)]

    calibration = batches(cal_texts)
    reference = {}

    def evaluate(m) -> dict:
        d, q = _embed_all(m, tokenizer, docs), _embed_all(m, tokenizer, queries)
        if not reference:
            ref_d, ref_q = (d, q) if m is model else (_embed_all(model, tokenizer, docs), _embed_all(model, tokenizer, queries))
            reference.update(d=ref_d, q=ref_q, top=(ref_q @ ref_d.T).topk(10, dim=1).indices)
        sims = q @ d.T
        recall = (sims.argmax(1) == torch.arange(len(q))).double().mean().item() * 100
        cos = torch.cat([(d * reference["d"]).sum(1), (q * reference["q"]).sum(1)])
        top = sims.topk(10, dim=1).indices
        overlap = torch.tensor([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(top, reference["top"])])
        return {"recall@1": recall, "cosine_mean": cos.mean().item(), "cosine_min": cos.min().item(),
                "top10_overlap": overlap.double().mean().item()}

    return Task("minilm-wordnet", "all-MiniLM-L6-v2: WordNet example sentence → definition retrieval among "
                f"{len(pairs)}", model, calibration, "recall@1", evaluate,
                train_data=lambda: [(b, None) for b in batches(train_texts)], train_forward=pooled_embedding)
