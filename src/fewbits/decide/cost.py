"""What a layer costs in each candidate format: deployed bytes, bit operations and an energy
estimate, and with a measured latency table (:mod:`fewbits.decide.latency`) seconds per call.

- **bytes**: the weight as it deploys — its levels at their packed width plus scales and zero
  points (:meth:`fewbits.lower.LayerRecord.weight_bytes`, the same number the report's size
  sums), the bias in float32; ``float``: float32 weight and bias.
- **BOPs** (bit operations, as in HAWQ-v3 / Baskin et al.): ``MACs × weight bits × activation
  bits`` per sample, 32 for a float operand.
- **energy** per sample, from Horowitz, "Computing's energy problem (and what we can do about
  it)", ISSCC 2014, table for 45 nm at 0.9 V: an integer GEMM pays per MAC an int8 multiply
  scaled by ``(b_w · b_a) / 64`` (an array multiplier grows with the product of its operand
  widths) and an int32 add; a float or weight-only layer (weights dequantized, fp32 arithmetic)
  an fp32 multiply and add. Weights are read once from DRAM (1.3–2.6 nJ per 64 bits: the
  midpoint, 1.95 nJ), the layer's input once from an 8 KB SRAM (10 pJ per 64 bits) at its width.
  A model, not a measurement: it says what the precision buys in arithmetic and traffic.
- **latency_s** (given a :class:`~fewbits.decide.latency.LayerLatency`): the layer alone in its
  format in ONNX Runtime; the whole model's is the float ops between layers (``constant``) plus
  the layers' (an integer linear layer behind a ReLU measured alone has a float output: its
  cell adds the output grid it needs in the model, a quantization and a dequantization), minus
  on each chain edge (``chains``, :mod:`fewbits.decide.graph`) what the pair, timed alone in the
  two layers' domains, saves against the two alone (``chain_savings``): the conversions two integer
  layers skip, the layout changes two float ones share, the reorders a weight-only neighbour adds
  (a negative saving).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..flow import prepare
from ..lower import lower
from ..wrap.handle import as_call
from .candidates import CANDIDATES, DEFAULT_CANDIDATES, Candidate, get_candidates
from .graph import CONV_TYPES, layer_readers

# picojoules per operation or access (Horowitz, ISSCC 2014, 45 nm)
ENERGY_PJ = {"int8_mult": 0.2, "int32_add": 0.1, "fp32_mult": 3.7, "fp32_add": 0.9,
             "sram_8kb_64bit": 10.0, "dram_64bit": 1950.0}


@dataclass
class Costs:
    """Per layer: ``macs`` and ``inputs`` (input values) per sample, its module ``types``; per
    layer and candidate: ``bytes``, ``bops``, ``energy_pj`` and, when measured, ``latency_s``
    (absent: the layer cannot take that format). ``heads``: the layers that need a quantized
    output to run on integers; ``chains``: the edges ``(a, b)`` of such a layer ``a`` read by layer
    ``b`` alone; ``chain_savings[i]``: what edge ``i`` saves per domain pair (``"integer|float"``:
    ``a`` integer, ``b`` float; :attr:`Candidate.domain`) and cost key against its two layers
    alone (negative: the pair costs more); ``constant``: the part of a cost no layer's format changes."""

    candidates: list[str]
    macs: dict[str, int] = field(default_factory=dict)
    inputs: dict[str, int] = field(default_factory=dict)
    table: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)
    heads: list = field(default_factory=list)
    chains: list = field(default_factory=list)
    chain_savings: list = field(default_factory=list)
    constant: dict = field(default_factory=dict)
    groups: list = field(default_factory=list)  # {"members": {layer: [domains]}, key: saving}: fewbits.decide.layout
    calibration: dict = field(default_factory=dict)  # {"integer_savings_scale": k} (_calibrate_integer)

    def total(self, choice: dict[str, str], key: str) -> float:
        """``key`` of the model with the layers in the formats ``choice`` gives them (the
        constant part, the chains' and the groups' savings included)."""
        value = self.constant.get(key, 0.0) + sum(self.table[name][cand][key] for name, cand in choice.items())
        for (a, b), saving in zip(self.chains, self.chain_savings):
            if a in choice and b in choice:
                value -= saving.get(f"{domain(choice[a])}|{domain(choice[b])}", {}).get(key, 0.0)
        for group in self.groups:
            if all(m in choice and domain(choice[m]) in doms for m, doms in group["members"].items()):
                value -= group.get(key, 0.0)
        return value

    def to_dict(self) -> dict:
        return {"candidates": self.candidates, "macs": self.macs, "inputs": self.inputs, "table": self.table,
                "types": self.types, "heads": self.heads, "chains": [list(c) for c in self.chains], "chain_savings": self.chain_savings,
                "constant": self.constant, "groups": self.groups, "calibration": self.calibration}


