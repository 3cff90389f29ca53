"""The lowering: one deployed kind per layer and target, and every artefact built from its records."""
import copy

import pytest
import torch
from torch import nn

import fewbits
from fewbits.lower import Kind, deployed_kind, lower
from fewbits.numerics.packing import unpack
from fewbits.recipe import LayerRecipe, Recipe, TensorRecipe
from fewbits.spec import PerChannel, PerGroup, Pow2Spec, QuantSpec
from fewbits.target import EXACT, Target, int8_kernel_profile

W8 = TensorRecipe(QuantSpec(bits=8, granularity=PerChannel(0)))
A8 = TensorRecipe(QuantSpec(bits=8, signed=False, symmetric=False), "minmax")
DYN = TensorRecipe(QuantSpec(bits=8, signed=False, symmetric=False), dynamic=True)
ONNX = Target.onnxruntime(EXACT)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 16),
                         nn.ReLU(), nn.Linear(16, 4)).eval()


def _batches(n=3):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 6, 6, generator=g) for _ in range(n)]


def _layer(layer_recipe, module=None):
    """One calibrated quantized layer with ``layer_recipe``."""
    module = module or nn.Linear(12, 6)
    recipe = Recipe("one", ((type(module).__name__, layer_recipe),))
    q = fewbits.prepare(nn.Sequential(module).eval(), recipe)
    x = torch.randn(16, 3, 6, 6) if isinstance(module, nn.Conv2d) else torch.randn(16, 12)
    fewbits.calibrate(q, [x])
    return q, q.quantized_layers()["0"]


@pytest.mark.parametrize("layer_recipe, module, reference, onnx", [
    (LayerRecipe(weight=W8, input=A8), None, Kind.INTEGER, Kind.INTEGER),
    (LayerRecipe(weight=TensorRecipe(QuantSpec(bits=12, granularity=PerChannel(0))), input=A8), None,
     Kind.INTEGER, Kind.SIMULATED),  # the reference kernels take any width, ORT int8 only
    (LayerRecipe(weight=TensorRecipe(QuantSpec(bits=8, symmetric=False, granularity=PerChannel(0))), input=A8),
     None, Kind.INTEGER, Kind.SIMULATED),  # ORT's per-channel kernels need zero weight zero points
    (LayerRecipe(weight=W8, input=DYN), None, Kind.SIMULATED, Kind.INTEGER_DYNAMIC),
    (LayerRecipe(weight=W8), None, Kind.WEIGHT_ONLY, Kind.WEIGHT_ONLY),
    (LayerRecipe(weight=TensorRecipe(QuantSpec(bits=4, granularity=PerGroup(4)))), None, Kind.WEIGHT_ONLY,
     Kind.WEIGHT_ONLY),  # per-group scales: a blocked DequantizeLinear (opset 21)
    (LayerRecipe(weight=W8, input=A8, output=A8), None, Kind.INTEGER, Kind.INTEGER),  # requantized into its grid
    (LayerRecipe(weight=W8, input=A8, output=DYN), None, Kind.SIMULATED, Kind.SIMULATED),  # no dynamic output grid
    (LayerRecipe(weight=W8, output=A8), None, Kind.SIMULATED, Kind.SIMULATED),  # float inputs: no accumulator
    (LayerRecipe(weight=TensorRecipe(Pow2Spec(bits=4, granularity=PerChannel(0)))), None, Kind.DECODED, Kind.DECODED),
    (LayerRecipe(weight=W8, input=TensorRecipe(QuantSpec(bits=8, signed=False, symmetric=False,
                                                         granularity=PerChannel(1)), "minmax")),
     None, Kind.SIMULATED, Kind.SIMULATED),  # an integer GEMM needs one input scale
    (LayerRecipe(weight=W8, input=A8), nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), Kind.SIMULATED,
     Kind.SIMULATED),  # integer convolution pads with the zero point only
])
def test_one_rule_decides_each_kind_per_engine(layer_recipe, module, reference, onnx):
    _, layer = _layer(layer_recipe, module)
    kinds = [deployed_kind(layer, t)[0] for t in (Target.reference(), ONNX)]
    assert kinds == [reference, onnx]
    assert all(deployed_kind(layer, t)[1] for t in (Target.reference(), ONNX) if deployed_kind(layer, t)[0] is
               Kind.SIMULATED)  # a layer that stays simulated says why


def test_a_conv_with_circular_padding_converts_as_a_simulated_island():
    q, _ = _layer(LayerRecipe(weight=W8, input=A8), nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"))
    im = fewbits.convert(q)  # it used to raise inside convert
    assert [(i.name, "padding_mode" in i.reason) for i in im.float_islands] == [("0", True)]
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(im(x), q(x))


def test_records_are_what_every_artefact_holds(tmp_path):
    q = fewbits.prepare(_net(), "w8a8")
    fewbits.calibrate(q, _batches())
    before = copy.deepcopy(q.state_dict())
    records = lower(q).layers
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())  # lowering changes nothing
    im = fewbits.convert(q)
    packed = fewbits.load(fewbits.save(q, tmp_path / "m.fewbits"))
    for name, r in records.items():
        assert r.kind is Kind.INTEGER
        layer = q.quantized_layers()[name]
        # the integer model's weights and bias are the record's
        got = im.model.get_submodule(name)
        assert torch.equal(got.qweight, r.qweight.reshape(r.weight_shape)) and torch.equal(got.bias_q, r.bias_q)
        assert torch.equal(packed.qdata(name), r.qweight)  # the packed file's too
        # the int32 bias: round(b / (s_x·s_w)) in closed form, and the simulation adds exactly it
        acc = layer.input_quantizer.scale.double() * layer.weight_quantizer.scale.double().reshape(-1)
        assert torch.equal(r.bias_q, torch.round(layer.bias.double() / acc).to(torch.int32))
        assert torch.equal(layer.quantized_bias(), (r.bias_q.double() * r.acc_scale).float())


