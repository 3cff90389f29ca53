"""Costs against closed forms, and the ILP against brute force."""
import itertools

import pytest
import torch
from torch import nn

import fewbits
from fewbits.decide.cost import ENERGY_PJ, layer_costs
from fewbits.decide.search import pareto_front, solve


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3, groups=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16 * 4 * 4, 10)).eval()


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)]


def test_costs_follow_the_closed_forms():
    c = layer_costs(_model(), _batches()[0], ["float", "w8a8", "w4a8", "w8"])
    # MACs per sample: output values × (input channels / groups) × kernel
    assert c.macs == {"0": 8 * 6 * 6 * 3 * 9, "2": 16 * 4 * 4 * 4 * 9, "5": 10 * 256}
    assert c.inputs == {"0": 3 * 8 * 8, "2": 8 * 6 * 6, "5": 256}
    # int8 levels, one float32 scale per output channel (symmetric: no zero point), float32 bias
    assert c.table["2"]["w8a8"]["bytes"] == 16 * 4 * 9 + 16 * 4 + 16 * 4
    assert c.table["2"]["w4a8"]["bytes"] == 16 * 4 * 9 // 2 + 16 * 4 + 16 * 4
    assert c.table["2"]["float"]["bytes"] == 4 * (16 * 4 * 9 + 16)
    assert c.table["5"]["w4a8"]["bops"] == 2560 * 4 * 8 and c.table["5"]["float"]["bops"] == 2560 * 32 * 32
    # an integer GEMM: int8 multiply scaled by the widths, int32 add; weights from DRAM, input from SRAM
    w8a8 = c.table["5"]["w8a8"]
    expected = 2560 * (ENERGY_PJ["int8_mult"] + ENERGY_PJ["int32_add"]) + w8a8["bytes"] * 8 / 64 * ENERGY_PJ[
        "dram_64bit"] + 256 * 8 / 64 * ENERGY_PJ["sram_8kb_64bit"]
    assert w8a8["energy_pj"] == pytest.approx(expected, rel=1e-12)  # the same sum in another order
    assert c.table["5"]["w8"]["energy_pj"] > w8a8["energy_pj"]  # weight-only computes in fp32


def _setup():
    model, batches = _model(), _batches()
    return fewbits.sensitivity(model, batches, cache_dir=False), layer_costs(model, batches[0])


def _brute_force(sens, costs, key, budget):
    layers = list(sens.scores)
    options = [[c for c, s in sens.scores[l].items() if s is not None and c in costs.table[l]] for l in layers]
    best = None
    for combo in itertools.product(*options):
        choice = dict(zip(layers, combo))
        if costs.total(choice, key) <= budget:
            damage = sum(sens.scores[l][c] for l, c in choice.items())
            best = damage if best is None else min(best, damage)
    return best


def test_the_ilp_finds_the_brute_force_optimum():
    sens, costs = _setup()
    cheapest = sum(min(r[c]["bytes"] for c in r) for r in costs.table.values())
    for share in (0.0, 0.1, 0.3, 0.6):
        budget = cheapest + share * (sum(r["float"]["bytes"] for r in costs.table.values()) - cheapest)
        choice = solve(sens, costs, {"bytes": budget})
        assert choice.costs["bytes"] <= budget
        # HiGHS solves to its default relative gap; these problems are small enough to be exact
        assert choice.damage == pytest.approx(_brute_force(sens, costs, "bytes", budget), rel=1e-9, abs=1e-15)


def test_the_pareto_front_runs_from_cheapest_to_lossless_and_is_not_dominated():
    sens, costs = _setup()
    front = pareto_front(sens, costs, "bytes", points=12)
    assert front[-1].damage == 0.0 and all(f == "float" for f in front[-1].formats.values())
    assert front[0].costs["bytes"] == pytest.approx(sum(min(r[c]["bytes"] for c in r) for r in costs.table.values()))
    for a, b in zip(front, front[1:]):
        assert a.costs["bytes"] <= b.costs["bytes"] and a.damage > b.damage


def test_an_impossible_budget_says_what_is_reachable():
    sens, costs = _setup()
    with pytest.raises(ValueError, match="no configuration fits.*smallest reachable"):
        solve(sens, costs, {"bytes": 10})
    with pytest.raises(ValueError, match="unknown budget keys"):
        solve(sens, costs, {"latency": 1})


def test_a_choice_becomes_a_recipe_that_quantizes_each_layer_in_its_format():
    sens, costs = _setup()
    choice = solve(sens, costs, {"bytes": 0.5 * sum(r["float"]["bytes"] for r in costs.table.values())})
    recipe = choice.recipe()
    assert fewbits.Recipe.from_json(recipe.to_json()) == recipe
    q = fewbits.calibrate(fewbits.prepare(_model(), recipe), _batches())
    for layer, cand in choice.formats.items():
        if cand == "float":
            assert layer not in q.quantized_layers()
        else:
            wq = q.quantized_layers()[layer].weight_quantizer
            assert wq.spec == fewbits.decide.CANDIDATES[cand].layer.weight.spec
