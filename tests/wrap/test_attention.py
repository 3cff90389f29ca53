"""nn.MultiheadAttention rewritten as four linear layers: the same function, quantized projections."""
import pytest
import torch
from torch import nn

import fewbits
from fewbits.wrap.attention import LinearMultiheadAttention


@pytest.mark.parametrize("batch_first, kdim", [(True, None), (False, None), (True, 6)])
def test_it_computes_what_multihead_attention_computes(batch_first, kdim):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim).eval()
    mine = LinearMultiheadAttention(mha).eval()
    n, length, source = 3, 5, 4
    shape = (lambda a, b, e: (a, b, e)) if batch_first else (lambda a, b, e: (b, a, e))
    q = torch.randn(*shape(n, length, 8))
    k = torch.randn(*shape(n, source, kdim or 8))
    v = torch.randn(*shape(n, source, kdim or 8))
    pad = torch.zeros(n, source, dtype=torch.bool)
    pad[0, -1] = True
    mask = torch.randn(length, source)
    with torch.no_grad():
        for kwargs in ({}, {"key_padding_mask": pad}, {"attn_mask": mask, "average_attn_weights": False},
                       {"need_weights": False}):
            (ref, ref_w), (got, got_w) = mha(q, k, v, **kwargs), mine(q, k, v, **kwargs)
            # the packed in_proj product split in three: float32 summation order only
            assert torch.allclose(got, ref, atol=1e-5), kwargs
            assert (ref_w is None and got_w is None) or torch.allclose(got_w, ref_w, atol=1e-6), kwargs


def test_unbatched_and_causal():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2).eval()
    mine = LinearMultiheadAttention(mha).eval()
    x = torch.randn(5, 8)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        assert torch.allclose(mine(x, x, x)[0], mha(x, x, x)[0], atol=1e-5)  # float32 order of the split projections
        assert torch.allclose(mine(x, x, x, attn_mask=causal)[0], mha(x, x, x, attn_mask=causal)[0], atol=1e-5)
        assert torch.allclose(mine(x, x, x, is_causal=True, need_weights=False)[0],
                              mha(x, x, x, attn_mask=causal)[0], atol=1e-5)


def test_prepare_quantizes_the_projections_of_a_vit_style_block():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(16)
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

        def forward(self, x):
            h = self.norm(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return x + self.mlp(self.norm(x))

    torch.manual_seed(0)
    model = Block().eval()
    q = fewbits.prepare(model, "w8a8")
    assert {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"} <= set(q.quantized_layers())
    assert [lf.name for lf in q.left_float] == ["norm"]
    assert [lf.name for lf in q.float_ops] == [""]  # the ops, apart from the layers
    assert "2 residual addition(s) read by a normalization layer stay float" in q.float_ops[0].reason
    batches = [torch.randn(2, 7, 16) for _ in range(2)]
    fewbits.calibrate(q, batches)
    with torch.no_grad():
        ref, got = model(batches[0]), q(batches[0])
    assert torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0) > 0.999  # 8-bit on every projection: ~1e-4 of error in cosine
    im = fewbits.convert(q)
    assert {"attn.q_proj", "attn.out_proj", "mlp.0", "mlp.2"} <= set(im.integer_layers())


def test_extra_key_value_rows_are_refused():
    with pytest.raises(ValueError, match="add_zero_attn"):
        LinearMultiheadAttention(nn.MultiheadAttention(8, 2, add_zero_attn=True))


def test_the_attention_block_exports_and_its_projections_run_on_integers(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 1, enable_nested_tensor=False)).eval()
    batches = [torch.randn(2, 7, 16) for _ in range(2)]
    q = fewbits.prepare(model, "w8a8")
    fewbits.calibrate(q, batches)
    result = fewbits.export_onnx(q, batches[0], tmp_path / "enc.onnx", batches=batches)
    assert result.verification.ok, result.verification.summary()
    # q, k, v, out projections and the two feed-forward layers: six weight GEMMs, all integer
    assert (result.kernels.integer, result.kernels.float) == (6, 0), result.kernels.to_dict()
