"""ONNX export in QDQ format, hardware-aware, with a parity check against the integer model.

``export_onnx(qmodel, example_inputs, path)`` lowers the calibrated model for ONNX Runtime on
this CPU (:func:`fewbits.lower.lower` with :meth:`fewbits.target.Target.onnxruntime`), builds the
module torch.onnx traces from the records (:mod:`fewbits.export.qdq`: every integer layer as the
standard QDQ pattern that ONNX Runtime fuses into its integer kernels), writes it with the
``torch.export`` based exporter, records the plan and the records in the file's metadata, and
checks the file against the integer model (:mod:`fewbits.export.verify`).

Hardware: on x86 with AVX2 (or AVX-512BW) but no VNNI, ONNX Runtime's u8×s8 kernels add pairs of
products in int16 with saturation (:mod:`fewbits.target`); a layer whose weights are not
provably within that bound gets its weights re-quantized to the 7-bit range in its record,
reported per layer. Depthwise convolutions are exempt: ONNX Runtime's depthwise kernel sums in
int32. The integer reference that :func:`verify` compares against is built from the same
narrowing.

Layers that have no integer GEMM here (weight-only, more than 8 bits, output quantizers) are
exported as what they compute: weight-only layers keep int8 weights behind a DequantizeLinear
and compute in float; per-group weights sit behind a blocked DequantizeLinear (the file is then
opset 21), as int4 when 4 bits or fewer, and a linear layer's feeds its MatMul directly, which
ONNX Runtime fuses into its 4-bit kernel (``MatMulNBits``: checked in the optimized graph like
every integer layer; by default it computes with int8 activations per block, which is where
its speed comes from); the others are traced as the simulated layer itself (fake quantization
as float operations). Layers with dynamic 8-bit asymmetric input
ranges quantize through DynamicQuantizeLinear (mode ``int8-dynamic``). Every layer's mode is
listed in the :class:`ExportResult`.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..files import write_atomic
from ..lower import lower, record_summaries
from ..target import NARROW_BITS, WEIGHT_MODES, KernelProfile, Target, int8_kernel_profile, pair_sum_bound
from ..wrap.handle import QuantizedModel
from .kernels import KernelReport, kernel_report
from .plan import EXPORT_FORMAT, EXPORT_VERSION, LayerExport, plan_from, plan_layers
from .qdq import (QDQLayer, WeightOnlyLayer, _onnx_blocked_dequantize, _onnx_dynamic_qdq_u8, _onnx_global_avg_pool,
                  _onnx_per_token_linear, _qd, blocked, export_module, pack_int4_initializers)
from .verify import OnnxModel, Verification, as_call, verify_onnx

OPSET = 18  # the torch.export based exporter's lowest; ONNX Runtime 1.17+ runs it
BLOCKED_OPSET = 21  # blocked DequantizeLinear and int4 tensors (per-group weights); ONNX Runtime 1.20+


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and how each layer went in."""

    path: str
    bytes: int
    opset: int
    profile: KernelProfile
    layers: list[LayerExport]
    inputs: list[str]
    outputs: list[str]
    seconds: float
    verification: Optional["Verification"] = None
    kernels: Optional[KernelReport] = None  # what ONNX Runtime's optimized graph runs

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.layers:
            out[e.mode] = out.get(e.mode, 0) + 1
        return out

    def to_dict(self) -> dict:
        return {"path": self.path, "bytes": self.bytes, "opset": self.opset, "profile": asdict(self.profile),
                "profile_note": self.profile.describe(), "modes": self.counts(),
                "narrowed": [e.name for e in self.layers if e.narrowed_from is not None],
                "layers": [asdict(e) for e in self.layers], "inputs": self.inputs, "outputs": self.outputs,
                "seconds": round(self.seconds, 2),
                "verification": None if self.verification is None else self.verification.to_dict(),
                "kernels": None if self.kernels is None else self.kernels.to_dict()}


DYNAMIC_MODES = ("auto", "batch", "all", "none")


def _dynamic(value, mode: str):
    """Which input dimensions may vary: ``"batch"`` the first, ``"all"`` every one (torch.export
    keeps fixed what the model fixes), ``"auto"`` the batch of images (float, rank ≥ 3: a fixed
    size keeps Flatten a constant reshape) and every dimension of anything else (token ids)."""
    if not isinstance(value, torch.Tensor) or mode == "none" or value.dim() == 0:
        return None
    if mode == "batch" or (mode == "auto" and torch.is_floating_point(value) and value.dim() >= 3):
        return {0: torch.export.Dim.AUTO}
    return {i: torch.export.Dim.AUTO for i in range(value.dim())}


