"""GPTQ: the math against closed forms, the driver on small layers (grid, groups, activation
order), composition, and a floor on a real task."""
import pytest
import torch
from torch import nn

import fewbits
from fewbits.algorithms import gptq
from fewbits.numerics.affine import quantize
from fewbits.recipe import LayerRecipe, Recipe, TensorRecipe
from fewbits.spec import PerChannel, PerGroup, QuantSpec
from fewbits.steps import GPTQ, parse_steps

_ACT = TensorRecipe(QuantSpec(bits=8, signed=False, symmetric=False), "minmax")


def _recipe(bits: int, granularity=PerChannel(0), acts=True, steps=()) -> Recipe:
    layer = LayerRecipe(weight=TensorRecipe(QuantSpec(bits=bits, granularity=granularity)), input=_ACT if acts else None)
    return Recipe(f"w{bits}", (("Linear", layer), ("Conv2d", layer)), steps=steps)


def test_identity_hessian_gives_nearest_rounding():
    torch.manual_seed(0)
    w = torch.randn(5, 12)
    scale = w.abs().amax(1, keepdim=True) / 7
    levels, _, _ = gptq.gptq(w, torch.eye(12) * 3.0, scale, torch.zeros(5, 1), -8, 7, block_size=5)
    # uncorrelated inputs: no column's error can be compensated by another, GPTQ is round-to-nearest
    assert torch.equal(levels, torch.clamp(torch.round(w.double() / scale.double()), -8, 7))


def _problem(seed: int, samples: int, cols: int, rows: int):
    """Correlated inputs, a weight, its Hessian and 4-bit per-row scales."""
    torch.manual_seed(seed)
    x = torch.randn(samples, cols) @ torch.randn(cols, cols)
    w = torch.randn(rows, cols)
    h, n = gptq.hessian(x)
    return x, w, h, n, w.abs().amax(1, keepdim=True) / 7, torch.zeros(rows, 1)


def test_error_feedback_beats_nearest_on_correlated_inputs():
    x, w, h, n, scale, zero = _problem(1, 4096, 16, 8)
    nearest = torch.clamp(torch.round(w / scale), -8, 7) * scale
    errors = {}
    for act_order in (False, True):
        levels, s, _ = gptq.gptq(w, h, scale, zero, -8, 7, block_size=4, act_order=act_order)
        errors[act_order] = gptq.output_error(w.double() - levels * s, h, n)
    base = gptq.output_error(w.double() - nearest.double(), h, n)
    # the output error the update minimises: measured 1.7× below nearest rounding here, 2.3× with
    # activation order (the paper's gain from quantizing the columns that matter most first)
    assert errors[False] < base / 1.5 and errors[True] < errors[False], (errors, base)
    # output_error is the mean ‖E x‖² over the rows of x
    e = (w - nearest).double()
    assert gptq.output_error(e, h, n) == pytest.approx(float((x.double() @ e.T).pow(2).sum(1).mean()), rel=1e-9)


def test_blocks_do_not_change_the_result():
    _, w, h, _, scale, zero = _problem(2, 512, 10, 3)
    a, _, _ = gptq.gptq(w, h, scale, zero, -8, 7, block_size=10)
    b, _, _ = gptq.gptq(w, h, scale, zero, -8, 7, block_size=3)  # lazy batch updates: same arithmetic, other order
    assert torch.equal(a, b)


def _layer_and_batches(seed=0, n_in=64):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(n_in, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    mix = torch.randn(n_in, n_in)
    return net, [torch.randn(128, n_in) @ mix for _ in range(4)]


def test_driver_puts_weights_on_the_grid_of_the_refitted_groups():
    net, batches = _layer_and_batches()
    q = fewbits.calibrate(fewbits.prepare(net, _recipe(4, PerGroup(16, axis=1), acts=False)), batches)
    layer = q.model[0]
    shape = layer.weight_quantizer.scale.shape
    result = fewbits.apply(q, GPTQ(block_size=32), batches)
    wq = layer.weight_quantizer
    assert wq.scale.shape == shape  # groups re-fitted in place
    levels = quantize(layer.weight.detach(), wq.scale, wq.zero_point, wq.spec)
    back = (levels.float() - wq.zero_point.float().repeat_interleave(16, 1)) * wq.scale.repeat_interleave(16, 1)
    assert torch.allclose(back, layer.weight, atol=1e-6)  # every weight is a grid point
    info = result.layers["0"]
    assert info["error_gptq"] < info["error_nearest"] / 1.5, info


def test_conv_layers_use_unfolded_patches():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2)).eval()
    batches = [torch.randn(4, 3, 10, 10) for _ in range(3)]
    q = fewbits.calibrate(fewbits.prepare(net, _recipe(3)), batches)
    result = fewbits.apply(q, GPTQ(), batches)
    assert result.layers["0"]["error_gptq"] < result.layers["0"]["error_nearest"]
    assert [s.name for s in result.skipped] == ["2"]  # the grouped convolution is listed


