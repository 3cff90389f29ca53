"""AdaRound and stochastic rounding: the math against closed forms and a brute-force optimum,
the driver on small networks, composition from API, recipe and CLI, a floor on a real task."""
import itertools

import pytest
import torch
from torch import nn

import fewbits
from fewbits.algorithms import adaround
from fewbits.numerics.affine import quantize
from fewbits.recipe import LayerRecipe, Recipe, TensorRecipe
from fewbits.spec import PerChannel, QuantSpec
from fewbits.steps import AdaRound, StochasticRounding, parse_steps

_ACT = TensorRecipe(QuantSpec(bits=8, signed=False, symmetric=False), "minmax")


def _recipe(bits: int, steps=()) -> Recipe:
    layer = LayerRecipe(weight=TensorRecipe(QuantSpec(bits=bits, granularity=PerChannel(0))), input=_ACT)
    return Recipe(f"w{bits}a8", (("Linear", layer), ("Conv2d", layer)), steps=steps)


def test_rectified_sigmoid_and_its_start():
    v = torch.tensor([-100.0, 0.0, 100.0])
    assert adaround.rectified_sigmoid(v).tolist() == [0.0, 0.5, 1.0]  # clipped: exact 0 and 1 are reachable
    scaled = torch.tensor([0.25, -1.75, 3.0, 2.9])
    h = adaround.rectified_sigmoid(adaround.initial_v(scaled))
    assert torch.allclose(h, scaled - torch.floor(scaled), atol=1e-6)  # starts at the unrounded weight
    z = torch.zeros(4)
    assert adaround.hard_levels(torch.floor(scaled), torch.tensor([-1e-3, 0.0, -5.0, 5.0]), z, -8, 7).tolist() == \
        [0.0, -1.0, 3.0, 3.0]  # up where V >= 0 (h >= 1/2), clamped to the grid


def test_regularizer_and_beta_schedule():
    assert adaround.regularizer(torch.tensor([-50.0, 50.0]), 2.0) == 0  # decided weights cost nothing
    assert adaround.regularizer(torch.tensor([0.0]), 2.0) == 1  # h = 1/2 costs the most
    schedule = [adaround.beta(i, 100, 0.2, 20.0, 2.0) for i in range(100)]
    assert schedule[:20] == [None] * 20 and schedule[20] == 20.0 and schedule[-1] == pytest.approx(2.0 + 18 / 80)
    assert all(a >= b for a, b in zip(schedule[20:], schedule[21:]))


def test_stochastic_rounding_is_unbiased_and_seeded():
    scaled = torch.rand(200_000) * 10 - 5
    z = torch.zeros(())
    levels = adaround.stochastic_levels(scaled, z, -128, 127, torch.Generator().manual_seed(0))
    assert bool(((levels == torch.floor(scaled)) | (levels == torch.ceil(scaled))).all())
    # E[level] = W/s: the mean error of 200k draws has standard deviation ≤ 0.5/√200000 ≈ 0.0011
    assert abs(float((levels - scaled).mean())) < 0.005
    again = adaround.stochastic_levels(scaled, z, -128, 127, torch.Generator().manual_seed(0))
    assert torch.equal(levels, again)


def _tiny(seed=0, n_in=6):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(n_in, 1)).eval()
    x = torch.randn(512, n_in) @ torch.randn(n_in, n_in)  # correlated inputs: nearest is not optimal
    return net, [x[i:i + 128] for i in range(0, 512, 128)]


def _brute_force_ranks(seed: int, iterations: int) -> tuple[int, int, float, dict]:
    """Rank (0 = best) of nearest rounding and of AdaRound's among all 2^6 roundings of a 3-bit
    6-weight layer, by the reconstruction loss AdaRound minimises; and AdaRound's layer record."""
    net, batches = _tiny(seed)
    q = fewbits.calibrate(fewbits.prepare(net, _recipe(3)), batches)
    layer = q.model[0]
    wq = layer.weight_quantizer
    scaled = layer.weight.detach() / wq.scale.view(-1, 1)
    floor = torch.floor(scaled)
    x = torch.cat(batches)
    with torch.no_grad():
        xq, bias, target = layer.input_quantizer(x), layer.quantized_bias(), net(x)

    def loss(levels):
        return float((nn.functional.linear(xq, levels * wq.scale.view(-1, 1), bias) - target).pow(2).mean())

    every = sorted(loss(floor + torch.tensor(bits, dtype=torch.float32).view(1, -1))
                   for bits in itertools.product((0, 1), repeat=scaled.shape[1]))
    nearest = loss(torch.round(scaled))
    result = fewbits.apply(q, AdaRound(iterations=iterations, batch_size=128), batches)
    got = loss(quantize(layer.weight.detach(), wq.scale, wq.zero_point, wq.spec).float())

    def rank(v):
        return sum(e < v * (1 - 1e-6) for e in every)

    return rank(nearest), rank(got), got / every[0], result.layers["0"]


