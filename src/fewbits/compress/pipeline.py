"""Deep Compression (Han, Mao, Dally 2016): prune → share weights by k-means → Huffman code.

:func:`deep_compression` runs the three stages on a copy of a trained classifier (BatchNorm
folded first, as deployed) and measures size and accuracy after each:

1. **prune**: iterative magnitude pruning (:mod:`fewbits.compress.prune`) with retraining after
   every step, pruned weights held at zero;
2. **quantize**: per layer, k-means of the surviving weights into ``2^bits`` centroids, linear
   initialisation; then the centroids fine-tuned — each one's gradient is the sum of its
   weights' gradients (:func:`fewbits.numerics.levels.decode`), biases training with them;
3. **Huffman**: cluster indices and relative sparse indices Huffman-coded into the file
   (:mod:`fewbits.export.compressed`), read back and evaluated from the file.

Sizes: dense = float32 everything; pruned = float32 survivors + fixed-width relative indices
(the width with the fewest bits per layer, 1–8) + other tensors; quantized = ``bits``-bit indices
+ the same relative indices + float32 codebooks; Huffman = the file's bytes, header included.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from ..export.compressed import SharedTensor, read_compressed, write_compressed
from ..numerics.levels import kmeans_1d, midpoints
from ..progress import Progress
from ..wrap.fold import fold_batchnorm
from .coding import fixed_gap_bits
from .prune import SCOPES, magnitude_masks, sparsity_schedule

COMPRESSIBLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass(frozen=True)
class DeepCompressionConfig:
    """The pipeline's knobs; the paper's choices where it gives them (conv layers keep more
    bits than fully connected ones: 8 vs 5 in AlexNet; linear centroid initialisation)."""

    prune: float = 0.9  # fraction of the compressible weights removed
    bits: int = 5  # cluster-index width of linear layers
    conv_bits: Optional[int] = None  # of convolutions (None: ``bits``)
    scope: str = "global"  # one magnitude threshold over all layers, or per layer
    steps: int = 3  # iterative pruning steps
    retrain_epochs: float = 1.0  # after each pruning step
    finetune_epochs: float = 1.0  # of the centroids
    lr: float = 1e-3  # Adam, retraining
    centroid_lr: float = 1e-4  # Adam, centroid fine-tuning
    batch_size: int = 128
    kmeans_iterations: int = 30
    seed: int = 0

    def __post_init__(self) -> None:
        sparsity_schedule(self.prune, self.steps)  # validates both
        for name in ("bits", "conv_bits"):
            b = getattr(self, name)
            if b is not None and not (isinstance(b, int) and 1 <= b <= 8):
                raise ValueError(f"Deep Compression {name} must be an integer in 1..8, got {b!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"Deep Compression scope must be one of {SCOPES}, got {self.scope!r}")
        for name in ("retrain_epochs", "finetune_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"Deep Compression {name} must be >= 0, got {getattr(self, name)}")


@dataclass
class Stage:
    name: str
    bytes: int
    metrics: dict
    seconds: float
    ratio: float = 1.0  # dense bytes / this stage's bytes


@dataclass
class LayerRow:
    name: str
    type: str
    params: int
    nnz: int
    bits: int
    gap_bits: int  # fixed-width relative index (before Huffman)
    file_bytes: int = 0  # codebook + code tables + streams in the file

    @property
    def density(self) -> float:
        return self.nnz / self.params


@dataclass
class CompressionResult:
    stages: list[Stage]
    layers: list[LayerRow]
    config: DeepCompressionConfig
    path: Optional[str]
    metric: str
    kept_dense: list[str] = field(default_factory=list)  # float tensors stored as they are
    model: Optional[nn.Module] = field(default=None, repr=False)  # decoded from the file

    @property
    def ratio(self) -> float:
        return self.stages[-1].ratio

    def to_dict(self) -> dict:
        return {"config": asdict(self.config), "metric": self.metric, "path": self.path,
                "stages": [asdict(s) for s in self.stages],
                "sizes": {s.name: s.bytes for s in self.stages}, "ratio": round(self.ratio, 2),
                "layers": [{**asdict(r), "density": round(r.density, 4)} for r in self.layers],
                "kept_dense": self.kept_dense}


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, COMPRESSIBLE)}


def _float_tensors(model: nn.Module, skip: set) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k not in skip and torch.is_floating_point(v)}


def train_epochs(model: nn.Module, data: tuple, epochs: float, params: list, lr: float, batch_size: int,
                 seed: int, label: str, weights: Optional[Callable[[], dict]] = None,
                 after_step: Optional[Callable[[], None]] = None) -> None:
    """Adam on cross-entropy for ``epochs`` (fractions allowed) over ``data = (x, y)``;
    ``weights()`` gives tensors to run the model with in place of its own (functional call)."""
    x, y = data
    steps = int(round(epochs * (len(x) // batch_size)))
    if steps == 0 or not params:
        return
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    order, cursor = torch.randperm(len(x), generator=g), 0
    with Progress(f"{label}, step", steps) as progress:
        for _ in range(steps):
            if cursor + batch_size > len(x):
                order, cursor = torch.randperm(len(x), generator=g), 0
            idx = order[cursor:cursor + batch_size]
            cursor += batch_size
            out = functional_call(model, weights(), (x[idx],)) if weights else model(x[idx])
            loss = nn.functional.cross_entropy(out, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step()
            progress.step(f"loss {loss.item():.3f}")
    model.eval()


def _bits_of(config: DeepCompressionConfig, layer: nn.Module) -> int:
    return config.bits if isinstance(layer, nn.Linear) or config.conv_bits is None else config.conv_bits


def deep_compression(model: nn.Module, train: tuple, evaluate: Callable[[nn.Module], dict], metric: str,
                     config: DeepCompressionConfig = DeepCompressionConfig(), path=None) -> CompressionResult:
    """Compress a copy of ``model`` (left unchanged); ``train = (inputs, labels)``,
    ``evaluate(model) → metrics`` with ``metric`` among them; ``path``: where the file goes
    (a temporary file when ``None``; the Huffman stage is always measured from a file)."""
    if not (isinstance(train, tuple) and len(train) == 2 and train[1] is not None):
        raise ValueError("deep_compression retrains on labelled data: train must be (inputs, labels)")
    torch.manual_seed(config.seed)
    work = copy.deepcopy(model).eval()
    folded, _ = fold_batchnorm(work)
    layers = _layers(work)
    if not layers:
        raise ValueError("deep_compression: the model has no Linear or Conv layers to compress")
    weights = {n: m.weight for n, m in layers.items()}
    others = _float_tensors(work, {f"{n}.weight" for n in layers})
    other_bits = 32 * sum(v.numel() for v in others.values())
    stages: list[Stage] = []

    def stage(name: str, bits: int, t0: float, m: nn.Module) -> None:
        nbytes = (bits + 7) // 8
        ratio = stages[0].bytes / nbytes if stages else 1.0
        stages.append(Stage(name, nbytes, evaluate(m), round(time.time() - t0, 1), ratio))

    stage("dense", 32 * sum(w.numel() for w in weights.values()) + other_bits, time.time(), work)
    t0 = time.time()
    masks = _prune(work, weights, train, config)
    positions = {n: np.flatnonzero(masks[n].reshape(-1).numpy()) for n in weights}
    gaps = {n: fixed_gap_bits(positions[n]) for n in weights}
    nnz = {n: int(masks[n].sum()) for n in weights}
    stage("pruned", sum(32 * nnz[n] + gaps[n][1] for n in weights) + other_bits, t0, work)
    t0 = time.time()
    bits = {n: _bits_of(config, layers[n]) for n in weights}
    codebooks, assignment = _share(work, weights, masks, positions, bits, train, config)
    index_bits = sum(nnz[n] * bits[n] + gaps[n][1] + 32 * codebooks[n].numel() for n in weights)
    stage("quantized", index_bits + other_bits, t0, work)
    t0 = time.time()
    tensors = {}
    for key, value in work.state_dict().items():
        name = key[: -len(".weight")]
        if name in weights and key.endswith(".weight"):
            tensors[key] = SharedTensor(tuple(value.shape), positions[name], assignment[name].numpy(),
                                        codebooks[name].detach().numpy().astype(np.float32), bits[name])
        elif torch.is_floating_point(value):
            tensors[key] = value
    restored, file_bytes, sizes = _write_and_read(work, tensors, {"folded_bn": folded, "config": asdict(config)}, path)
    stage("huffman", 8 * file_bytes, t0, restored)
    rows = [LayerRow(n, type(layers[n]).__name__, w.numel(), nnz[n], bits[n], gaps[n][0], sizes[f"{n}.weight"])
            for n, w in weights.items()]
    return CompressionResult(stages, rows, config, None if path is None else str(path), metric, sorted(others),
                             restored)


def _prune(work: nn.Module, weights: dict, train: tuple, config: DeepCompressionConfig) -> dict:
    """Iterative magnitude pruning, retraining after each step with the pruned weights held at
    zero; returns the final masks (``weights`` are ``work``'s, changed in place)."""
    masks = {}

    @torch.no_grad()
    def hold_zeros() -> None:
        for n, w in weights.items():
            w.mul_(masks[n])

    for i, sparsity in enumerate(sparsity_schedule(config.prune, config.steps)):
        masks = magnitude_masks(weights, sparsity, config.scope)
        hold_zeros()
        train_epochs(work, train, config.retrain_epochs, list(work.parameters()), config.lr, config.batch_size,
                     config.seed + i, f"pruning {sparsity:.0%}, retraining", after_step=hold_zeros)
    return masks


def _share(work: nn.Module, weights: dict, masks: dict, positions: dict, bits: dict, train: tuple,
           config: DeepCompressionConfig) -> tuple[dict, dict]:
    """k-means of each layer's survivors, centroids (and the other parameters) fine-tuned by
    gradient sharing, the shared weights written into ``work``; returns codebooks and indices."""
    codebooks, assignment = {}, {}
    for n, w in weights.items():
        survivors = w.detach()[masks[n]].reshape(1, -1)
        centroids = kmeans_1d(survivors, 2 ** bits[n], config.kmeans_iterations)
        assignment[n] = torch.searchsorted(midpoints(centroids).contiguous(), survivors.double(), right=True)[0]
        codebooks[n] = nn.Parameter(centroids[0].float())

    def shared_weights() -> dict:
        out = {}
        for n, w in weights.items():
            flat = torch.zeros(w.numel(), dtype=w.dtype).index_put((torch.from_numpy(positions[n]),),
                                                                  codebooks[n][assignment[n]])
            out[f"{n}.weight"] = flat.reshape(w.shape)
        return out

    keys = {f"{n}.weight" for n in weights}
    trainable = list(codebooks.values()) + [p for k, p in work.named_parameters() if k not in keys]
    train_epochs(work, train, config.finetune_epochs, trainable, config.centroid_lr, config.batch_size,
                 config.seed + 100, "fine-tuning centroids", weights=shared_weights)
    with torch.no_grad():
        for key, value in shared_weights().items():
            work.get_parameter(key).copy_(value)
    return codebooks, assignment


def _write_and_read(work: nn.Module, tensors: dict, meta: dict, path) -> tuple[nn.Module, int, dict]:
    """Write the file, read it back, check it decodes to ``work`` exactly; the decoded model,
    the file's bytes and the bytes per tensor."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        target = Path(path) if path is not None else Path(tmp) / "model.fbdc"
        write_compressed(target, tensors, meta)
        decoded, _, sizes = read_compressed(target)
        file_bytes = target.stat().st_size
    expected = work.state_dict()
    bad = [k for k, v in decoded.items() if not torch.equal(v, expected[k])]
    if bad:
        raise RuntimeError(f"Deep Compression: the file does not decode to the model it was written from ({bad[:3]})")
    restored = copy.deepcopy(work)
    restored.load_state_dict({**expected, **decoded}, strict=True)
    return restored.eval(), file_bytes, sizes


def load_compressed(path, model: nn.Module) -> nn.Module:
    """A copy of ``model`` (the float architecture) holding the weights of a Deep Compression
    file, its BatchNorms folded as they were when it was written."""
    tensors, meta, _ = read_compressed(path)
    work = copy.deepcopy(model).eval()
    folded, _ = fold_batchnorm(work)
    if folded != meta.get("folded_bn", []):
        raise ValueError(f"{path}: written from a model whose BatchNorms fold as {meta.get('folded_bn')}, "
                         f"this one folds {folded}")
    state = work.state_dict()
    missing = sorted(k for k, v in state.items() if torch.is_floating_point(v) and k not in tensors)
    unknown = sorted(set(tensors) - set(state))
    if missing or unknown:
        raise ValueError(f"{path}: does not match the model given (missing {missing[:3]}, unknown {unknown[:3]})")
    for k, v in tensors.items():
        if v.shape != state[k].shape:
            raise ValueError(f"{path}: tensor '{k}' has shape {tuple(v.shape)}, the model's is {tuple(state[k].shape)}")
    work.load_state_dict({**state, **tensors}, strict=True)
    return work