def is_integer(candidate: str) -> bool:
    """Whether a format runs the layer on an integer kernel (its inputs quantized)."""
    return CANDIDATES[candidate].act_bits is not None


def domain(candidate: str) -> str:
    """How a format runs deployed (:attr:`Candidate.domain`)."""
    return CANDIDATES[candidate].domain


def layer_energy_pj(macs: int, inputs: int, weight_bytes: int, weight_bits, act_bits) -> float:
    """The energy model above for one layer and sample."""
    if weight_bits is not None and act_bits is not None:  # an integer GEMM
        per_mac = ENERGY_PJ["int8_mult"] * weight_bits * act_bits / 64 + ENERGY_PJ["int32_add"]
    else:
        per_mac = ENERGY_PJ["fp32_mult"] + ENERGY_PJ["fp32_add"]
    memory = weight_bytes * 8 / 64 * ENERGY_PJ["dram_64bit"]
    memory += inputs * (act_bits or 32) / 64 * ENERGY_PJ["sram_8kb_64bit"]
    return macs * per_mac + memory


def _macs_and_inputs(model: nn.Module, names: list[str], batch) -> tuple[dict, dict]:
    """MACs and input values per sample of every layer in ``names``, from one forward of ``batch``."""
    args, kwargs = as_call(batch, 0)
    first = next(v for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor))
    samples = max(1, first.shape[0])
    macs, inputs = {}, {}

    def hook(name):
        def count(module, a, out):
            x = a[0]
            if isinstance(module, nn.Linear):
                m = out.numel() * module.in_features
            elif isinstance(module, nn.modules.conv._ConvTransposeNd):
                m = x.numel() * (module.out_channels // module.groups) * math.prod(module.kernel_size)
            elif isinstance(module, nn.modules.conv._ConvNd):
                m = out.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
            else:  # an embedding: a lookup
                m = 0
            macs[name] = macs.get(name, 0) + m // samples
            inputs[name] = inputs.get(name, 0) + (x.numel() // samples if x.is_floating_point() else 0)
        return count

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return macs, inputs


def layer_costs(model: nn.Module, batch, candidates=DEFAULT_CANDIDATES, latency=None) -> Costs:
    """Bytes, BOPs and energy of every quantizable layer of ``model`` in every candidate format;
    ``batch``: one example input (MACs are counted per sample of it); ``latency``: a
    :class:`~fewbits.decide.latency.LayerLatency` of the same model and candidates
    (:func:`~fewbits.decide.latency.latency_table`) adds ``latency_s``. ``model`` is not modified."""
    chosen: list[Candidate] = get_candidates(candidates)
    costs = Costs([c.name for c in chosen])
    records, float_model = {}, None
    for cand in chosen:
        if cand.layer is None:
            continue
        q = prepare(model, cand.recipe())
        if float_model is None:
            float_model = q.float_model
        records[cand.name] = lower(q, calibrated=False).layers
    if float_model is None:
        raise ValueError("layer_costs: give at least one candidate besides 'float'")
    names = sorted({n for layers in records.values() for n in layers})
    costs.macs, costs.inputs = _macs_and_inputs(float_model, names, batch)
    costs.types = {n: type(float_model.get_submodule(n)).__name__ for n in names}
    readers = layer_readers(float_model, names, batch)
    costs.heads, costs.chains = sorted(readers.heads()), readers.chains()
    costs.chain_savings = [{} for _ in costs.chains]
    for name in names:
        layer = float_model.get_submodule(name)
        weight = layer.weight.numel()
        bias = 4 * layer.bias.numel() if getattr(layer, "bias", None) is not None else 0
        macs, inputs = costs.macs.get(name, 0), costs.inputs.get(name, 0)
        row = {}
        for cand in chosen:
            if cand.layer is None:
                wbytes, wbits, abits = 4 * weight, None, None
            elif name in records[cand.name] and records[cand.name][name].qweight is not None:
                wbytes, wbits, abits = records[cand.name][name].weight_bytes(), cand.weight_bits, cand.act_bits
            else:
                continue
            row[cand.name] = {"bytes": wbytes + bias, "bops": macs * (wbits or 32) * (abits or 32),
                              "energy_pj": layer_energy_pj(macs, inputs, wbytes + bias, wbits, abits)}
        costs.table[name] = row
    if latency is not None:
        _add_latency(costs, latency)
    return costs


def _add_latency(costs: Costs, latency) -> None:
    """``latency_s`` per layer and format from the measured table; a layer or format it does not
    hold is an error naming them."""
    missing = [f"{n} | {c}" for n, row in costs.table.items() for c in row if c not in latency.seconds.get(n, {})]
    if missing:
        raise ValueError(f"the latency table ({latency.path}) has no entry for {len(missing)} layer format(s), e.g. "
                         f"{missing[:3]}; build it from the same model and candidates (latency_table)")
    conv = latency.conversions

    def own_grid(n):  # what an output grid of its own adds to a layer measured with a float output
        return 0.0 if costs.types[n] in CONV_TYPES else conv[n]["quantize_output"] + conv[n]["dequantize_output"]

    for n, row in costs.table.items():
        for c, cell in row.items():
            # an integer sibling's input quantization is its group's (fewbits.decide.layout)
            cell["latency_s"] = latency.seconds[n][c] + ((own_grid(n) if n in costs.heads else 0.0)
                                                         - latency.shared_input.get(n, 0.0) if is_integer(c) else 0.0)
    costs.groups = [dict(g) for g in latency.groups]
    costs.constant["latency_s"] = latency.rest_s
    for (a, b), saving in zip(costs.chains, costs.chain_savings):
        measured = dict(latency.chain_savings.get((a, b), {}))
        # a pair not measured (its ops not replayable): two integer layers skip the conversions between them
        measured.setdefault("integer|integer", conv[a]["dequantize_output"] + conv[b]["quantize_input"])
        for combo, value in measured.items():
            # an integer head handing on loses the output grid its cell carries
            saving.setdefault(combo, {})["latency_s"] = value + (own_grid(a) if combo == "integer|integer" else 0.0)
    _calibrate_integer(costs, latency.integer_anchor)


def _calibrate_integer(costs: Costs, anchor: dict) -> None:
    """Scale what integer neighbours save (chain edges ``integer|integer``, integer groups) so that
    the model with every layer it can be integer predicts its measured time (``anchor``), as the
    fp32 model measured fixes ``constant``. Timed alone, the conversions and layout changes
    between two integer layers do not add up to what a whole integer model skips (MobileNetV2
    probe, every layer ``w8a8``: +18.6% in ``benchmarks/mixed.py --sections fronts``, +34% without
    this and the in-model ratios in ``benchmarks/latency_model.py``); the factor is
    ``costs.calibration["integer_savings_scale"]``."""
    if not anchor or set(anchor["formats"]) != set(costs.table):
        return
    formats = anchor["formats"]
    active = [s["integer|integer"] for (a, b), s in zip(costs.chains, costs.chain_savings)
              if "integer|integer" in s and is_integer(formats[a]) and is_integer(formats[b])]
    integer_groups = [g for g in costs.groups if all(doms == ["integer"] for doms in g["members"].values())]
    active += [g for g in integer_groups if all(is_integer(formats[m]) for m in g["members"])]
    saved = sum(v.get("latency_s", 0.0) for v in active)
    if saved <= 0:
        return
    scale = max(0.0, 1.0 + (costs.total(formats, "latency_s") - anchor["seconds"]) / saved)
    for s in costs.chain_savings:
        if "integer|integer" in s:
            s["integer|integer"]["latency_s"] *= scale
    for g in integer_groups:
        g["latency_s"] *= scale
    costs.calibration["integer_savings_scale"] = scale
