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
    assert any(type(q.model.get_submodule(n)).__name__ == "QuantPool" for n in q.ops)
    assert q.left_float == []


def test_transformer_residual_stream_and_class_token_stay_float():
    q = fewbits.prepare(ZOO["vit"]().model, "w8a8")
    assert q.ops == []  # the blocks' residual additions feed norms; the cat joins a learned token
    streams = [lf for lf in q.left_float if "residual addition" in lf.reason]
    assert [lf.name for lf in streams] == [f"blocks.{i}" for i in range(4)]
    assert all("2 residual addition(s)" in lf.reason for lf in streams)


def test_post_norm_encoder_layers_are_traced_and_their_stream_kept_float():
    q = fewbits.prepare(ZOO["transformer-encoder"]().model, "w8a8")
    assert not [lf for lf in q.left_float if "not traceable" in lf.reason]
    assert sum("residual addition" in lf.reason for lf in q.left_float) == 4


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