def test_the_target_narrows_in_the_record_only():
    q = fewbits.prepare(_net(), "w8a8")
    fewbits.calibrate(q, _batches())
    avx2 = lower(q, Target.onnxruntime(int8_kernel_profile({"avx2"}, "x86_64"), "narrow")).layers
    assert all(r.narrowed_from == 8 and r.weight_bits == 7 and int(r.qweight.abs().max()) <= 64 for r in avx2.values())
    assert all(r.narrowed_from is None for r in lower(q).layers.values())
    assert q.quantized_layers()["0"].weight_quantizer.spec.bits == 8
    # a recorded narrowing rebuilds the same integers on the reference engine (what verify does)
    again = lower(q, Target.reference(weight_bits=(("3", 7),))).layers
    assert torch.equal(again["3"].qweight, avx2["3"].qweight) and again["0"].narrowed_from is None


def test_target_refuses_unknown_engines_and_weight_modes():
    with pytest.raises(ValueError, match="engine must be one of"):
        Target("tensorrt")
    with pytest.raises(ValueError, match="weights must be one of"):
        Target.onnxruntime(EXACT, "half")


def test_size_is_the_records_bytes_plus_the_float_rest():
    q = fewbits.prepare(_net(), "w4a8")
    fewbits.calibrate(q, _batches())
    records = lower(q).layers
    rest = sum(t.numel() * t.element_size() for n, t in q.model.named_parameters() if not n.endswith(".weight"))
    acts = len(records) * (4 + 1)  # each input grid: a float32 scale and a one-byte zero point
    expected = sum(r.weight_bytes() for r in records.values()) + rest + acts
    assert fewbits.report.quantized_bytes(q) == expected
    # a 4-bit per-channel weight: half a byte per value plus a float32 scale per channel
    r = records["5"]
    assert r.weight_bytes() == 16 * 4 // 2 + 4 * 4


def test_packed_levels_unpack_to_the_record():
    q, _ = _layer(LayerRecipe(weight=TensorRecipe(Pow2Spec(bits=4, granularity=PerChannel(0)))))
    r = lower(q).layers["0"]
    assert r.kind is Kind.DECODED and torch.equal(r.dequantized_weight(), q.quantized_layers()["0"].quantized_weight())
    from fewbits.export.packed import _packed_weights

    tensors, entries = _packed_weights(q)
    assert torch.equal(unpack(tensors["0.weight.qdata"], 4, entries["0"]["view"]), r.qweight)


def test_prepare_for_a_saturating_target_fits_the_gemm_weights():
    avx2 = Target.onnxruntime(int8_kernel_profile({"avx2"}, "x86_64"))
    q = fewbits.prepare(_net(), "w8a8", target=avx2)
    assert q.recipe.name == "w8a8+w7"
    assert {layer.weight_quantizer.spec.bits for layer in q.quantized_layers().values()} == {7}
    vnni = Target.onnxruntime(int8_kernel_profile({"avx2", "avx512_vnni"}, "x86_64"))
    assert fewbits.prepare(_net(), "w8a8", target=vnni).recipe.name == "w8a8"


def test_size_of_a_model_not_yet_calibrated():
    # the size needs the weights only: a prepared model with static ranges (and ops) still has one
    q = fewbits.prepare(_net(), "w8a8-bc-int")
    q2 = fewbits.prepare(_net(), "w8a8-bc-int")
    fewbits.calibrate(q2, _batches())
    weights = sum(r.weight_bytes() for r in lower(q2).layers.values())
    assert weights == sum(r.weight_bytes() for r in lower(q, calibrated=False).layers.values())
    assert fewbits.report.quantized_bytes(q) < fewbits.report.quantized_bytes(q2)  # no activation scales yet
    with pytest.raises(ValueError, match="not calibrated"):
        lower(q)


def test_what_prepare_left_float_is_a_float_record_and_an_island():
    model = nn.Sequential(nn.Linear(12, 8), nn.LayerNorm(8), nn.Linear(8, 4)).eval()
    q = fewbits.prepare(model, "w8a8")
    fewbits.calibrate(q, [torch.randn(8, 12)])
    lowering = lower(q)
    assert [(r.name, r.kind) for r in lowering.floats.values()] == [("1", Kind.FLOAT)]
    assert "normalization stays float" in lowering.floats["1"].reason
    im = fewbits.convert(q)
    assert [(i.name, i.reason) for i in im.float_islands] == [("1", lowering.floats["1"].reason)]
