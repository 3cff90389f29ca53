"""The training loop of quantization-aware training: :func:`fit` with its :class:`FitConfig`,
distillation, and the result it returns."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..progress import Progress
from ..wrap.handle import QuantizedModel, Status
from .batchnorm import freeze_batchnorm
from .quantizers import is_distributed
from .train import finish, freeze_ranges, pact_penalty, quantizer_parameters


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton et al.'s KL divergence between temperature-softened distributions, times ``T²``
    (which keeps its gradient on the scale of the hard-label loss)."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                    reduction="batchmean") * t * t


def cosine_distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``1 − cos`` between student and teacher vectors (embeddings), averaged."""
    return (1.0 - F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1)).mean()


@dataclass
class Distillation:
    """The fp32 ``teacher`` guides training: ``loss = (1 − weight)·task + weight·distill``, the
    distillation term KL on logits softened by ``temperature`` (``kind="kl"``) or the embedding
    cosine (``kind="cosine"``, for models without a task loss, e.g. sentence encoders)."""

    teacher: nn.Module
    weight: float = 0.5
    temperature: float = 4.0
    kind: str = "kl"

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"distillation weight must be in [0, 1], got {self.weight}")
        if self.kind not in ("kl", "cosine"):
            raise ValueError(f"distillation kind must be 'kl' or 'cosine', got {self.kind!r}")
        self.teacher = self.teacher.eval()

    def loss(self, student_out: torch.Tensor, inputs, task_loss: Optional[torch.Tensor],
             forward: Optional[Callable] = None) -> torch.Tensor:
        with torch.no_grad():
            teacher_out = (forward or call)(self.teacher, inputs)
        term = (distillation_loss(student_out, teacher_out, self.temperature) if self.kind == "kl"
                else cosine_distillation_loss(student_out, teacher_out))
        if task_loss is None:
            return term
        return (1.0 - self.weight) * task_loss + self.weight * term


@dataclass
class FitResult:
    """What :func:`fit` did: per-epoch records, the epoch kept, the wall time."""

    history: list = field(default_factory=list)  # {"epoch", "loss", "seconds", **metrics}
    best_epoch: Optional[int] = None
    best: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"history": self.history, "best_epoch": self.best_epoch, "best": self.best, "seconds": self.seconds}


def call(model: nn.Module, inputs):
    """``model(**inputs)`` for a dict of keyword arguments, else ``model(inputs)``."""
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _shard(batch, rank: int, world: int):
    """This rank's contiguous share of a global batch (every tensor split along dim 0)."""
    if isinstance(batch, torch.Tensor):
        if len(batch) % world:
            raise ValueError(f"a global batch of {len(batch)} does not split evenly over {world} ranks")
        return batch.chunk(world)[rank]
    if isinstance(batch, (tuple, list)):
        return type(batch)(_shard(b, rank, world) for b in batch)
    if isinstance(batch, dict):
        return {k: _shard(v, rank, world) for k, v in batch.items()}
    return batch


@dataclass(frozen=True)
class FitConfig:
    """The options of :func:`fit` (see its docstring for each)."""

    epochs: int = 1
    lr: float = 1e-4
    optimizer: Optional[object] = None
    loss: Optional[Callable] = None
    evaluate: Optional[Callable[[nn.Module], dict]] = None
    monitor: Optional[str] = None
    distill: Optional[Distillation] = None
    pact_weight: float = 1e-4
    freeze_ranges_after: Optional[float] = None
    freeze_bn_after: Optional[float] = None
    checkpoint: Optional[str | Path] = None
    schedule: Optional[Callable[[int, QuantizedModel], None]] = None
    finish_model: bool = True
    cosine: bool = True
    forward: Optional[Callable] = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"fit needs epochs >= 1, got {self.epochs}")


