import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fewbits
from fewbits import QuantSpec, PerChannel, choose_qparams, fake_quantize
from fewbits.wrap import QuantConv2d, QuantEmbedding, QuantLinear, Status, fold_batchnorm


def _cnn():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8),
                      nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    for bn in (m[1], m[4]):  # non-trivial statistics so folding changes the weights
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_()
    return m.eval()


def _batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 3, 8, 8, generator=g) for _ in range(n)]


def test_batchnorm_folding_keeps_the_function():
    m = _cnn()
    ref = copy.deepcopy(m)
    folded, left = fold_batchnorm(ref)
    assert folded == ["1", "4"] and left == []
    assert isinstance(ref[1], nn.Identity) and isinstance(ref[4], nn.Identity)
    x = torch.randn(2, 3, 8, 8)
    # the same function up to float32 rounding of the folded weights and biases
    assert torch.allclose(ref(x), m(x), atol=1e-5, rtol=1e-5)
    assert fewbits.prepare(m, "w8").folded_bn == ["1", "4"]
    assert fewbits.prepare(m, "w8", fold_bn=False).folded_bn == []


def test_prepare_never_modifies_the_input_model():
    m = _cnn()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    types = [type(x) for x in m.modules()]
    q = fewbits.prepare(m, "w8a8")
    fewbits.calibrate(q, _batches())
    assert [type(x) for x in m.modules()] == types
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert isinstance(q.model[0], QuantConv2d) and isinstance(q.model[7], QuantLinear)


def test_weight_only_linear_equals_the_numerics_core():
    lin = nn.Linear(16, 4)
    q = fewbits.prepare(nn.Sequential(lin), "w8")
    assert q.status is Status.CALIBRATED  # nothing to calibrate
    spec = QuantSpec(bits=8, granularity=PerChannel(0))
    w = lin.weight.detach()
    scale, zp = choose_qparams(w.amin(1), w.amax(1), spec)
    x = torch.randn(3, 16)
    expected = F.linear(x, fake_quantize(w, scale, zp, spec), lin.bias)
    assert torch.equal(q(x), expected)


def test_static_calibration_sets_the_min_max_of_all_batches():
    m = _cnn()
    q = fewbits.prepare(m, "w8a8")
    with pytest.raises(RuntimeError, match="run fewbits.calibrate"):
        q(torch.randn(1, 3, 8, 8))
    batches = _batches()
    fewbits.calibrate(q, batches)
    allx = torch.cat(batches)
    spec = QuantSpec(bits=8, signed=False, symmetric=False)
    scale, zp = choose_qparams(allx.min(), allx.max(), spec)
    quantizer = q.quantizers()["0.input"]
    assert torch.equal(quantizer.scale, scale) and torch.equal(quantizer.zero_point, zp)
    assert q.status is Status.CALIBRATED


def test_dynamic_recipe_quantizes_each_batch_by_its_own_range():
    lin = nn.Linear(8, 2)
    q = fewbits.prepare(nn.Sequential(lin), "w8a8-dynamic")
    x = torch.randn(4, 8) * 3
    spec = QuantSpec(bits=8, signed=False, symmetric=False)
    s, z = choose_qparams(x.min(), x.max(), spec)
    w_hat = q.model[0].quantized_weight()
    assert torch.equal(q(x), F.linear(fake_quantize(x, s, z, spec), w_hat, lin.bias))


def test_bad_batches_are_named_and_change_nothing():
    q = fewbits.prepare(_cnn(), "w8a8")
    good = _batches(2)
    fewbits.calibrate(q, good)
    before = {n: (t.scale.clone(), t.zero_point.clone()) for n, t in q.quantizers().items()}
    bad_value = torch.randn(5, 3, 8, 8)
    bad_value[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="calibration batch 1: argument 0 has non-finite values"):
        fewbits.calibrate(q, [good[0] * 10, bad_value])
    with pytest.raises(ValueError, match="calibration batch 0: expected a Tensor, a tuple of arguments or a dict"):
        fewbits.calibrate(q, ["not a tensor"])
    with pytest.raises(ValueError, match="calibration got no batches"):
        fewbits.calibrate(q, [])
    # a batch of the wrong shape: the batch index and the layer it failed in, one line
    with pytest.raises(ValueError, match=r"calibration batch 1 in layer '7': mat1 and mat2 shapes cannot be multiplied"):
        fewbits.calibrate(q, [good[0], torch.randn(5, 3, 9, 9)])
    for n, t in q.quantizers().items():
        assert torch.equal(t.scale, before[n][0]) and torch.equal(t.zero_point, before[n][1]), n
        assert t.observer is None