def test_steps_and_errors():
    assert [type(s).__name__ for s in parse_steps("smoothquant,gptq,bc")] == ["SmoothQuant", "GPTQ", "BiasCorrection"]
    with pytest.raises(ValueError, match="pick one"):
        parse_steps("gptq,adaround")
    with pytest.raises(ValueError, match="gptq needs damp"):
        GPTQ(damp=0)
    net, batches = _layer_and_batches()
    with pytest.raises(ValueError, match="run fewbits.calibrate first"):
        fewbits.apply(fewbits.prepare(net, _recipe(4)), GPTQ(), batches)


def test_fashion_cnn_3_bit_gptq_beats_nearest():
    """End-to-end floor on the fashion-cnn small set, 3-bit per-channel weights, 8-bit inputs."""
    from fewbits.tasks import load_task

    task = load_task("fashion-cnn", small=True)
    scores = {}
    for label, steps in (("nearest", ()), ("gptq", (GPTQ(),))):
        q = fewbits.calibrate(fewbits.prepare(task.model, _recipe(3, steps=steps)), task.calibration)
        scores[label] = task.evaluate(q)[task.metric]
    # measured on this subset (fp32 91.25): nearest 87.6, GPTQ 90.9 (2 bits: 80.15 → 90.1); the floor
    # leaves room for changes of the fit
    assert scores["gptq"] > scores["nearest"] + 1.0, scores


def test_rounded_model_deploys_unchanged(tmp_path):
    """GPTQ's (and AdaRound's) grid weights go through convert and the ONNX export as they are."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from fewbits.tasks import load_task

    task = load_task("fashion-cnn", small=True)
    q = fewbits.calibrate(fewbits.prepare(task.model, _recipe(4, steps=(GPTQ(),))), task.calibration)
    # measured: simulated = integer = 90.8 on this subset; a one-level difference at a half step
    # could move one of its 400 images (0.25 point), no more
    assert abs(task.evaluate(fewbits.convert(q))[task.metric] - task.evaluate(q)[task.metric]) <= 0.25
    result = fewbits.export_onnx(q, task.calibration[0][:2], tmp_path / "g.onnx", batches=task.calibration[:2])
    assert result.verification.ok and {e.mode for e in result.layers} == {"int8"}


class _Chain(nn.Module):
    """The same layers called in turn by a forward of its own: no stack to stage, so every layer's
    inputs come from running the model from its input (the whole-prefix driver)."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for m in self.layers:
            x = m(x)
        return x


def test_staged_gptq_equals_the_whole_prefix_driver_and_takes_a_layer_list():
    torch.manual_seed(4)
    staged = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 8)).eval()
    prefix = _Chain([nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 8)]).eval()
    prefix.layers.load_state_dict(staged.state_dict())
    batches = [torch.randn(32, 16) for _ in range(3)]
    out = {}
    for key, net, names in (("staged", staged, ["0", "4"]), ("prefix", prefix, ["layers.0", "layers.4"])):
        q = fewbits.calibrate(fewbits.prepare(net, _recipe(3)), batches)
        result = fewbits.apply(q, GPTQ(layers=names), batches)  # a list of names: the middle layer keeps nearest
        assert list(result.layers) == names
        out[key] = [m.weight.detach().clone() for m in q.model.modules() if isinstance(m, nn.Linear)]
    for a, b in zip(out["staged"], out["prefix"]):
        assert torch.equal(a, b)  # the same float ops on the same inputs: bit-equal
