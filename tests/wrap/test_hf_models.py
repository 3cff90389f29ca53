"""Hugging Face decoder models (tiny random configurations, nothing downloaded): GPT-2's Conv1D
projections and Llama's layers are quantized, the norms listed."""
import pytest
import torch

import fewbits

transformers = pytest.importorskip("transformers")


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                     attn_implementation="eager")
    return transformers.GPT2LMHeadModel(config).eval()


def _ids(n=2):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 64, (2, 12), generator=g)} for _ in range(n)]


def test_gpt2_conv1d_projections_are_quantized_and_the_function_kept():
    model = _gpt2()
    q = fewbits.prepare(model, "w8a8")
    fewbits.calibrate(q, _ids())
    names = set(q.quantized_layers())
    for block in ("0", "1"):
        assert {f"transformer.h.{block}.attn.c_attn", f"transformer.h.{block}.attn.c_proj",
                f"transformer.h.{block}.mlp.c_fc", f"transformer.h.{block}.mlp.c_proj"} <= names
    assert not any("Conv1D" in lf.type for lf in q.left_float)  # none stayed float for want of a swap
    batch = _ids(1)[0]
    with torch.no_grad(), fewbits.wrap.quantization_disabled(q):
        # x·W as addmm against x·(Wᵀ)ᵀ as linear: float32 summation order only
        assert torch.allclose(q.model(**batch).logits, model(**batch).logits, atol=1e-4)
    with torch.no_grad():
        ref, got = model(**batch).logits, q(**batch).logits
    assert torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0) > 0.99  # 8-bit weights and inputs: a small error, far from a broken layer (~0)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"  # the user's model is untouched


def test_llama_layers_are_quantized_and_rmsnorm_listed():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config).eval()
    q = fewbits.prepare(model, "w8a8")
    fewbits.calibrate(q, _ids())
    names = set(q.quantized_layers())
    assert {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "lm_head"} <= names
    reasons = {lf.name: lf.reason for lf in q.left_float}
    assert reasons["model.layers.0.input_layernorm"] == "normalization stays float"  # LlamaRMSNorm
    assert reasons["model.norm"] == "normalization stays float"
    batch = _ids(1)[0]
    with torch.no_grad():
        ref, got = model(**batch).logits, q(**batch).logits
    assert torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0) > 0.99  # 8-bit weights and inputs: a small error, far from a broken layer (~0)
    im = fewbits.convert(q)
    assert len(im.integer_layers()) == len([n for n in names if "embed" not in n])