def test_tuple_and_dict_batches():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x, y=None):
            return self.a(x) + self.b(y)

    q = fewbits.prepare(TwoInputs(), "w8a8")
    fewbits.calibrate(q, [(torch.randn(2, 4), torch.randn(2, 4)), {"x": torch.randn(2, 4), "y": torch.randn(2, 4)}])
    assert q(torch.randn(1, 4), torch.randn(1, 4)).shape == (1, 3)


def test_a_layer_that_never_runs_is_named():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    q = fewbits.prepare(Unused(), "w8a8")
    with pytest.raises(ValueError, match="'spare.input' saw no data during calibration"):
        fewbits.calibrate(q, [torch.randn(2, 4)])
    assert q.status is Status.PREPARED


def test_left_float_lists_what_was_not_quantized_and_why():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.word_embeddings = nn.Embedding(50, 8)
            self.token_type_embeddings = nn.Embedding(2, 8)
            self.norm = nn.LayerNorm(8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True)  # extra learned rows
            self.gru = nn.GRU(8, 8)
            self.bn = nn.BatchNorm1d(8)
            self.head = nn.Linear(8, 3)

        def forward(self, ids):
            h = self.norm(self.word_embeddings(ids) + self.token_type_embeddings.weight[0])
            h, _ = self.attn(h, h, h)
            return self.head(h.mean(1))

    q = fewbits.prepare(Block(), "w8a8")
    reasons = {lf.name: lf.reason for lf in q.left_float}
    assert reasons["token_type_embeddings"] == "kept float by the recipe ('*token_type_embeddings*')"
    assert "normalization stays float" in reasons["norm"]
    assert reasons["attn"] == "MultiheadAttention with add_bias_kv: kept float"
    assert reasons["gru"] == "fewbits has no quantized GRU"
    assert "BatchNorm not directly after" in reasons["bn"]
    assert "attn.out_proj" not in reasons  # covered by its parent's entry
    assert isinstance(q.model.word_embeddings, QuantEmbedding)
    fewbits.calibrate(q, [torch.randint(0, 50, (2, 6))])
    assert q(torch.randint(0, 50, (1, 6))).shape == (1, 3)


def test_group_size_that_does_not_divide_quantizes_with_a_partial_last_group():
    model = nn.Sequential(nn.Linear(200, 4), nn.Linear(4, 4))
    q = fewbits.prepare(model, "w4-g128")
    assert q.left_float == []
    fewbits.calibrate(q, [torch.randn(2, 200)])
    w = model[0].weight.detach()
    wq = q.model[0].weight_quantizer
    assert tuple(wq.scale.shape) == (4, 2)  # columns 0-127 and the partial group 128-199
    out = wq(w).detach()
    for lo, hi in ((0, 128), (128, 200)):  # each group: symmetric int4 on its own absolute maximum
        block = w[:, lo:hi]
        s = block.abs().amax(1) / 7.5  # fewbits' symmetric signed grid: amax over (qmax - qmin) / 2
        ref = torch.fake_quantize_per_channel_affine(block, s, torch.zeros(4, dtype=torch.int32), 0, -8, 7)
        assert torch.allclose(out[:, lo:hi], ref, atol=1e-6)  # float32 division order differs: 1 ulp
    assert tuple(q.model[1].weight_quantizer.scale.shape) == (4, 1)  # one group, shorter than 128


def test_a_block_named_like_a_norm_still_has_its_layers_quantized():
    class AdaLayerNorm(nn.Module):  # a norm modulated by a linear layer (diffusion models write these)
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8, elementwise_affine=False)
            self.linear = nn.Linear(8, 16)

        def forward(self, x):
            scale, shift = self.linear(x).chunk(2, -1)
            return self.norm(x) * (1 + scale) + shift

    q = fewbits.prepare(nn.Sequential(AdaLayerNorm()), "w8")
    assert "0.linear" in q.quantized_layers()
    assert [lf.name for lf in q.left_float] == ["0.norm"]
