"""Quantized average pooling and concatenation: found by torch.fx, simulated, converted to
integers, exported to ONNX Runtime's QLinear kernels."""
import pytest
import torch
from torch import fx, nn

import fewbits
from fewbits.lower.lower import lower_op
from fewbits.target import Target
from fewbits.convert.layers import IntegerAvgPool, IntegerConcat
from fewbits.recipe import Recipe, TensorRecipe, get_recipe
from fewbits.spec import QuantSpec
from fewbits.wrap.ops import QuantConcat, QuantPool

_ACT = TensorRecipe(QuantSpec(bits=8, signed=False, symmetric=False), "minmax")


class Branches(nn.Module):
    """Two convolution branches concatenated on channels (an Inception-style block)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.ReLU6())

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(), nn.AvgPool2d(3, 2, 1))
        self.block = Branches()
        self.last = nn.Sequential(nn.Conv2d(10, 16, 1), nn.ReLU6())
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.last(self.block(self.stem(x)))
        return self.head(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


def _batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 12, 12, generator=g) for _ in range(n)]


def _prepared(recipe="w8a8-bc-int"):
    torch.manual_seed(0)
    q = fewbits.prepare(Net().eval(), recipe)
    return fewbits.calibrate(q, _batches())


def test_pools_and_concatenations_are_found_and_the_float_function_stays():
    torch.manual_seed(0)
    net = Net().eval()
    q = fewbits.prepare(net, "w8a8-bc-int")
    assert sorted(q.ops) == ["block.cat", "pool", "stem.2"]
    assert isinstance(q.model, fx.GraphModule) and isinstance(q.model.pool, QuantPool) and q.model.pool.is_global
    assert isinstance(q.model.stem[2], QuantPool) and not q.model.stem[2].is_global  # a module, swapped in place
    assert isinstance(q.model.block.cat, QuantConcat) and q.model.block.cat.dim == 1
    assert "block.b.0.weight" in q.model.state_dict()  # names unchanged
    x = _batches(1)[0]
    with fewbits.wrap.quantization_disabled(q), torch.no_grad():
        assert torch.allclose(q.model(x), net(x), atol=1e-5)
    assert fewbits.prepare(net, "w8a8-bc-adds").ops == []  # that recipe leaves pools and concatenations float


def test_recipe_round_trips_pools_and_concats():
    r = get_recipe("w8a8-bc-int")
    assert Recipe.from_json(r.to_json()) == r and r.pools == r.concats == r.adds
    assert fewbits.recipe.with_calibration(r, "percentile").pools.method == "percentile"


@pytest.mark.parametrize("pool", [nn.AdaptiveAvgPool2d(1), nn.AdaptiveAvgPool2d((3, 2)), nn.AvgPool2d(3, 2, 1),
                                  nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False), nn.AvgPool1d(3, 2, 1),
                                  nn.AdaptiveAvgPool1d(4)])
def test_integer_average_pool_equals_the_simulation(pool):
    op = QuantPool(_ACT, "p", pool)
    g = torch.Generator().manual_seed(2)
    shape = (4, 6, 9, 7) if "2d" in type(pool).__name__ else (4, 6, 11)
    x = torch.rand(shape, generator=g) * 3 - 0.5
    op.input_quantizer.start_observing(), op.output_quantizer.start_observing()
    op(x)
    op.input_quantizer.stop_observing(op.input_quantizer.observed_qparams())
    op.output_quantizer.stop_observing(op.output_quantizer.observed_qparams())
    integer = IntegerAvgPool(lower_op(op.name, op, Target.reference()))
    # the simulation averages in float32, the integer op rounds the exact window sum times a
    # 2^-31-accurate multiplier; both send an exact half to the even level. Only a float32 value
    # within rounding error of a half could part them (by one level): measured never here
    assert torch.equal(op(x), integer(x))
    got = integer(x)
    integer.emit_integers = True
    levels = integer(x)
    assert levels.dtype == torch.int32 and torch.allclose((levels - integer.out.zero_point) * integer.out.scale, got)


def test_integer_average_pool_rounds_exact_halves_to_even_like_the_simulation():
    op = QuantPool(_ACT, "p", nn.AvgPool2d(2))
    for quantizer in (op.input_quantizer, op.output_quantizer):  # one grid: means of 4 levels hit .5
        quantizer.scale, quantizer.zero_point = torch.tensor(0.05), torch.tensor(3)
    x = (torch.randint(0, 256, (4, 8, 6, 6), generator=torch.Generator().manual_seed(1)) - 3) * 0.05
    integer = IntegerAvgPool(lower_op(op.name, op, Target.reference()))
    integer.emit_integers = True
    sums = (integer.a.quantize(x).double() - 3).reshape(4, 8, 3, 2, 3, 2).sum((3, 5))
    assert float((sums % 4 == 2).double().mean()) > 0.2  # a fifth of the means are exact halves
    exact = torch.round(sums / 4) + 3  # float64 holds these quotients exactly; torch.round: half to even
    assert torch.equal(integer(x), exact.to(torch.int32))
    # the simulation's float32 mean of 0.05-steps lands a hair off some halves: one level, rarely
    sim = integer.out.quantize(op(x))
    assert int((sim - exact).abs().max()) <= 1 and float((sim != exact).double().mean()) < 0.02


def test_integer_concatenation_is_exact_on_equal_grids_and_rescales_otherwise():
    q = _prepared()
    cat = q.model.block.cat
    integer = IntegerConcat(lower_op(cat.name, cat, Target.reference()))
    g = torch.Generator().manual_seed(4)
    a, b = torch.rand(2, 4, 5, 5, generator=g) * 4, torch.rand(2, 6, 5, 5, generator=g) * 6
    assert integer.grids[0].scale != integer.out.scale  # operand a is rescaled
    # float32 dequantize-then-requantize vs a fixed-point rescale: they could part only at a
    # float32 near-half (by one level); measured equal on these inputs
    assert torch.equal(cat(a, b), integer(a, b))
    same = IntegerConcat(lower_op(cat.name, cat, Target.reference()))
    same.grids = [same.out, same.out]
    same.multipliers = [fewbits.numerics.fixed_point.fixed_point_multiplier(1.0)] * 2
    same.emit_integers = True
    levels = torch.randint(0, 256, (2, 10, 5, 5), dtype=torch.int32)
    assert torch.equal(same(levels[:, :4], levels[:, 4:]), levels)  # the identity, exactly


def test_integer_model_pools_and_concatenates_on_integers():
    q = _prepared()
    im = fewbits.convert(q)
    targets = {c.source: c for c in im.chains}
    assert targets["last.0"].target == "pool" and targets["last.0"].through == ("last.1",)  # ReLU6 as a clamp
    assert targets["pool"].target == "head" and targets["pool"].through == ("flatten",)
    assert targets["block.a.0"].target == "block.cat" and targets["stem.0"].target == "stem.2"
    pool = im.model.pool
    assert isinstance(pool, IntegerAvgPool) and pool.emit_integers
    x = _batches(1, seed=5)[0]
    with torch.no_grad():
        sim, got = q(x), im(x)
    step = float(sim.max() - sim.min()) / 255
    # one level apart at an op's (near-)half can move the head's output by a fraction of its range
    assert float((sim - got).abs().max()) < 2 * step


def test_onnx_runs_pools_and_concatenation_on_integer_kernels(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import collections

    import onnx

    from fewbits.export.onnx import OnnxModel

    q = _prepared()
    result = fewbits.export_onnx(q, _batches(1)[0], tmp_path / "net.onnx", batches=_batches(3, seed=9))
    assert result.verification.ok and result.verification.max_levels <= 1, result.verification.summary()
    OnnxModel(result.path, optimized_path=tmp_path / "opt.onnx")
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert ops["QLinearGlobalAveragePool"] == 1 and ops["QLinearAveragePool"] == 1 and ops["QLinearConcat"] == 1, ops
    assert "Conv" not in ops and "ReduceMean" not in ops, ops


def test_packed_file_round_trips_the_pool_and_concatenation_grids(tmp_path):
    q = _prepared()
    fewbits.save(q, tmp_path / "net.fewbits")
    torch.manual_seed(1)  # another initialisation: everything must come from the file
    loaded = fewbits.load(tmp_path / "net.fewbits", model=Net())
    assert loaded.ops == q.ops
    x = _batches(1, seed=4)[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