def fit(qmodel: QuantizedModel, data, config: Optional[FitConfig] = None, **options) -> FitResult:
    """Train ``qmodel`` (from :func:`prepare_qat`) on ``data`` and keep its best epoch.

    The options come as a :class:`FitConfig` or as its fields by keyword (``epochs=3, lr=1e-4``).

    ``data``: a re-iterable of ``(inputs, targets)`` global batches (a list, a DataLoader);
    ``targets`` may be ``None`` when a ``distill`` teacher is the only target. ``forward(model,
    inputs)`` gives the output the losses compare (default :func:`call`; a sentence encoder's
    pooled embedding, say).
    Under ``torch.distributed`` (``torchrun``) the model is wrapped in DDP and every rank takes
    its contiguous share of each global batch, so N ranks compute what one process computes on
    the same batches. ``loss(outputs, targets)`` defaults to cross-entropy; ``evaluate(model)``
    returns metrics after each epoch, ``monitor`` (default: its first key, higher is better)
    picks the epoch kept — its state is restored at the end and, with ``checkpoint``, written
    there (rank 0, atomically). ``freeze_ranges_after``: the share of the steps after which the
    activation moving averages stop; ``freeze_bn_after`` the share after which training
    BatchNorms (``prepare_qat(batchnorm="train")``) use their running statistics. ``schedule(epoch, qmodel)`` runs before each epoch
    (progressive bit widths). Adam at ``lr`` unless an ``optimizer`` is given, decayed to 0
    along a cosine over all steps when ``cosine`` (and the number of batches is known). With
    ``finish_model`` the grids are fixed at the end (:func:`finish`).
    """
    if qmodel.status is not Status.TRAINING:
        raise ValueError("fit expects the model returned by fewbits.qat.prepare_qat")
    if config is not None and options:
        raise ValueError(f"fit: give a FitConfig or keyword options, not both ({sorted(options)})")
    c = config or FitConfig(**options)
    epochs, lr, optimizer, loss, evaluate, monitor = c.epochs, c.lr, c.optimizer, c.loss, c.evaluate, c.monitor
    distill, schedule, forward = c.distill, c.schedule, c.forward
    torch.manual_seed(c.seed)
    loss = loss or F.cross_entropy
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if is_distributed() else (0, 1)
    net: nn.Module = qmodel
    if world > 1:
        # quantizer ranges are all-reduced by the quantizers themselves: buffers are synced once
        # at the start (all ranks prepared the same model), not re-broadcast every forward
        net = nn.parallel.DistributedDataParallel(qmodel, forward_sync_buffers=False)
    if optimizer is None:
        learned = quantizer_parameters(qmodel)
        ids = {id(p) for p in learned}
        weights = [p for p in qmodel.parameters() if id(p) not in ids and p.requires_grad]
        optimizer = torch.optim.Adam([{"params": weights}] + ([{"params": learned}] if learned else []), lr=lr)
    total = epochs * len(data) if hasattr(data, "__len__") else None
    decay = None
    if c.cosine and total:
        decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, total) / total)))
    freeze_at = None if c.freeze_ranges_after is None or total is None else int(c.freeze_ranges_after * total)
    freeze_bn_at = None if c.freeze_bn_after is None or total is None else int(c.freeze_bn_after * total)
    result = FitResult()
    best_state, best_value = None, -math.inf
    start, step = time.perf_counter(), 0
    for epoch in range(epochs):
        if schedule is not None:
            schedule(epoch, qmodel)
        qmodel.train()
        t0, losses = time.perf_counter(), []
        with Progress(f"QAT epoch {epoch + 1}/{epochs}, batch", len(data) if hasattr(data, "__len__") else None,
                      enabled=rank == 0) as progress:
            for batch in data:
                if freeze_at is not None and step == freeze_at:
                    freeze_ranges(qmodel)
                if freeze_bn_at is not None and step == freeze_bn_at:
                    freeze_batchnorm(qmodel.model)
                inputs, targets = _shard(batch, rank, world) if world > 1 else batch
                out = (forward or call)(net, inputs)
                task = loss(out, targets) if targets is not None else None
                total_loss = distill.loss(out, inputs, task, forward) if distill is not None else task
                if total_loss is None:
                    raise ValueError("fit: batches without targets need a Distillation to train against")
                if c.pact_weight and qmodel.qat["method"] == "pact":
                    total_loss = total_loss + c.pact_weight * pact_penalty(qmodel)
                optimizer.zero_grad()
                total_loss.backward()
                optimizer.step()
                if decay is not None:
                    decay.step()
                losses.append(float(total_loss.detach()))
                step += 1
                progress.step()
        record = {"epoch": epoch + 1, "loss": sum(losses) / max(len(losses), 1), "seconds": time.perf_counter() - t0}
        if evaluate is not None:
            qmodel.eval()
            with torch.no_grad():
                metrics = evaluate(qmodel)
            record.update(metrics)
            key = monitor or next(iter(metrics))
            if key not in metrics:
                raise ValueError(f"fit: monitor '{key}' is not among the metrics {sorted(metrics)}")
            if metrics[key] > best_value:
                best_value, result.best_epoch, result.best = metrics[key], epoch + 1, dict(metrics)
                best_state = copy.deepcopy(qmodel.state_dict())
        result.history.append(record)
    if best_state is not None:
        qmodel.load_state_dict(best_state)
    result.seconds = time.perf_counter() - start
    if c.finish_model:
        finish(qmodel)
    if c.checkpoint is not None and rank == 0:
        _write_checkpoint(qmodel, Path(c.checkpoint), result)
    return result


def _write_checkpoint(qmodel: QuantizedModel, path: Path, result: FitResult) -> None:
    """The trained model as ``fewbits.save`` writes it once its grids are fixed, else its state."""
    if qmodel.status is Status.CALIBRATED:
        from ..export.packed import save

        save(qmodel, path)
        return
    import io

    from ..files import write_atomic

    buffer = io.BytesIO()
    torch.save({"schema_version": 1, "state_dict": qmodel.state_dict(), "fit": result.to_dict()}, buffer)
    write_atomic(path, buffer.getvalue())