def export_onnx(qmodel: QuantizedModel, example_inputs, path, *, batches=None, weights: str = "auto",
                verify: bool = True, strict: bool = False, tolerance: float = 1.0,
                wrap=None, dynamic: str = "auto", profile: Optional[KernelProfile] = None,
                target: Optional[Target] = None) -> ExportResult:
    """Write ``qmodel`` (calibrated) as a QDQ ONNX model at ``path`` and check it.

    ``example_inputs``: a tensor, a tuple of positional tensors, or a dict of keyword tensors
    (the ONNX inputs take the names of the forward's parameters). ``weights``: ``"auto"``
    (narrow to 7 bits only where this CPU's kernels would saturate), ``"full"`` (never) or
    ``"narrow"`` (always). ``wrap``: an optional ``callable(module) -> module`` selecting the
    outputs (e.g. a tensor out of a model output object). ``dynamic``: which input dimensions
    may vary at run time (``"auto"``: the batch of images, every dimension of token ids; or
    ``"batch"``, ``"all"``, ``"none"``). With ``verify`` the file is run by
    ONNX Runtime on ``batches`` (default: the example) and compared to the integer model
    (:func:`verify`); past ``tolerance`` output steps it warns, or raises with ``strict``.
    ``profile`` / ``target``: export for another CPU than this one (``target`` an
    ``onnxruntime`` :class:`~fewbits.target.Target`, which then also gives the ``weights`` mode).
    """
    if not isinstance(qmodel, QuantizedModel):
        raise ValueError("export_onnx expects the model returned by fewbits.prepare")
    qmodel.require_calibrated("export_onnx")
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"export_onnx: directory {str(path.parent)!r} does not exist")
    if dynamic not in DYNAMIC_MODES:
        raise ValueError(f"dynamic must be one of {DYNAMIC_MODES}, got {dynamic!r}")
    args, kwargs = as_call(example_inputs)
    t0 = time.perf_counter()
    if target is not None and target.engine != "onnxruntime":
        raise ValueError(f"export_onnx: target engine {target.engine!r}; ONNX files run on the 'onnxruntime' engine")
    target = target or Target.onnxruntime(profile or int8_kernel_profile(), weights)
    profile, weights = target.profile, target.weights
    lowering = lower(qmodel, target)
    plan = plan_from(lowering)
    module = export_module(qmodel, lowering)
    if wrap is not None:
        module = wrap(module)
    opset = BLOCKED_OPSET if any(blocked(r) for r in lowering.layers.values()) else OPSET
    data = _torch_onnx_bytes(module, args, kwargs, dynamic, opset)
    import onnx

    model = onnx.load_from_string(data)
    pack_int4_initializers(model)
    meta = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "recipe": qmodel.recipe.to_dict(),
            "profile": asdict(profile), "weights": weights, "layers": [asdict(e) for e in plan],
            "lowered": record_summaries(lowering.records()),
            "input_levels": {}}
    gemms = {}  # each integer layer's product node, to find it again in ONNX Runtime's optimized graph
    for node, layer in _layer_nodes(model, module, ("QuantizeLinear", "Conv", "ConvTranspose", "Gemm", "MatMul")):
        if node.op_type == "QuantizeLinear":  # the tensor holding the layer's uint8 input levels
            meta["input_levels"][node.output[0]] = layer
        else:
            gemms[node.name] = layer
    # per-group linear layers: their MatMul is to become ONNX Runtime's 4-bit kernel (MatMulNBits)
    for node, layer in _layer_nodes(model, module, ("MatMul",), _blocked_linear):
        gemms[node.name] = layer
    for node in model.graph.node:  # the exporter's per-node stack traces: ~1.5 MB on MiniLM
        del node.metadata_props[:]
    # intermediate shape annotations (optional in ONNX; ONNX Runtime infers shapes itself): ~48 kB on MiniLM
    del model.graph.value_info[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = "fewbits", json.dumps(meta, separators=(",", ":"))
    payload = model.SerializeToString()
    write_atomic(path, payload)
    result = ExportResult(str(path), len(payload), opset, profile, plan,
                          [i.name for i in model.graph.input], [o.name for o in model.graph.output],
                          time.perf_counter() - t0)
    result.kernels = kernel_report(path, watch=gemms)
    # layers the runtime has no integer kernel for (their records say so) are expected in float
    names = sorted({n for n in result.kernels.unfused.values() if not lowering.layers[n].transposed})
    if strict and names:
        raise ValueError(f"export_onnx: {path.name}: {len(names)} layer(s) did not fuse into ONNX Runtime's integer "
                         f"kernels ({result.kernels.describe()}): {names[:8]}{' …' if len(names) > 8 else ''}")
    if names:
        warnings.warn(f"export_onnx: {path.name}: {len(names)} integer layer(s) did not fuse into an integer kernel in "
                      f"ONNX Runtime and run in float ({result.kernels.describe()}): {names[:8]}"
                      f"{' …' if len(names) > 8 else ''} (ONNX Runtime fuses a QDQ layer only when it finds the whole "
                      "pattern, e.g. a convolution's output quantized)",
                      stacklevel=2)
    if verify:
        result.verification = verify_onnx(qmodel, path, batches if batches is not None else [example_inputs],
                                          tolerance=tolerance, wrap=wrap)
        if not result.verification.ok:
            message = f"export_onnx: {path.name} differs from the integer model: {result.verification.summary()}"
            if strict:
                raise ValueError(message)
            warnings.warn(message, stacklevel=2)
    return result


def _blocked_linear(m: nn.Module) -> bool:
    return isinstance(m, WeightOnlyLayer) and m.blocked and m.linear


def _layer_nodes(model, module: nn.Module, op_types: tuple, which=None) -> list:
    """``(node, layer name)`` for every node of one of ``op_types`` written inside an integer (QDQ)
    layer, or a module ``which`` accepts (the exporter records the module path of every node it
    wrote)."""
    which = which or (lambda m: isinstance(m, QDQLayer))
    paths = {p: getattr(m, "name", p) for p, m in module.named_modules() if which(m)}
    found = []
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        props = {p.key: p.value for p in node.metadata_props}
        try:
            scopes = json.loads(props.get("pkg.torch.onnx.name_scopes", "[]").replace("'", '"'))
        except ValueError:
            continue
        # scopes: ['', 'features', 'features.0', ..., op] or ['', '0', op] at the top level
        path = scopes[-2] if len(scopes) >= 2 else ""
        if path in paths:
            found.append((node, paths[path]))
    return found


def _torch_onnx_bytes(module: nn.Module, args: tuple, kwargs: dict, dynamic_mode: str = "auto",
                      opset: int = OPSET) -> bytes:
    import inspect

    _qd()  # the exporter's operator registry only sees quantized_decomposed ops loaded before it
    bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
    dynamic = {name: torch.utils._pytree.tree_map(lambda v: _dynamic(v, dynamic_mode), value)
               for name, value in bound.items()}
    # the exporter narrates each stage on stdout and logs warnings about skipped torchvision ops
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                _registry_built_once():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, args, kwargs=kwargs, dynamo=True, opset_version=opset,
                                        dynamic_shapes=dynamic, external_data=False, verbose=False,
                                        custom_translation_table={
                                            torch.ops.fewbits.dynamic_qdq_u8.default: _onnx_dynamic_qdq_u8,
                                            torch.ops.fewbits.per_token_linear.default: _onnx_per_token_linear,
                                            torch.ops.fewbits.global_avg_pool.default: _onnx_global_avg_pool,
                                            torch.ops.fewbits.blocked_dequantize.default: _onnx_blocked_dequantize})
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    buffer = io.BytesIO()
    program.save(buffer)
    return buffer.getvalue()


