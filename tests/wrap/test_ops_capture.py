"""Which additions and concatenations the default quantizes: those between layers (ResNets,
U-Nets), not a transformer's residual stream (read by float norms), not an attention mask, not a
learned token concatenated with activations."""
import torch
from torch import nn

import fewbits
from fewbits.tasks.models.zoo import ZOO


def test_resnet_additions_and_pool_are_quantized():
    q = fewbits.prepare(ZOO["resnet18"]().model, "w8a8")
    adds = [n for n in q.ops if n.endswith("add") or ".add" in n]
    assert len(adds) == 8  # one per BasicBlock
    # the block's ReLU after the addition is taken in: the output grid starts at 0, as ORT folds it
    assert all(q.model.get_submodule(n).relu for n in adds)
    x = ZOO["resnet18"]().batches(1, 5)[0]
    fewbits.calibrate(q, [x])
    with torch.no_grad():
        ref, got = ZOO["resnet18"]().model(x), q(x)
    assert torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0) > 0.999  # 8-bit everywhere
    (record,) = [r for n, r in fewbits.lower(q).ops.items() if n == adds[0]]
    assert record.relu and record.output.zero_point == 0  # an unsigned grid from 0: no level below 0
    assert any(type(q.model.get_submodule(n)).__name__ == "QuantPool" for n in q.ops)
    assert q.left_float == []


def test_transformer_residual_stream_and_class_token_stay_float():
    q = fewbits.prepare(ZOO["vit"]().model, "w8a8")
    assert q.ops == []  # the blocks' residual additions feed norms; the cat joins a learned token
    streams = [lf for lf in q.float_ops if "residual addition" in lf.reason]
    assert [lf.name for lf in streams] == [f"blocks.{i}" for i in range(4)]
    assert all("2 residual addition(s)" in lf.reason for lf in streams)


def test_post_norm_encoder_layers_are_traced_and_their_stream_kept_float():
    q = fewbits.prepare(ZOO["transformer-encoder"]().model, "w8a8")
    assert not [lf for lf in q.float_ops if "not traceable" in lf.reason]
    assert sum("residual addition" in lf.reason for lf in q.float_ops) == 4


def test_attention_mask_additions_are_never_quantized():
    mha = nn.MultiheadAttention(16, 2, batch_first=True)

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            mask = torch.triu(torch.full((x.shape[1], x.shape[1]), float("-inf")), 1)
            return self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]

    q = fewbits.prepare(Masked().eval(), "w8a8")
    assert q.ops == []
    x = torch.randn(2, 5, 16)
    fewbits.calibrate(q, [x])
    with torch.no_grad():
        assert torch.isfinite(q(x)).all()


def test_unet_skip_concatenation_is_quantized():
    q = fewbits.prepare(ZOO["unet"]().model, "w8a8")
    assert [type(q.model.get_submodule(n)).__name__ for n in q.ops] == ["QuantConcat"]
    assert "up" in q.quantized_layers() and q.left_float == []


def test_attention_products_quantized_as_an_option(tmp_path):
    import pytest

    from fewbits.convert.layers import IntegerMatMul
    from fewbits.wrap.ops import QuantMatMul

    case = ZOO["transformer-encoder"]()
    batches = case.batches(2, 0)
    q = fewbits.calibrate(fewbits.prepare(case.model, "w8a8-matmul"), batches)
    products = [n for n in q.ops if isinstance(q.model.get_submodule(n), QuantMatMul)]
    assert len(products) == 8  # scores and weights × values in each of the 4 layers
    assert fewbits.prepare(case.model, "w8a8").ops == []  # not in the default
    with torch.no_grad():
        ref, got = case.model(batches[0]), q(batches[0])
    # 8-bit scores and attention weights on top of w8a8: cosine still above 0.999
    assert torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0) > 0.999
    # the integer product is the exact sum of level products, times the two scales
    (record,) = [r for n, r in fewbits.lower(q).ops.items() if n == products[0]]
    layer = IntegerMatMul(record)
    a, b = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 8, 3)
    qa, qb = (g.quantize(t).double() - g.zero_point for g, t in zip(record.inputs, (a, b)))
    expected = torch.einsum("nhik,nhkj->nhij", qa, qb) * record.inputs[0].scale * record.inputs[1].scale
    assert torch.equal(layer(a, b), expected.float())
    pytest.importorskip("onnxruntime")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fewbits.export_onnx(q, batches[0], tmp_path / "m.onnx", batches=batches)
    assert result.verification.max_steps <= 1.0, result.verification.summary()
    ops = result.kernels.ops
    # every product on an integer kernel: 25 weight GEMMs and the 8 attention products
    assert result.kernels.share == 1.0 and "MatMul" not in ops and "FusedMatMul" not in ops
    assert ops.get("QLinearMatMul", 0) + ops.get("MatMulIntegerToFloat", 0) + ops.get("QGemm", 0) == 25 + 8


class ConvNeXtBlock(nn.Module):
    """A depthwise convolution read by a LayerNorm (channels last), a layer scale, a residual."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw1, self.pw2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        h = self.dw(x).permute(0, 2, 3, 1)
        return x + (self.pw2(torch.nn.functional.gelu(self.pw1(self.norm(h)))) * self.gamma).permute(0, 3, 1, 2)


class SE(nn.Module):
    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)

    def forward(self, x):
        y = self.conv(x)
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(torch.nn.functional.adaptive_avg_pool2d(y, 1)))))
        return x + y * gate


def test_convolutions_read_by_float_ops_get_an_output_grid_and_deploy(tmp_path):
    import pytest

    torch.manual_seed(0)
    for block, named in ((ConvNeXtBlock(), "dw"), (SE(), "fc2")):
        model = nn.Sequential(nn.Conv2d(3, 16, 1), block, nn.Conv2d(16, 4, 1)).eval()
        g = torch.Generator().manual_seed(1)
        batches = [torch.randn(2, 3, 12, 12, generator=g) for _ in range(2)]
        q = fewbits.calibrate(fewbits.prepare(model, "w8a8"), batches)
        with_output = [n for n, m in q.quantized_layers().items() if m.output_quantizer is not None]
        # the one a float op (norm, sigmoid) reads, and the last: the model's output
        assert with_output == [f"1.{named}", "2"]
        assert not [n for n, m in q.quantized_layers().items()
                    if fewbits.prepare(model, "w8a8-inputs").model.get_submodule(n).output_quantizer is not None]
        record = fewbits.lower(q).layers[f"1.{named}"]
        assert record.kind.value == "integer" and record.output is not None
        integer = fewbits.convert(q)
        with torch.no_grad():
            sim, out = q(batches[1]), integer.model(batches[1])
        # the integer model requantizes into the same grid; a 1-level rounding flip there (float32
        # simulation vs fixed point) moves the output by about one step of that grid, and the flips
        # of the two layers after it add at most as much again: 2 steps
        assert (sim - out).abs().max() <= 2 * record.output.scale
        pytest.importorskip("onnxruntime")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = fewbits.export_onnx(q, batches[0], tmp_path / "m.onnx", batches=batches)
        assert result.verification.max_steps <= 1.0, result.verification.summary()
        # every convolution fuses now
        assert result.kernels.float == 0