def test_adaround_ranks_near_the_brute_force_optimum_of_tiny_layers():
    ranks = [_brute_force_ranks(seed, 1000) for seed in range(6)]
    # AdaRound is a relaxation: it need not find the optimum of the 64 roundings, but measured it
    # lands among the best 5 on every seed (ranks 1, 4, 2, 0, 1, 2 with 2,000 iterations) where
    # nearest rounding ranks 6, 4, 1, 6, 10, 0
    assert all(r_ada <= 4 for _, r_ada, _, _ in ranks), ranks
    assert sum(r_ada for _, r_ada, _, _ in ranks) < sum(r_near for r_near, _, _, _ in ranks) / 1.5, ranks
    for _, _, _, info in ranks:
        assert {"error_nearest", "error_adaround", "changed_from_nearest", "seconds"} <= set(info)


def test_rounding_steps_put_weights_on_the_grid_without_moving_the_scales():
    net, batches = _tiny(1)
    for step in (AdaRound(iterations=50), StochasticRounding(seed=3)):
        q = fewbits.calibrate(fewbits.prepare(net, _recipe(4)), batches)
        layer = q.model[0]
        scale = layer.weight_quantizer.scale.clone()
        fewbits.apply(q, step, batches)
        assert torch.equal(layer.weight_quantizer.scale, scale)
        # the float weight now is a grid point: fake quantization leaves it where it is
        assert torch.allclose(layer.quantized_weight(), layer.weight, rtol=0, atol=1e-6)


def test_adaround_needs_calibrated_ranges_and_orders_are_checked():
    net, batches = _tiny()
    q = fewbits.prepare(net, _recipe(4))
    with pytest.raises(ValueError, match="run fewbits.calibrate first"):
        fewbits.apply(q, AdaRound(iterations=5), batches)
    assert [type(s).__name__ for s in parse_steps("cle,adaround,bc")] == ["CrossLayerEqualization", "AdaRound", "BiasCorrection"]
    with pytest.raises(ValueError, match="'bc' corrects the biases .* \\['adaround'\\]"):
        parse_steps("bc,adaround")
    with pytest.raises(ValueError, match="pick one"):
        parse_steps("stochastic,adaround")
    with pytest.raises(ValueError, match="adaround warmup"):
        AdaRound(warmup=1.0)


def test_recipe_steps_run_adaround_after_calibration():
    net, batches = _tiny()
    recipe = _recipe(3, steps=(AdaRound(iterations=20),))
    assert Recipe.from_json(recipe.to_json()) == recipe
    q = fewbits.calibrate(fewbits.prepare(net, recipe), batches)
    assert [r.step["name"] for r in q.applied] == ["adaround"] and q.applied[0].layers["0"]["seconds"] >= 0


def test_fashion_cnn_3_bit_adaround_beats_nearest():
    """End-to-end floor: 3-bit weights on the fashion-cnn small set, 300 iterations per layer."""
    from fewbits.tasks import load_task

    task = load_task("fashion-cnn", small=True)
    scores = {}
    for label, steps in (("nearest", ()), ("adaround", (AdaRound(iterations=300),))):
        q = fewbits.calibrate(fewbits.prepare(task.model, _recipe(3, steps)), task.calibration)
        scores[label] = task.evaluate(q)[task.metric]
    # measured on this subset (fp32 91.25): nearest 87.6, AdaRound (300 iterations) 90.95;
    # at 2 bits 80.15 → 85.7. The floor leaves room for run-to-run changes of the fit
    assert scores["adaround"] > scores["nearest"] + 1.0, scores
