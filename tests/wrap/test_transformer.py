"""nn.TransformerEncoder in eval mode: its fused fast path would bypass the quantized layers."""
import torch
from torch import nn

import fewbits
from fewbits.wrap.transformer import UnfusedTransformerEncoderLayer


def _encoder(norm_first=False):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
    # nested tensors: PyTorch's default, which it declines itself for pre-norm layers
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=not norm_first), nn.Linear(16, 3)).eval()


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 6, 16, generator=g) for _ in range(2)]


def test_encoder_layers_run_their_quantized_linears():
    for norm_first in (False, True):
        model = _encoder(norm_first)
        q = fewbits.prepare(model, "w8a8")
        fewbits.calibrate(q, _batches())  # the fused path used to leave linear1/linear2 without data
        layers = q.quantized_layers()
        assert {"0.layers.0.linear1", "0.layers.0.linear2", "0.layers.1.linear1", "0.layers.1.linear2", "1"} <= set(layers)
        assert all(isinstance(m, UnfusedTransformerEncoderLayer) for m in q.model[0].layers)
        reasons = {lf.name: lf.reason for lf in q.left_float}
        assert "normalization" in reasons["0.layers.0.norm1"]
        assert {"0.layers.0.self_attn.q_proj", "0.layers.1.self_attn.out_proj"} <= set(layers)  # attention too
        x = _batches()[0]
        with torch.no_grad(), fewbits.wrap.quantization_disabled(q):
            # the reference path of the same layer: the fused kernel sums in another order
            assert torch.allclose(q.model(x), model(x), atol=1e-5)
        with torch.no_grad():
            assert torch.nn.functional.cosine_similarity(q(x).flatten(), model(x).flatten(), dim=0) > 0.99  # 8-bit: a small error


def test_a_padding_mask_runs_without_nested_tensors():
    model = _encoder()
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, 4:] = True  # the last two positions are padding
    batches = [{"input": b, "src_key_padding_mask": mask} for b in _batches()]

    class WithMask(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input, src_key_padding_mask):
            return self.inner[1](self.inner[0](input, src_key_padding_mask=src_key_padding_mask))

    q = fewbits.prepare(WithMask(model), "w8a8")
    fewbits.calibrate(q, batches)
    out = q(**batches[0])
    assert not out.is_nested and out.shape == (4, 6, 3)
    with torch.no_grad(), fewbits.wrap.quantization_disabled(q):
        ref = WithMask(model)(**batches[0])
        got = q.model(**batches[0])
    # padded positions: the fused path writes zeros there, the reference path computes them
    assert torch.allclose(got[:, :4], ref[:, :4], atol=1e-5)


def test_the_integer_model_and_the_packed_file_take_it(tmp_path):
    model = _encoder()
    q = fewbits.prepare(model, "w8a8")
    fewbits.calibrate(q, _batches())
    im = fewbits.convert(q)
    x = _batches()[1]
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(im(x).flatten(), q(x).flatten(), dim=0) > 0.999  # the integer model equals the simulation to rounding flips
    back = fewbits.load(fewbits.save(q, tmp_path / "t.fewbits"), model=_encoder())
    with torch.no_grad():
        assert torch.equal(back(x), q(x))


def test_decoder_layers_quantize_both_attentions_and_the_feed_forward():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    decoder = nn.TransformerDecoder(layer, 2).eval()

    class Seq2Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = decoder

        def forward(self, tgt, memory):
            mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
            return self.decoder(tgt, memory, tgt_mask=mask)

    model = Seq2Seq().eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(3, 5, 16, generator=g), torch.randn(3, 7, 16, generator=g)) for _ in range(2)]
    q = fewbits.calibrate(fewbits.prepare(model, "w8a8"), batches)  # every swapped layer ran
    names = set(q.quantized_layers())
    assert {"decoder.layers.0.self_attn.q_proj", "decoder.layers.0.multihead_attn.k_proj",
            "decoder.layers.1.linear1", "decoder.layers.1.linear2"} <= names
    assert len(names) == 2 * (4 + 4 + 2)
    with torch.no_grad():
        ref, got = model(*batches[0]), q(*batches[0])
    assert torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0) > 0.99  # 8-bit: a small error
