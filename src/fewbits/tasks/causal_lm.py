"""A causal language model as a task: perplexity on held-out text, agreement with fp32.

``causal_lm_task`` takes any model mapping token ids ``[batch, length]`` to logits
``[batch, length, vocab]`` (an fp32 model, its simulated quantization, an ONNX Runtime session)
and token windows; the metrics, lower perplexity being better:

- ``perplexity``: exp of the mean next-token cross-entropy over the first corpus's windows, each
  window on its own (its first token predicts nothing); ``perplexity_<name>`` for the others;
- ``top1_agreement``: percent of those positions whose most likely next token is fp32's;
- ``generation_agreement``: greedy continuations of fixed prompts, the percent of fp32's
  continuation each reproduces before it first differs, averaged over prompts;
  ``generation_exact``: percent of prompts continued exactly as fp32 does.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import Task


def windows(ids: torch.Tensor, length: int, count: int, what: str) -> torch.Tensor:
    """``count`` consecutive windows of ``length`` tokens from the 1-d ``ids``, ``[count, length]``."""
    if ids.numel() < length * count:
        raise ValueError(f"{what}: {ids.numel()} tokens, fewer than {count} windows of {length}")
    return ids[: length * count].reshape(count, length).to(torch.int64)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(model(ids)).float()


@torch.no_grad()
def next_token_scores(model: nn.Module, windows_: torch.Tensor, batch: int = 4) -> tuple[float, int, torch.Tensor]:
    """``(summed negative log-likelihood, positions scored, argmax [n, length-1])``."""
    nll, count, top = 0.0, 0, []
    for chunk in windows_.split(batch):
        logits = _logits(model, chunk)[:, :-1]
        target = chunk[:, 1:]
        nll += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 reduction="sum"))
        count += target.numel()
        top.append(logits.argmax(-1))
    return nll, count, torch.cat(top)


def perplexity(model: nn.Module, windows_: torch.Tensor, batch: int = 4) -> float:
    nll, count, _ = next_token_scores(model, windows_, batch)
    return math.exp(nll / count)


@torch.no_grad()
def greedy(model: nn.Module, prompts: list, new_tokens: int) -> list:
    """The ``new_tokens`` most likely next tokens after each 1-d prompt, one whole forward per
    step (the model holds no cache: any logits model works); prompts of one length share a batch."""
    out: list = [None] * len(prompts)
    by_length: dict = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(p.numel(), []).append(i)
    for length, members in by_length.items():
        ids = torch.stack([prompts[i].to(torch.int64) for i in members])
        for _ in range(new_tokens):
            ids = torch.cat([ids, _logits(model, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        for row, i in enumerate(members):
            out[i] = ids[row, length:]
    return out


def _agreement(tokens: torch.Tensor, reference: torch.Tensor) -> float:
    differ = (tokens != reference).nonzero()
    return 1.0 if not len(differ) else int(differ[0]) / len(reference)


class CausalLMScores:
    """A causal LM task's ``evaluate``: every metric of a model (module docstring); the fp32
    reference (its next tokens and continuations) is computed once, on the first call.
    ``corpora`` and ``prompts`` are what it scores, for callers that run the same text elsewhere."""

    def __init__(self, model: nn.Module, corpora: dict, prompts: list, new_tokens: int, batch: int) -> None:
        if not corpora:
            raise ValueError("a causal LM task needs at least one evaluation corpus")
        self.model, self.corpora, self.prompts = model, corpora, prompts
        self.new_tokens, self.batch = new_tokens, batch
        self.first = next(iter(corpora))
        self.reference: dict = {}

    def __call__(self, m) -> dict:
        scores, tops = {}, None
        for corpus, wins in self.corpora.items():
            nll, count, top = next_token_scores(m, wins, self.batch)
            scores["perplexity" if corpus == self.first else f"perplexity_{corpus}"] = math.exp(nll / count)
            tops = top if corpus == self.first else tops
        continuations = greedy(m, self.prompts, self.new_tokens)
        if not self.reference:
            if m is self.model:
                self.reference.update(top=tops, continuations=continuations)
            else:
                self.reference.update(top=next_token_scores(self.model, self.corpora[self.first], self.batch)[2],
                                      continuations=greedy(self.model, self.prompts, self.new_tokens))
        scores["top1_agreement"] = 100.0 * (tops == self.reference["top"]).double().mean().item()
        if self.prompts:
            shares = [_agreement(c, r) for c, r in zip(continuations, self.reference["continuations"])]
            scores["generation_agreement"] = 100.0 * sum(shares) / len(shares)
            scores["generation_exact"] = 100.0 * sum(s == 1.0 for s in shares) / len(shares)
        return scores


def causal_lm_task(name: str, description: str, model: nn.Module, calibration: list, corpora: dict,
                   prompts: list, new_tokens: int = 16, batch: int = 4) -> Task:
    """``corpora``: ``{name: windows [n, length]}``, the first scored as ``perplexity``;
    ``prompts``: 1-d token id tensors for the greedy continuations."""
    scores = CausalLMScores(model, corpora, prompts, new_tokens, batch)
    return Task(name, description, model, calibration, "perplexity", scores, lower_is_better=True)