_REGISTRIES: dict = {}  # opset → torch.onnx's operator registry as torchlib populated it


@contextlib.contextmanager
def _registry_built_once():
    """torch.onnx populates its operator registry from torchlib on every export, most of a small
    graph's export time (about 0.9 of 1.4 s here). While this is active the first registry of each
    opset is kept and every export gets its own copy (the exporter then adds the custom
    translations to the copy). Where the exporter's internals differ, it does what it does."""
    try:
        from torch.onnx._internal.exporter import _registration

        registry_class = _registration.ONNXRegistry
        original = registry_class.__dict__["from_torchlib"]
        registry_class().functions  # noqa: B018 — the attribute the copy relies on
    except (ImportError, AttributeError, KeyError):
        yield
        return

    def from_torchlib(cls, *args, **kwargs):
        key = (cls, args, tuple(sorted(kwargs.items())))
        if key not in _REGISTRIES:
            _REGISTRIES[key] = original.__func__(cls, *args, **kwargs)
        template, registry = _REGISTRIES[key], cls.__new__(cls)
        registry.__dict__.update(template.__dict__)
        registry.functions = {target: list(decomps) for target, decomps in template.functions.items()}
        return registry

    registry_class.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        registry_class.from_torchlib = original


verify = verify_onnx  # the public name; export_onnx's ``verify`` flag shadows it there


def onnx_available() -> Optional[str]:
    """Why ONNX export cannot run here (a missing package), or None."""
    for module, package in (("onnx", "onnx"), ("onnxruntime", "onnxruntime"), ("onnxscript", "onnxscript")):
        try:
            __import__(module)
        except ImportError:
            return f"ONNX export needs {package}: pip install 'fewbits[onnx]'"
    return None


__all__ = ["export_onnx", "verify", "verify_onnx", "OnnxModel", "ExportResult", "Verification", "LayerExport",
           "KernelProfile", "int8_kernel_profile", "pair_sum_bound", "plan_layers", "export_module",
           "onnx_available", "NARROW_BITS", "WEIGHT_MODES"]
