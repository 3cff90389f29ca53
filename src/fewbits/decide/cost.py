"""What a layer costs in each candidate format: deployed bytes, bit operations and an energy
estimate (the measured-latency table is a separate, machine-bound artefact).

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
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..flow import prepare
from ..lower import lower
from ..wrap.handle import as_call
from .candidates import DEFAULT_CANDIDATES, Candidate, get_candidates

# picojoules per operation or access (Horowitz, ISSCC 2014, 45 nm)
ENERGY_PJ = {"int8_mult": 0.2, "int32_add": 0.1, "fp32_mult": 3.7, "fp32_add": 0.9,
             "sram_8kb_64bit": 10.0, "dram_64bit": 1950.0}


@dataclass
class Costs:
    """Per layer: ``macs`` and ``inputs`` (input values) per sample; per layer and candidate:
    ``bytes``, ``bops``, ``energy_pj`` (absent: the layer cannot take that format)."""

    candidates: list[str]
    macs: dict[str, int] = field(default_factory=dict)
    inputs: dict[str, int] = field(default_factory=dict)
    table: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)

    def total(self, choice: dict[str, str], key: str) -> float:
        """The sum of ``key`` over the layers in the formats ``choice`` gives them."""
        return sum(self.table[name][cand][key] for name, cand in choice.items())

    def to_dict(self) -> dict:
        return {"candidates": self.candidates, "macs": self.macs, "inputs": self.inputs, "table": self.table}


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


def layer_costs(model: nn.Module, batch, candidates=DEFAULT_CANDIDATES) -> Costs:
    """Bytes, BOPs and energy of every quantizable layer of ``model`` in every candidate format;
    ``batch``: one example input (MACs are counted per sample of it). ``model`` is not modified."""
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
    return costs
