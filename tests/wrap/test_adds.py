"""Quantized residual additions: found by torch.fx, simulated, converted to integers, exported."""
import operator

import pytest
import torch
from torch import fx, nn

import fewbits
from fewbits.lower.lower import lower_op
from fewbits.target import Target
from fewbits.convert.layers import IntegerAdd
from fewbits.recipe import Recipe, get_recipe
from fewbits.wrap.ops import QuantAdd


class Block(nn.Module):
    """MobileNetV2's inverted residual: expand, depthwise, project, add the input."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c, 2 * c, 1), nn.ReLU6(), nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c),
                                  nn.ReLU6(), nn.Conv2d(2 * c, c, 1))

    def forward(self, x):
        return x + self.conv(x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(), nn.Conv2d(8, 8, 1), Block(8), Block(8))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return x + self.lin(x)
        return x


def _batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 8, 8, generator=g) for _ in range(n)]


def _prepared(recipe="w8a8-bc-adds"):
    torch.manual_seed(0)
    q = fewbits.prepare(Net().eval(), recipe)
    return fewbits.calibrate(q, _batches())


def test_additions_become_quant_adds_and_the_float_function_stays():
    torch.manual_seed(0)
    net = Net().eval()
    q = fewbits.prepare(net, "w8a8-bc-adds")
    assert q.additions == ["features.3.add", "features.4.add"]
    block = q.model.features[3]
    assert isinstance(block, fx.GraphModule) and isinstance(block.add, QuantAdd)
    assert not any(n.target in (operator.add, torch.add) for n in block.graph.nodes if n.op == "call_function")
    assert "features.3.conv.0.weight" in q.model.state_dict()  # names unchanged
    x = _batches(1)[0]
    with fewbits.wrap.quantization_disabled(q), torch.no_grad():
        assert torch.allclose(q.model(x), net(x), atol=1e-5)  # BN folding aside, the same function
    assert get_recipe("w8a8-bc").adds is None and fewbits.prepare(net, "w8a8-bc").additions == []


def test_quant_add_quantizes_operands_and_result():
    q = _prepared()
    add = q.model.features[3].add
    a, b = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    expected = add.output_quantizer(add.a_quantizer(a) + add.b_quantizer(b))
    assert torch.equal(add(a, b), expected)
    scales = [float(x.scale) for x in (add.a_quantizer, add.b_quantizer, add.output_quantizer)]
    assert all(s > 0 for s in scales)


def test_untraceable_modules_keep_float_additions_and_are_listed():
    model = nn.Sequential(Untraceable(), nn.Linear(4, 2)).eval()
    q = fewbits.prepare(model, "w8a8-bc-adds")
    assert q.additions == []
    assert [(x.name, "not traceable" in x.reason) for x in q.float_ops] == [("0", True)]
    assert q.left_float == []  # its layer is quantized; only its additions stay float


def test_recipe_round_trips_adds():
    r = get_recipe("w8a8-bc-adds")
    assert Recipe.from_json(r.to_json()) == r and r.needs_calibration


def test_integer_additions_chain_block_to_block_and_match_the_simulation():
    q = _prepared()
    im = fewbits.convert(q)
    adds = [m for m in im.model.modules() if isinstance(m, IntegerAdd)]
    assert len(adds) == 2 and adds[0].emit_integers  # block 3 hands integers to block 4
    targets = {c.source: c.target for c in im.chains}
    assert targets["features.3.conv.4"] == "features.3.add"  # the projection requantizes into the add
    assert set(targets["features.3.add"].split(",")) == {"features.4.conv.0", "features.4.add"}
    x = _batches(1, seed=5)[0]
    with torch.no_grad():
        sim, got = q(x), im(x)
    # every integer equals the simulation's here; what remains is float32 rounding of the head
    assert (sim - got).abs().max() < 1e-5


def test_integer_add_rescales_exactly():
    q = _prepared()
    add = q.model.features[3].add
    integer = IntegerAdd(lower_op(add.name, add, Target.reference()))
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 8, 4, 4, generator=g), torch.randn(4, 8, 4, 4, generator=g)
    got = integer(a, b)
    # float64 reference of the same levels: (q_a − z_a)s_a + (q_b − z_b)s_b, onto the output grid
    qa, qb = integer.a.quantize(a).double(), integer.b.quantize(b).double()
    real = (qa - integer.a.zero_point) * integer.a.scale + (qb - integer.b.zero_point) * integer.b.scale
    level = torch.round(real / integer.out.scale) + integer.out.zero_point
    ref = (level.clamp(integer.out.spec.qmin, integer.out.spec.qmax) - integer.out.zero_point) * integer.out.scale
    # in output steps; the float32 output adds < 1e-5 of a step. The shared fixed-point
    # multipliers carry 2^-31 relative error: a level can only move on an exact half, where
    # float64's half-to-even and the shift's half-away-from-zero may disagree
    steps = (got.double() - ref).abs() / integer.out.scale
    assert float(steps.max()) <= 1.0 + 1e-4 and float((steps > 0.5).double().mean()) < 1e-3


def test_onnx_runs_additions_as_qlinearadd_and_matches(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import collections

    import onnx

    from fewbits.export.onnx import OnnxModel

    q = _prepared()
    result = fewbits.export_onnx(q, _batches(1)[0], tmp_path / "res.onnx", batches=_batches(3, seed=9))
    assert result.verification.ok and result.verification.max_levels <= 1, result.verification.summary()
    OnnxModel(result.path, optimized_path=tmp_path / "opt.onnx")
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert ops["QLinearAdd"] == 2 and ops["QLinearConv"] == 8 and "Conv" not in ops, ops


def test_packed_file_round_trips_the_addition_grids(tmp_path):
    q = _prepared()
    fewbits.save(q, tmp_path / "adds.fewbits")
    torch.manual_seed(1)  # another initialisation: everything must come from the file
    loaded = fewbits.load(tmp_path / "adds.fewbits", model=Net())
    assert loaded.additions == q.additions
    x = _batches(1, seed=4)[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
