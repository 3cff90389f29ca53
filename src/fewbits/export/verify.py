"""Running an exported file in ONNX Runtime, and the parity check against the integer model."""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..convert import convert
from ..convert.layers import _IntegerLayer
from ..lower import u8_shift
from ..target import Target
from ..wrap.handle import QuantizedModel
from .plan import narrowing, read_meta


def as_call(example_inputs) -> tuple[tuple, dict]:
    """An example input (tensor, tuple of positional tensors, dict of keyword tensors) as (args, kwargs)."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise ValueError("example_inputs must be a tensor, a tuple of tensors or a dict of named tensors, "
                     f"got {type(example_inputs).__name__}")


def _feeds(names: list[str], args: tuple, kwargs: dict, path) -> dict:
    """ONNX Runtime's input dict: keyword arguments by name, the positional ones in order."""
    flat, feeds = list(args), {}
    for name in names:
        if name in kwargs:
            feeds[name] = kwargs[name]
        elif flat:
            feeds[name] = flat.pop(0)
        else:
            raise ValueError(f"{Path(path).name}: no value for ONNX input {name!r}")
    return {k: (v.detach().numpy() if isinstance(v, torch.Tensor) else v) for k, v in feeds.items()}


# 4-bit weights (MatMulNBits) computed in float, as the integer model does: by default ONNX Runtime
# quantizes their activations to int8 per block for speed, which is its choice of kernel, not the
# file's arithmetic
EXACT_4BIT = ("session.qdq_matmulnbits_accuracy_level", "0")


class OnnxModel:
    """An ONNX Runtime session called like the torch model it came from (outputs as tensors:
    one tensor, or a tuple when the graph has several outputs)."""

    def __init__(self, path, threads: int = 2, spinning: bool = False, optimized_path=None,
                 exact_4bit: bool = False) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if exact_4bit:
            options.add_session_config_entry(*EXACT_4BIT)
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        if optimized_path is not None:
            options.optimized_model_filepath = str(optimized_path)
            options.log_severity_level = 3  # the NCHWc warning about hardware-specific files is expected
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def feeds(self, *args, **kwargs) -> dict:
        return _feeds(self.inputs, args, kwargs, self.path)

    def run(self, feeds: dict) -> list:
        return self.session.run(None, feeds)

    def __call__(self, *args, **kwargs):
        outs = [torch.from_numpy(o) for o in self.run(self.feeds(*args, **kwargs))]
        return outs[0] if len(outs) == 1 else tuple(outs)


COMPOUNDED = 0.01  # share of max_differing where compounded rounding (a few levels) is accepted


@dataclass
class Verification:
    """ONNX Runtime vs the integer model on the same batches.

    At every integer layer's input (the uint8 levels ONNX Runtime quantized, against the levels
    the integer model computed): ``max_levels`` the largest difference, ``differing`` the share
    of levels that differ at all, ``worst_layer`` where the largest was. Two correct int8
    engines differ by a rare one-level flip where a requantized value lands within float
    rounding of a half level (ONNX Runtime rescales in float32, fewbits with a 31-bit
    fixed-point multiplier), and a flip moves later layers' inputs a little; a saturating
    kernel or a wrong grid shows as many levels. Along a residual chain such a flip grows by the
    ratio of an operand's scale to the sum's (ONNX Runtime's QLinearAdd rescales in float too):
    ResNet-18 shows 2–3 levels on ~1e-6 of its levels with outputs 1e-5 steps apart. ``ok``
    therefore also accepts up to ``4·tolerance`` levels on at most 1% of ``max_differing``
    (:data:`COMPOUNDED`) when the outputs stay within ``tolerance`` steps. At the outputs:
    ``max_steps`` the largest difference in steps of an 8-bit grid spanning the reference output
    ((max − min) / 255), ``max_abs`` in output units.
    """

    max_levels: int
    differing: float
    worst_layer: str
    layers: int
    max_steps: float
    mean_steps: float
    max_abs: float
    batches: int
    tolerance: float
    max_differing: float
    per_layer: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        if self.differing > self.max_differing:
            return False
        if self.max_levels <= self.tolerance:
            return True
        return (self.max_levels <= 4 * self.tolerance and self.differing <= COMPOUNDED * self.max_differing
                and self.max_steps <= self.tolerance)

    def summary(self) -> str:
        where = f" (worst: {self.worst_layer})" if self.max_levels else ""
        return (f"{self.layers} integer layers: inputs differ by at most {self.max_levels} level(s){where}, "
                f"{self.differing:.2e} of levels differ; outputs: max {self.max_steps:.3g} output steps "
                f"(mean {self.mean_steps:.2g}, max |diff| {self.max_abs:.3g}) over {self.batches} batches; "
                f"tolerance {self.tolerance:g} level(s) on <= {self.max_differing:g} of values (up to "
                f"{4 * self.tolerance:g} on <= {COMPOUNDED * self.max_differing:g}, outputs within {self.tolerance:g} steps)")

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _flat_tensors(value) -> list[torch.Tensor]:
    if hasattr(value, "to_tuple"):  # a transformers ModelOutput
        value = value.to_tuple()
    leaves, _ = torch.utils._pytree.tree_flatten(value)
    return [v for v in leaves if isinstance(v, torch.Tensor)]


