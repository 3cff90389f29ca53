"""Conv3d and ConvTranspose1d/2d: quantized, converted to integers, exported, each checked
against an independent reference."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fewbits
from fewbits.wrap.modules import QuantConv3d, QuantConvTranspose1d, QuantConvTranspose2d


def _fq_per_out_channel(w: torch.Tensor, out_axis: int) -> torch.Tensor:
    """torch's own per-channel fake quantization of a weight along its output-channel axis
    (symmetric int8, scale amax/127.5 per channel: fewbits' full-range convention)."""
    moved = w.movedim(out_axis, 0)
    amax = moved.reshape(moved.shape[0], -1).abs().amax(1)
    scale = torch.clamp(amax / 127.5, min=torch.finfo(torch.float32).eps)
    fq = torch.fake_quantize_per_channel_affine(moved, scale, torch.zeros_like(scale, dtype=torch.int32), 0, -128, 127)
    return fq.movedim(0, out_axis)


@pytest.mark.parametrize("layer, axis", [(nn.ConvTranspose2d(6, 4, 3, 2, 1, output_padding=1), 1),
                                         (nn.ConvTranspose1d(6, 4, 3, 2), 1), (nn.Conv3d(3, 5, 3), 0)])
def test_weights_are_quantized_per_output_channel(layer, axis):
    torch.manual_seed(0)
    q = fewbits.prepare(nn.Sequential(layer), "w8")
    swapped = q.model[0]
    assert isinstance(swapped, (QuantConvTranspose1d, QuantConvTranspose2d, QuantConv3d))
    # bit-exact: the same scales and rounding as torch's per-channel fake quantization
    assert torch.equal(swapped.quantized_weight(), _fq_per_out_channel(layer.weight.detach(), axis))


def test_grouped_transposed_weight_view_round_trips():
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(6, 8, 3, groups=2)
    q = fewbits.prepare(nn.Sequential(layer), "w8").model[0]
    view = q.weight_view()
    assert view.shape == (8, 3 * 9)  # one row per output channel: in/groups · kernel
    assert torch.equal(q.weight_from_view(view), layer.weight.detach())
    # row o of the view is output channel o: group o // 4, channel o % 4 within it
    assert torch.equal(view[5], layer.weight.detach()[3:6, 1].reshape(-1))


class UpNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.up = nn.ConvTranspose2d(8, 4, 2, 2)
        self.out = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 2, 1))

    def forward(self, x):
        return self.out(self.up(self.down(x)))


def _batches(shape, n=3):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("model, shape", [
    (UpNet(), (4, 3, 16, 16)),
    (nn.Sequential(nn.Conv1d(3, 8, 3), nn.ConvTranspose1d(8, 4, 3, 2, 1, output_padding=1), nn.Conv1d(4, 2, 1)),
     (4, 3, 20)),
    (nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 2, 1)), (2, 3, 6, 8, 8)),
])
def test_integer_model_and_onnx_match_the_simulation(model, shape, tmp_path):
    torch.manual_seed(0)
    model = model.eval()
    batches = _batches(shape)
    q = fewbits.calibrate(fewbits.prepare(model, "w8a8"), batches)
    records = fewbits.lower(q).layers
    assert {r.kind.value for r in records.values()} == {"integer"}
    integer = fewbits.convert(q)
    with torch.no_grad():
        sim, out = q(batches[2]), integer.model(batches[2])
    # the same integers; the last layer's output is on its own grid (the model's output), where
    # float32 rounding of the simulation and the integer requantization can differ by one level
    step = records[list(records)[-1]].output.scale
    differ = (sim - out).abs() > 1e-5
    assert (sim - out).abs().max() <= 1.01 * step and differ.float().mean() <= 1e-3
    pytest.importorskip("onnxruntime")
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fewbits.export_onnx(q, batches[0], tmp_path / "m.onnx", batches=batches[:2])
    # nothing is warned about: the last convolution (the model's output) has an output grid and
    # fuses; a transposed convolution in float is what its record says
    assert not [w for w in caught if "did not fuse" in str(w.message)]
    assert result.verification.ok, result.verification.summary()
    transposed = sum(isinstance(m, nn.modules.conv._ConvTransposeNd) for m in model.modules())
    # every GEMM but the transposed one (no integer kernel in ONNX Runtime)
    assert result.kernels.integer == len(records) - transposed


def test_transposed_convolution_reference_is_exact():
    """int_conv_transpose on integer levels equals the float transposed convolution of the
    same integers (zero points subtracted), per output channel."""
    from fewbits.runtime.reference import int_conv_transpose

    g = torch.Generator().manual_seed(0)
    qx = torch.randint(0, 256, (2, 4, 5, 5), generator=g)
    qw = torch.randint(-128, 128, (4, 3, 3, 3), generator=g)  # groups=2: 2 in × 3 out per group
    zw = torch.randint(-3, 4, (6,), generator=g)
    acc = int_conv_transpose(qx, 7, qw, zw, stride=2, padding=1, output_padding=1, groups=2)
    w = qw.double() - zw.double().reshape(2, 1, 3, 1, 1).expand(2, 2, 3, 1, 1).reshape(4, 3, 1, 1)
    expected = F.conv_transpose2d(qx.double() - 7, w, None, 2, 1, 1, 2)
    assert torch.equal(acc.double(), expected)


def test_transposed_weights_round_trip_through_the_packed_file(tmp_path):
    torch.manual_seed(0)
    model = UpNet().eval()
    batches = _batches((2, 3, 16, 16))
    q = fewbits.calibrate(fewbits.prepare(model, "w8a8"), batches)
    fewbits.save(q, tmp_path / "m.fewbits")
    loaded = fewbits.load(tmp_path / "m.fewbits", model)
    # the packed levels come back in the layer's [in, out, k, k] layout: the same model exactly
    assert torch.equal(loaded.model.up.quantized_weight(), q.model.up.quantized_weight())
    with torch.no_grad():
        assert torch.equal(loaded(batches[2]), q(batches[2]))
