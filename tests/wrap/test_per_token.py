"""Per-token dynamic activations: one uint8 grid per row from each batch, simulated exactly as
torch's per-channel fake quantization of the rows, and deployed on ONNX Runtime's MatMulInteger."""
import pytest
import torch
from torch import nn

import fewbits
from fewbits.recipe import LayerRecipe, TensorRecipe, fitted_to
from fewbits.spec import PerToken, QuantSpec, granularity_from_dict, granularity_to_dict
from fewbits.wrap.quantizer import TensorQuantizer

_U8_TOKEN = QuantSpec(bits=8, signed=False, symmetric=False, granularity=PerToken())


def test_each_row_gets_its_own_grid():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 16, generator=g) * torch.logspace(-2, 1, 7).reshape(1, 7, 1)
    q = TensorQuantizer(TensorRecipe(_U8_TOKEN, dynamic=True), "t", "input")
    rows = x.reshape(-1, 16)
    lo, hi = rows.min(1).values.clamp(max=0), rows.max(1).values.clamp(min=0)
    scale = torch.clamp((hi - lo) / 255, min=torch.finfo(torch.float32).eps)
    zero_point = torch.clamp(-torch.round(lo / scale), 0, 255).int()
    expected = torch.fake_quantize_per_channel_affine(rows, scale, zero_point, 0, 0, 255).reshape(x.shape)
    # torch multiplies by 1/scale as fewbits does: bit-exact
    assert torch.equal(q(x), expected)


def test_per_token_is_dynamic_and_for_activations_only():
    with pytest.raises(ValueError, match="needs dynamic=True"):
        TensorRecipe(_U8_TOKEN)
    with pytest.raises(ValueError, match="quantize activations, not weights"):
        TensorQuantizer(TensorRecipe(_U8_TOKEN, dynamic=True), "fc.weight", "weight")
    assert granularity_from_dict(granularity_to_dict(PerToken())) == PerToken()
    assert fewbits.get_recipe("w8a8-per-token").to_dict() == fewbits.Recipe.from_dict(
        fewbits.get_recipe("w8a8-per-token").to_dict()).to_dict()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8)).eval()


def _batches(n=3):
    g = torch.Generator().manual_seed(1)
    # rows of very different ranges: where one grid per tensor loses the small rows
    return [torch.randn(2, 12, 32, generator=g) * torch.logspace(-2, 1, 12).reshape(1, 12, 1) for _ in range(n)]


def test_per_token_beats_per_tensor_on_rows_of_different_ranges():
    model, batches = _model(), _batches()
    errors = {}
    for recipe in ("w8a8-per-token", "w8a8-dynamic"):
        q = fewbits.calibrate(fewbits.prepare(model, recipe), batches)
        with torch.no_grad():
            errors[recipe] = float((q(batches[2]) - model(batches[2])).pow(2).mean())
    assert errors["w8a8-per-token"] < 0.5 * errors["w8a8-dynamic"]


def test_per_token_layers_export_on_matmul_integer(tmp_path):
    pytest.importorskip("onnxruntime")
    from fewbits.export.onnx import OnnxModel

    model, batches = _model(), _batches()
    # prepared at the width this CPU's int8 kernels run exactly (7 bits on AVX2 without VNNI), so
    # the file needs no narrowing and the simulation is its reference
    recipe = fitted_to(fewbits.get_recipe("w8a8-per-token"), fewbits.Target.onnxruntime())
    q = fewbits.calibrate(fewbits.prepare(model, recipe), batches)
    records = fewbits.lower(q, fewbits.Target.onnxruntime()).layers
    assert not any(r.narrowed_from for r in records.values())
    assert all(r.kind.value == "integer-dynamic" and r.per_token for r in records.values())
    result = fewbits.export_onnx(q, batches[0], tmp_path / "m.onnx", batches=batches[:2])
    assert result.kernels.integer == 2 and result.kernels.ops.get("MatMulInteger") == 2
    session = OnnxModel(tmp_path / "m.onnx")
    got = torch.from_numpy(session.run(session.feeds(batches[2]))[0])
    with torch.no_grad():
        sim = q(batches[2])
    # the same levels and integer products; float32 rounding of the row scales' products only
    assert torch.allclose(got, sim, atol=1e-5 * float(sim.abs().max()), rtol=0)


def test_per_token_on_a_convolution_runs_simulated():
    recipe = fewbits.Recipe("c", (("Conv1d", LayerRecipe(weight=TensorRecipe(QuantSpec(bits=8)),
                                                         input=TensorRecipe(_U8_TOKEN, dynamic=True))),))
    q = fewbits.calibrate(fewbits.prepare(nn.Sequential(nn.Conv1d(4, 4, 3)), recipe), [torch.randn(2, 4, 9)])
    (record,) = fewbits.lower(q, fewbits.Target.onnxruntime()).layers.values()
    assert record.kind.value == "simulated" and "linear layers" in record.reason