def _level_probe(model, names: dict[str, str]) -> bytes:
    """The model with every integer layer's input levels as extra graph outputs."""
    import onnx

    probe = copy.deepcopy(model)
    for tensor in names:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.UINT8, None))
    return probe.SerializeToString()


def _teacher_forcing(reference: nn.Module, wanted: set[str]):
    """Hooks on the integer layers of ``reference``: each records the uint8 levels it would
    compute for its input, then continues from the levels in ``forced`` (ONNX Runtime's), so
    every layer is compared on the same input and one kernel's difference does not spread."""
    seen: dict[str, torch.Tensor] = {}
    forced: dict[str, torch.Tensor] = {}
    hooks = []
    for layer in reference.modules():
        if isinstance(layer, _IntegerLayer) and layer.name in wanted:
            def hook(mod, args, shift=u8_shift(layer.in_spec)):
                mine = mod._input(args[0]).to(torch.int32) + shift
                if mod.name in seen:  # run twice in one call: no single input to compare
                    seen[mod.name] = None
                    return None
                seen[mod.name] = mine
                theirs = forced.get(mod.name)
                if theirs is None or theirs.shape != mine.shape:
                    return None
                return (theirs - shift, *args[1:])

            hooks.append(layer.register_forward_pre_hook(hook))
    return seen, forced, hooks


@torch.no_grad()
def verify_onnx(qmodel: QuantizedModel, onnx_path, batches, *, tolerance: float = 1.0,
                max_differing: float = 1e-3, wrap=None) -> Verification:
    """Run ``onnx_path`` in ONNX Runtime and the integer model (``fewbits.convert``) of ``qmodel``
    — narrowed as the file's metadata says — on ``batches``, and compare each integer layer's
    input levels and the outputs (see :class:`Verification`). The integer model is teacher-
    forced: every layer continues from ONNX Runtime's input levels, so a difference is charged
    to the kernel (and float island) that made it instead of every layer after it.
    ``tolerance``: level difference allowed; ``max_differing``: share of levels allowed to differ."""
    import onnxruntime as ort

    path = Path(onnx_path)
    model, plan, meta = read_meta(path)
    if {e.name for e in plan} != set(qmodel.quantized_layers()):
        raise ValueError(f"{path.name} was exported from a model with other quantized layers than this one")
    probes = meta.get("input_levels", {})
    reference = convert(qmodel, Target.reference(weight_bits=narrowing(plan)))
    runner = reference.model if wrap is None else wrap(reference.model)
    seen, forced, hooks = _teacher_forcing(reference.model, set(probes.values()))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.add_session_config_entry(*EXACT_4BIT)
    session = ort.InferenceSession(_level_probe(model, probes), options, providers=["CPUExecutionProvider"])
    input_names = [i.name for i in session.get_inputs()]
    n_out = len(model.graph.output)
    worst_steps, total, count, worst_abs, n_batches = 0.0, 0.0, 0, 0.0, 0
    per_layer: dict[str, list] = {}
    try:
        for batch in batches:
            args, kwargs = as_call(batch)
            got = session.run(None, _feeds(input_names, args, kwargs, path))
            seen.clear()
            forced.clear()
            forced.update({layer: torch.from_numpy(got[n_out + i].astype("int32"))
                           for i, layer in enumerate(probes.values())})
            ref = _flat_tensors(runner(*args, **kwargs))
            if n_out != len(ref):
                raise ValueError(f"{path.name} has {n_out} outputs, the model returns {len(ref)}")
            for i, (r, o) in enumerate(zip(ref, got[:n_out])):
                r, o = r.float(), torch.from_numpy(o).float()
                if o.shape != r.shape:
                    raise ValueError(f"{path.name}: output {i} has shape {tuple(o.shape)}, the model gives {tuple(r.shape)}")
                step = float(r.max() - r.min()) / 255 or 1.0
                diff = (o - r).abs()
                worst_abs = max(worst_abs, float(diff.max()))
                worst_steps = max(worst_steps, float((diff / step).max()))
                total += float((diff / step).sum())
                count += diff.numel()
            for layer, mine in seen.items():
                theirs = forced.get(layer)
                if mine is None or theirs is None or theirs.shape != mine.shape:
                    continue
                d = (theirs - mine).abs()
                stats = per_layer.setdefault(layer, [0, 0, 0])
                stats[0] = max(stats[0], int(d.max()))
                stats[1] += int((d > 0).sum())
                stats[2] += d.numel()
            n_batches += 1
    finally:
        for h in hooks:
            h.remove()
    if n_batches == 0:
        raise ValueError("verify: no batches")
    max_levels = max((v[0] for v in per_layer.values()), default=0)
    worst_layer = max(per_layer, key=lambda k: per_layer[k][0], default="")
    differing = sum(v[1] for v in per_layer.values()) / max(sum(v[2] for v in per_layer.values()), 1)
    return Verification(max_levels, differing, worst_layer, len(per_layer), worst_steps, total / max(count, 1),
                        worst_abs, n_batches, tolerance, max_differing,
                        {k: {"max_levels": v[0], "differing": v[1] / max(v[2], 1)} for k, v in per_layer.items()})


verify = verify_onnx  # the public name; export_onnx's ``verify`` flag shadows it there
