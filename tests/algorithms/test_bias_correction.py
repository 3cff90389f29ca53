"""Empirical bias correction: the per-channel mean error of every layer goes to ~zero."""
import pytest
import torch
from torch import nn

import fewbits
from fewbits import BiasCorrection
from fewbits.wrap import Status


def _net():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8),
                      nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    return m.eval()


def _batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 8, 8, generator=g) for _ in range(n)]


def _mean_error(q, model, x, name):
    outs = {}
    hq = q.model.get_submodule(name).register_forward_hook(lambda m, a, o: outs.__setitem__("q", o))
    hf = model.get_submodule(name).register_forward_hook(lambda m, a, o: outs.__setitem__("f", o))
    with torch.no_grad():
        q(x), model(x)
    hq.remove(), hf.remove()
    dims = [0, 2, 3] if outs["f"].dim() == 4 else [0]
    return (outs["q"] - outs["f"]).mean(dims).abs().max().item()


def test_bias_correction_removes_the_mean_shift_on_its_data():
    model, batches = _net(), _batches()
    recipe = fewbits.Recipe("w3a8", (("Linear", fewbits.LayerRecipe(
        weight=fewbits.TensorRecipe(fewbits.QuantSpec(bits=3, granularity=fewbits.PerChannel(0))),
        input=fewbits.TensorRecipe(fewbits.QuantSpec(bits=8, signed=False, symmetric=False)))),
        ("Conv2d", fewbits.LayerRecipe(
            weight=fewbits.TensorRecipe(fewbits.QuantSpec(bits=3, granularity=fewbits.PerChannel(0))),
            input=fewbits.TensorRecipe(fewbits.QuantSpec(bits=8, signed=False, symmetric=False))))))
    q = fewbits.prepare(model, recipe)
    fewbits.calibrate(q, batches)
    x = torch.cat(batches)
    before = {n: _mean_error(q, model, x, n) for n in ("0", "2", "5")}
    result = fewbits.apply(q, BiasCorrection(), batches)
    after = {n: _mean_error(q, model, x, n) for n in ("0", "2", "5")}
    assert list(result.layers) == ["0", "2", "5"] and q.model[0].bias is not None  # a bias was added
    for n in before:
        # left: the int32 rounding of the new bias (half a step of s_x·s_w) and float noise
        step = (q.model.get_submodule(n).input_quantizer.scale * q.model.get_submodule(n).weight_quantizer.scale).max()
        assert after[n] <= max(before[n] / 5, step.item())


def test_bias_correction_runs_after_ranges_in_a_recipe_and_needs_them():
    base = fewbits.get_recipe("w8a8")
    from dataclasses import replace

    recipe = replace(base, name="w8a8-bc", steps=(BiasCorrection(),))
    assert fewbits.Recipe.from_json(recipe.to_json()) == recipe
    q = fewbits.prepare(_net(), recipe)
    fewbits.calibrate(q, iter(_batches()))
    assert q.status is Status.CALIBRATED and [r.step["name"] for r in q.applied] == ["bc"]
    with pytest.raises(ValueError, match="needs calibrated activation ranges"):
        fewbits.apply(fewbits.prepare(_net(), "w8a8"), BiasCorrection(), _batches())


def test_mobilenetv2_recovers_with_bias_correction(task_scores):
    scores = task_scores("mobilenetv2-probe", ("w8a8-inputs", "w8a8-bc", "w8a8"))
    # full test set: feature cosine 0.971 -> 0.994, top-1 agreement with fp32 64.7 -> 83.3 (the
    # DFQ paper's point: rounding shifts channel means and MobileNetV2 compounds them)
    plain, corrected = scores["w8a8-inputs"], scores["w8a8-bc"]
    assert corrected["feature_cosine"] >= max(0.985, plain["feature_cosine"] + 0.01)
    assert corrected["top1_agreement"] >= plain["top1_agreement"] + 5
    # the default corrects its convolutions too, with the ops between layers quantized as well
    assert scores["w8a8"]["feature_cosine"] >= max(0.985, plain["feature_cosine"] + 0.01)


def test_the_default_recipe_corrects_its_convolutions_only():
    model = _net()
    q = fewbits.calibrate(fewbits.prepare(model, "w8a8"), _batches())
    (bc,) = q.applied
    assert bc.step["types"] == ["Conv1d", "Conv2d", "Conv3d"] and list(bc.layers) == ["0", "2"]
    x = _batches(1, seed=7)[0]
    plain = fewbits.calibrate(fewbits.prepare(model, "w8a8-inputs"), _batches())
    assert _mean_error(q, model, x, "2") < _mean_error(plain, model, x, "2")
    # a model without convolutions: the default's step finds nothing and is not listed
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    assert fewbits.calibrate(fewbits.prepare(mlp, "w8a8"), [torch.randn(8, 4)]).applied == []


def test_a_given_bc_replaces_the_recipes_own_and_runs_after_calibration_steps():
    from fewbits import CrossLayerEqualization
    from fewbits.steps import parse_steps, with_steps

    own = fewbits.get_recipe("w8a8").steps
    assert with_steps(own, parse_steps("cle,bc")) == (CrossLayerEqualization(), BiasCorrection())
    assert with_steps(own, parse_steps("cle")) == (CrossLayerEqualization(), *own)
    assert with_steps(own, parse_steps("smoothquant"))[-1] == own[0]
    with pytest.raises(ValueError, match="bc types must be among"):
        BiasCorrection(types=("Embedding",))


def test_qat_without_batches_leaves_the_defaults_correction_to_training():
    from fewbits.qat import prepare_qat

    q = prepare_qat(_net(), "w8a8")
    assert q.recipe.steps == () and q.qat["left_out_steps"][0]["name"] == "bc"
    with pytest.raises(ValueError, match="calibration steps"):
        prepare_qat(_net(), "w8a8-bc")  # asked for by name: it needs the data
