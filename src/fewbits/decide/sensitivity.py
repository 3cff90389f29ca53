r"""How much each layer suffers in each candidate format: the scores a per-layer precision
decision is made from.

``fewbits.sensitivity(model, batches, candidates, method=...)`` quantizes the model once per
candidate format (every layer in it, ranges from the float path) and scores each layer alone:

- ``sqnr``: only that layer quantized, its input the exact fp32 one: the noise-to-signal ratio
  of its output, ``‖y − ỹ‖² / ‖y‖²`` (and the SQNR in dB). The layer's own error, nothing
  inherited.
- ``loss``: only that layer quantized (every other layer float), the whole model run: the change
  of the loss. The loss is ``loss_fn(output, call)`` when given (a task loss with labels; ``call``
  is the batch as ``(args, kwargs)``), otherwise the model output's squared error to fp32
  relative to its power.
- ``hessian`` (HAWQ-v2, Dong et al. 2020): ``Tr(H_l) / n_l · ‖Q(W_l) − W_l‖²``, the trace of the
  loss Hessian over the layer's weights estimated by Hutchinson's method
  (``E[vᵀ H v]``, ``v`` Rademacher, ``Hv`` by a second backward pass) at the fp32 weights.
- ``fisher``: ``Σ F_ii (Q(W)_i − W_i)²`` with the empirical Fisher diagonal ``F = E[g²]`` of the
  loss gradient (as ModelOpt's auto-quantize scores). With no ``loss_fn`` the fp32 output is its
  own target, where the gradient vanishes: the gradient is then taken for Gaussian targets
  around it (``y + ε``, ``ε ~ N(0, 1)``), whose Fisher is the Gauss–Newton matrix ``JᵀJ``.

``hessian`` and ``fisher`` score the weight perturbation only (as the papers do): an input grid
changes nothing in them, so ``w8`` and ``w8a8`` score alike. ``sqnr`` and ``loss`` see the
whole format. Every score is a damage: larger is worse, ``float`` is 0.

Scores are cached on disk (JSON, versioned, written atomically) keyed by a fingerprint of the
model's parameters, the batches, the method and the candidates; a second call with the same
inputs reads them back.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..files import write_json_atomic
from ..flow import calibrate, prepare
from ..parallel import run_jobs
from ..progress import Progress
from ..report.evaluate import layer_isolated_errors
from ..wrap.handle import as_call
from ..wrap.modules import recipe_type
from ..wrap.quantizer import TensorQuantizer
from .candidates import DEFAULT_CANDIDATES, Candidate, get_candidates

SCHEMA_VERSION = 2  # 2: per-group formats score every layer (partial last groups); in the cache key
METHODS = ("sqnr", "loss", "hessian", "fisher")


@dataclass
class Sensitivity:
    """Per layer, per candidate: the damage score (``None``: the layer cannot take that format,
    ``unavailable`` says why), and for ``sqnr`` the SQNR in dB."""

    method: str
    candidates: list[str]
    scores: dict[str, dict[str, Optional[float]]] = field(default_factory=dict)
    sqnr_db: dict[str, dict[str, Optional[float]]] = field(default_factory=dict)
    unavailable: dict[str, dict[str, str]] = field(default_factory=dict)
    layer_types: dict[str, str] = field(default_factory=dict)
    fingerprint: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "method": self.method, "candidates": self.candidates,
                "scores": self.scores, "sqnr_db": self.sqnr_db, "unavailable": self.unavailable,
                "layer_types": self.layer_types, "fingerprint": self.fingerprint, "seconds": round(self.seconds, 3)}

    @classmethod
    def from_dict(cls, data: dict, source: str = "sensitivity data") -> "Sensitivity":
        if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
            found = data.get("schema_version") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{source}: schema_version {found!r}, this fewbits reads {SCHEMA_VERSION}")
        try:
            return cls(data["method"], list(data["candidates"]), data["scores"], data["sqnr_db"], data["unavailable"],
                       data["layer_types"], data["fingerprint"], data["seconds"])
        except (KeyError, TypeError) as err:
            raise ValueError(f"{source}: corrupt sensitivity data ({type(err).__name__}: {err})") from None

    def ranking(self, candidate: str) -> list[str]:
        """The layers from most to least damaged by ``candidate`` (those that cannot take it last)."""
        col = {n: s.get(candidate) for n, s in self.scores.items()}
        return sorted(col, key=lambda n: (col[n] is None, -(col[n] or 0.0)))


def fingerprint(model: nn.Module, batches: list, method: str, candidates: list[str], extra: str = "") -> str:
    """A digest of the model's parameters and buffers, the batches (``(args, kwargs)`` calls) and
    the options."""
    h = hashlib.sha256()
    for name, t in list(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().float().numpy().tobytes() if t.is_floating_point() else
                 t.detach().cpu().contiguous().numpy().tobytes())
    for args, kwargs in batches:  # (args, kwargs) calls
        for v in list(args) + [kwargs[k] for k in sorted(kwargs)]:
            if isinstance(v, torch.Tensor):
                h.update(str((tuple(v.shape), v.dtype)).encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps([SCHEMA_VERSION, method, candidates, extra]).encode())
    return h.hexdigest()[:32]


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEWBITS_CACHE", Path.home() / ".cache" / "fewbits")) / "sensitivity"


def sensitivity(model: nn.Module, batches, candidates=DEFAULT_CANDIDATES, method: str = "sqnr", *,
                loss_fn: Optional[Callable] = None, samples: int = 8, cache_dir=None,
                seed: int = 0, workers: int = 1) -> Sensitivity:
    """Score every quantizable layer of ``model`` in every candidate format (see the module's
    docstring for the methods). ``batches``: calibration batches (ranges and scores; keep them
    few: every candidate runs them); ``loss_fn(output, (args, kwargs)) -> scalar`` for ``loss``,
    ``hessian`` and ``fisher`` (default: the output's error to fp32); ``samples``: Hutchinson
    vectors / Fisher draws per batch; ``cache_dir``: where scores are kept (default
    ``~/.cache/fewbits/sensitivity``, ``$FEWBITS_CACHE``; ``False``: no cache); ``workers``:
    processes ``sqnr`` (one per format) and ``loss`` (one per layer and format) are scored in,
    one torch thread each (:func:`fewbits.parallel.run_jobs`; the scores equal one process's).
    ``model`` is not modified."""
    import time

    if method not in METHODS:
        raise ValueError(f"sensitivity method must be one of {list(METHODS)}, got {method!r}")
    if samples < 1:
        raise ValueError(f"sensitivity samples must be >= 1, got {samples}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"sensitivity workers must be an integer >= 1, got {workers!r}")
    chosen = get_candidates(candidates)
    raw = list(batches)
    batches = [as_call(b, i) for i, b in enumerate(raw)]
    if not batches:
        raise ValueError("sensitivity: no batches given")
    names = [c.name for c in chosen]
    code = getattr(loss_fn, "__code__", None)  # a changed loss function is another key
    extra = json.dumps([samples, seed, getattr(loss_fn, "__qualname__", None),
                        hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest() if code else None])
    key = fingerprint(model, batches, method, names, extra)
    path = None
    if cache_dir is not False:
        path = Path(cache_dir or default_cache_dir()) / f"{method}-{key}.json"
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"sensitivity cache {path}: not valid JSON ({err}); delete it to recompute") from None
            return Sensitivity.from_dict(data, f"sensitivity cache {path}")
    start = time.perf_counter()
    result = Sensitivity(method, names, fingerprint=key)
    quantized = _quantized_per_candidate(model, chosen, raw, result)
    if method == "sqnr":
        _score_sqnr(quantized, raw, result, workers)
    elif method == "loss":
        _score_loss(model, quantized, batches, loss_fn, result, workers)
    else:
        _score_curvature(model, quantized, batches, loss_fn, method, samples, seed, result)
    result.seconds = time.perf_counter() - start
    if path is not None:
        write_json_atomic(path, result.to_dict())
    return result


def _quantized_per_candidate(model, chosen: list[Candidate], batches, result: Sensitivity) -> dict:
    """The model prepared and calibrated in each non-float candidate; a layer a candidate leaves
    float has no score there, and ``unavailable`` gives the reason."""
    quantized = {}
    with Progress("sensitivity: preparing candidate", len(chosen)) as progress:
        for cand in chosen:
            progress.step(cand.name)
            if cand.layer is not None:
                quantized[cand.name] = calibrate(prepare(model, cand.recipe()), batches)
    for q in quantized.values():
        for name, layer in q.quantized_layers().items():
            result.layer_types.setdefault(name, recipe_type(layer))
    for name in result.layer_types:
        result.scores[name] = {c.name: (0.0 if c.layer is None else None) for c in chosen}
        if result.method == "sqnr":
            result.sqnr_db[name] = {c.name: None for c in chosen}
    for cand, q in quantized.items():
        reasons = {lf.name: lf.reason for lf in q.left_float}
        for name in result.layer_types:
            if name not in q.quantized_layers():
                result.unavailable.setdefault(name, {})[cand] = reasons.get(name, "left float in this format")
    return quantized


def _score_sqnr(quantized: dict, batches, result: Sensitivity, workers: int) -> None:
    errors = run_jobs(lambda cand: layer_isolated_errors(quantized[cand], batches), list(quantized), workers,
                      "sensitivity (sqnr): candidate")
    for cand, per_layer in zip(quantized, errors):
        for name, (signal, noise) in per_layer.items():
            # no noise: no error at all; no signal: nothing to err on
            ratio = noise / signal if signal > 0 else 0.0
            result.scores[name][cand] = ratio
            result.sqnr_db[name][cand] = round(-10 * math.log10(ratio), 3) if ratio > 0 else None


def _default_loss(reference: list):
    """The output's squared error to fp32, relative to the fp32 output's power."""
    def loss(output, index):
        ref = reference[index]
        out = _tensor_of(output)
        return (out - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30)
    return loss


def _tensor_of(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        if hasattr(output, key):
            return getattr(output, key)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ValueError(f"sensitivity: the model returns {type(output).__name__}; give loss_fn to read it")


def _losses(model, batches, loss) -> float:
    total = 0.0
    for i, (args, kwargs) in enumerate(batches):
        total += float(loss(model(*args, **kwargs), i))
    return total / len(batches)


@torch.no_grad()
def _score_loss(model, quantized: dict, batches, loss_fn, result: Sensitivity, workers: int) -> None:
    reference = [_tensor_of(model(*a, **k)).detach() for a, k in batches]
    loss = (lambda out, i: loss_fn(out, batches[i])) if loss_fn else _default_loss(reference)
    base = _losses(model, batches, loss)
    quantizers = {cand: list(q.quantizers().values()) for cand, q in quantized.items()}

    @torch.no_grad()  # again: a worker process runs it outside this call
    def score(job: tuple) -> float:
        cand, name = job
        own = {id(m) for m in quantized[cand].model.get_submodule(name).modules() if isinstance(m, TensorQuantizer)}
        before = [qz.enabled for qz in quantizers[cand]]
        for qz in quantizers[cand]:
            qz.enabled = id(qz) in own  # only this layer's weight / input / output grids
        try:
            return _losses(quantized[cand].model, batches, loss) - base
        finally:
            for qz, was in zip(quantizers[cand], before):
                qz.enabled = was

    jobs = [(cand, name) for cand, q in quantized.items() for name in q.quantized_layers()]
    for (cand, name), value in zip(jobs, run_jobs(score, jobs, workers, "sensitivity (loss): layer",
                                                  note=" ".join)):
        result.scores[name][cand] = value


def _score_curvature(model, quantized: dict, batches, loss_fn, method: str, samples: int, seed: int,
                     result: Sensitivity) -> None:
    """Per layer one curvature statistic of the fp32 weights (Hessian trace / n, or the Fisher
    diagonal), then per candidate its product with that candidate's weight perturbation."""
    any_q = next(iter(quantized.values()), None)
    if any_q is None:
        return
    float_model = any_q.float_model  # BN-folded fp32, the names of the prepared layers
    weights = {n: float_model.get_submodule(n).weight for n in result.layer_types
               if isinstance(getattr(float_model.get_submodule(n), "weight", None), torch.Tensor)}
    before = {n: w.requires_grad for n, w in weights.items()}
    try:
        for w in weights.values():
            w.requires_grad_(True)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # the math attention kernel: the fused CPU kernels have no second derivative (Hessian-vector products)
        with sdpa_kernel([SDPBackend.MATH]):
            stats = (_hutchinson_trace(float_model, weights, batches, loss_fn, samples, seed) if method == "hessian"
                     else _fisher_diagonal(float_model, weights, batches, loss_fn, samples, seed))
    finally:
        for n, w in weights.items():
            w.requires_grad_(before[n])
    for cand, q in quantized.items():
        for name, layer in q.quantized_layers().items():
            if name not in stats or getattr(layer, "weight_quantizer", None) is None:
                continue
            with torch.no_grad():
                delta = (layer.quantized_weight() - layer.weight).detach().double()
            stat = stats[name]
            score = stat * delta.pow(2).sum() if method == "hessian" else (stat * delta.pow(2)).sum()
            result.scores[name][cand] = float(score)


def _curvature_loss(float_model, batches, loss_fn, generator):
    """``loss(i) -> scalar`` with gradients; without ``loss_fn``, half the squared distance to a
    Gaussian target around the fp32 output (its Fisher / Hessian is the Gauss–Newton ``JᵀJ``)."""
    if loss_fn is not None:
        return lambda i: loss_fn(float_model(*batches[i][0], **batches[i][1]), batches[i])
    with torch.no_grad():
        reference = [_tensor_of(float_model(*a, **k)).detach() for a, k in batches]

    def loss(i, noisy=False):
        out = _tensor_of(float_model(*batches[i][0], **batches[i][1]))
        target = reference[i] + (torch.randn(reference[i].shape, generator=generator) if noisy else 0.0)
        return 0.5 * (out - target).pow(2).sum() / reference[i].shape[0]
    return loss


def _hutchinson_trace(float_model, weights: dict, batches, loss_fn, samples: int, seed: int) -> dict:
    """``Tr(H_l) / n_l`` per layer: ``E[vᵀ H v]`` over Rademacher ``v``, averaged over batches."""
    generator = torch.Generator().manual_seed(seed)
    loss = _curvature_loss(float_model, batches, loss_fn, generator)
    names, params = list(weights), list(weights.values())
    sums = {n: 0.0 for n in weights}
    with Progress("sensitivity (hessian): batch", len(batches)) as progress:
        for i in range(len(batches)):
            progress.step()
            # a weight the loss does not depend on (a pooler whose output is unused) has no gradient:
            # zero curvature; so has a gradient that is constant in the weights
            grads = torch.autograd.grad(loss(i), params, create_graph=True, allow_unused=True)
            used = [k for k, g in enumerate(grads) if g is not None and g.requires_grad]
            for s in range(samples):
                vs = [torch.randint(0, 2, p.shape, generator=generator).to(p.dtype) * 2 - 1 for p in params]
                hv = torch.autograd.grad([grads[k] for k in used], [params[k] for k in used],
                                         grad_outputs=[vs[k] for k in used], retain_graph=s < samples - 1,
                                         allow_unused=True)
                for k, h in zip(used, hv):
                    if h is not None:
                        sums[names[k]] += float((vs[k] * h).sum())
    count = len(batches) * samples
    return {n: sums[n] / count / weights[n].numel() for n in weights}


def _fisher_diagonal(float_model, weights: dict, batches, loss_fn, samples: int, seed: int) -> dict:
    """``E[g²]`` per weight: one draw per batch with a task loss, ``samples`` Gaussian targets
    per batch without one."""
    generator = torch.Generator().manual_seed(seed)
    loss = _curvature_loss(float_model, batches, loss_fn, generator)
    params = list(weights.values())
    sums = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in weights.items()}
    draws = 1 if loss_fn is not None else samples
    with Progress("sensitivity (fisher): batch", len(batches)) as progress:
        for i in range(len(batches)):
            progress.step()
            for _ in range(draws):
                value = loss(i) if loss_fn is not None else loss(i, noisy=True)
                for n, g in zip(weights, torch.autograd.grad(value, params, allow_unused=True)):
                    if g is not None:  # None: the loss does not depend on that weight (zero Fisher)
                        sums[n] += g.detach().double().pow(2)
    return {n: s / (len(batches) * draws) for n, s in sums.items()}
