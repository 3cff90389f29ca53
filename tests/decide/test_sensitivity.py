"""fewbits.sensitivity: each method against a closed form or a direct computation, the cache,
and what a layer that cannot take a format gets."""
import json
import math

import pytest
import torch
from torch import nn

import fewbits
from fewbits.decide import get_candidates


def _batches(n=3, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, d, generator=g) for _ in range(n)]


def _fake_quantized_weight(q, name):
    """The layer's weight through torch's own fake quantization on fewbits's chosen qparams."""
    layer = q.model.get_submodule(name)
    wq = layer.weight_quantizer
    return torch.fake_quantize_per_channel_affine(layer.weight.detach(), wq.scale.reshape(-1),
                                                  wq.zero_point.reshape(-1).to(torch.int32), 0, wq.spec.qmin,
                                                  wq.spec.qmax)


def test_sqnr_is_the_layers_own_output_noise_to_signal():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)).eval()
    batches = _batches()
    s = fewbits.sensitivity(model, batches, ["float", "w8", "w3"], method="sqnr", cache_dir=False)
    for cand in ("w8", "w3"):
        q = fewbits.calibrate(fewbits.prepare(model, get_candidates([cand])[0].recipe()), batches)
        w = _fake_quantized_weight(q, "2")
        x = [torch.relu(model[0](b)) for b in batches]  # the exact fp32 input of layer 2
        ref = torch.cat([model[2](xi) for xi in x]).detach().double()
        got = torch.cat([nn.functional.linear(xi, w, model[2].bias) for xi in x]).detach().double()
        expected = float((ref - got).pow(2).sum() / ref.pow(2).sum())
        # float32 layer outputs summed in float64 on both sides
        assert s.scores["2"][cand] == pytest.approx(expected, rel=1e-4)
    assert s.scores["2"]["float"] == 0.0 and s.scores["2"]["w3"] > s.scores["2"]["w8"] > 0
    # sqnr_db is the same ratio in dB, rounded to 3 decimals
    assert s.sqnr_db["2"]["w8"] == pytest.approx(-10 * math.log10(s.scores["2"]["w8"]), abs=5e-4)


def test_loss_is_the_whole_models_error_with_only_that_layer_quantized():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)).eval()
    batches = _batches()
    s = fewbits.sensitivity(model, batches, ["w8", "w4a8"], method="loss", cache_dir=False)
    q = fewbits.calibrate(fewbits.prepare(model, get_candidates(["w8"])[0].recipe()), batches)
    for name in ("0", "2"):
        twin = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)).eval()
        twin.load_state_dict(model.state_dict())
        with torch.no_grad():
            twin.get_submodule(name).weight.copy_(_fake_quantized_weight(q, name))
            errors = [(twin(b) - model(b)).pow(2).sum() / model(b).pow(2).sum() for b in batches]
        # float32 forward passes, the same operations in the same order
        assert s.scores[name]["w8"] == pytest.approx(float(sum(errors) / len(errors)), rel=1e-4)
    assert all(s.scores[n]["w4a8"] > s.scores[n]["w8"] for n in ("0", "2"))


def test_loss_takes_a_task_loss():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(16, 3)).eval()
    data = [(x, torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(i))) for i, x in enumerate(_batches())]
    s = fewbits.sensitivity(model, [x for x, _ in data], ["w2"], method="loss", cache_dir=False,
                            loss_fn=lambda out, batch: nn.functional.cross_entropy(out, _label_of(batch, data)))
    assert s.scores["0"]["w2"] != 0.0


def _label_of(batch, data):
    args, _ = batch
    return next(y for x, y in data if x is args[0])


def _linear_layer_scored(seed, method, samples):
    """One 16 → 6 linear layer scored in w3: the score, the squared weight error per weight, the batches."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 6)).eval()
    batches = _batches(n=2)
    s = fewbits.sensitivity(model, batches, ["w3"], method=method, samples=samples, cache_dir=False)
    q = fewbits.calibrate(fewbits.prepare(model, get_candidates(["w3"])[0].recipe()), batches)
    return s.scores["0"]["w3"], (_fake_quantized_weight(q, "0") - model[0].weight).detach().double().pow(2), batches


def test_hessian_trace_of_a_linear_layer_matches_the_closed_form():
    # loss ½‖Wx − t‖² / B over the batch: the Hessian over W is I_out ⊗ XᵀX / B, so
    # Tr(H) / n = ‖X‖²_F / (B · in_features); the score is that times ‖Q(W) − W‖²
    score, delta2, batches = _linear_layer_scored(3, "hessian", 256)
    trace_per_weight = sum(float(b.double().pow(2).sum()) / 8 for b in batches) / len(batches) / 16
    # Hutchinson's estimate: 512 Rademacher probes, relative spread ~ √(2 / (512 · 16)) per output
    assert score == pytest.approx(trace_per_weight * float(delta2.sum()), rel=0.05)


def test_fisher_of_a_linear_layer_matches_the_closed_form():
    # Gaussian targets around the fp32 output: g = −ε xᵀ / B, so E[g²]_oi = Σ_b x_bi² / B²
    score, delta2, batches = _linear_layer_scored(4, "fisher", 512)
    fisher = sum(b.double().pow(2).sum(0) / 64 for b in batches) / len(batches)  # per input, every output alike
    # 1,024 Gaussian draws: relative spread of E[g²] ~ √(2 / 1024) per weight, less summed
    assert score == pytest.approx(float((delta2 * fisher).sum()), rel=0.05)


def test_scores_are_cached_and_a_corrupt_cache_is_named(tmp_path):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(16, 4)).eval()
    batches = _batches(n=2)
    first = fewbits.sensitivity(model, batches, ["w8", "w4a8"], cache_dir=tmp_path)
    (path,) = tmp_path.iterdir()
    assert json.loads(path.read_text())["schema_version"] == 2
    again = fewbits.sensitivity(model, batches, ["w8", "w4a8"], cache_dir=tmp_path)
    assert again.scores == first.scores and again.fingerprint == first.fingerprint
    other = fewbits.sensitivity(model, _batches(n=2, seed=9), ["w8", "w4a8"], cache_dir=tmp_path)
    assert other.fingerprint != first.fingerprint and len(list(tmp_path.iterdir())) == 2
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"sensitivity cache {path}.*not valid JSON"):
        fewbits.sensitivity(model, batches, ["w8", "w4a8"], cache_dir=tmp_path)


def test_groups_longer_than_a_layers_input_score_as_one_partial_group():
    model = nn.Sequential(nn.Linear(96, 4)).eval()  # 96 inputs: one partial group of 128
    s = fewbits.sensitivity(model, _batches(d=96), ["w8", "w4-g128"], cache_dir=False)
    assert s.unavailable == {}
    assert s.scores["0"]["w4-g128"] > s.scores["0"]["w8"] > 0  # 4-bit groups cost more than 8-bit channels


def test_bad_options_are_named():
    model = nn.Sequential(nn.Linear(16, 4))
    with pytest.raises(ValueError, match="method must be one of"):
        fewbits.sensitivity(model, _batches(), method="magic")
    with pytest.raises(ValueError, match=r"unknown candidate formats \['w5'\]"):
        fewbits.sensitivity(model, _batches(), ["w8", "w5"])
    with pytest.raises(ValueError, match="no batches"):
        fewbits.sensitivity(model, [], ["w8"])


class _UnusedHead(torch.nn.Module):
    """A layer whose output the model computes and drops (a pooler nobody reads)."""

    def __init__(self):
        super().__init__()
        self.body, self.pooler = torch.nn.Linear(6, 6), torch.nn.Linear(6, 6)

    def forward(self, x):
        y = self.body(x)
        self.pooler(y)  # computed, unused
        return y


@pytest.mark.parametrize("method", ["hessian", "fisher"])
def test_curvature_scores_a_layer_the_output_does_not_depend_on_as_harmless(method):
    torch.manual_seed(0)
    batches = [torch.randn(8, 6) for _ in range(2)]
    sens = fewbits.sensitivity(_UnusedHead().eval(), batches, ["float", "w8a8", "w3"], method=method, cache_dir=False)
    assert sens.scores["pooler"]["w3"] == 0.0 and sens.scores["body"]["w3"] > 0


def test_hessian_runs_through_attention():
    # Hessian-vector products need attention's second derivative: the fused CPU kernel has none
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1).eval()
    batches = [torch.randn(2, 5, 16) for _ in range(2)]
    sens = fewbits.sensitivity(model, batches, ["float", "w3"], method="hessian", cache_dir=False)
    assert all(s["w3"] > 0 for s in sens.scores.values())


@pytest.mark.parametrize("method", ["sqnr", "loss"])
def test_scores_in_two_worker_processes_equal_one_process(method):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    batches = _batches()
    labels = torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(0))
    # a closure: the workers are forked, nothing is pickled but each (format, layer) job and its score
    loss_fn = (lambda out, batch: nn.functional.cross_entropy(out, labels)) if method == "loss" else None
    one = fewbits.sensitivity(model, batches, ["float", "w8a8", "w3"], method=method, loss_fn=loss_fn,
                              cache_dir=False)
    two = fewbits.sensitivity(model, batches, ["float", "w8a8", "w3"], method=method, loss_fn=loss_fn,
                              cache_dir=False, workers=2)
    # the same operations on the same inputs, one torch thread in every process (conftest, _start_worker)
    assert two.scores == one.scores and two.sqnr_db == one.sqnr_db
    assert all(one.scores[n]["w3"] != 0.0 for n in ("0", "2", "4"))  # a task loss may also fall


def test_a_failing_job_in_a_worker_is_named():
    from fewbits.parallel import run_jobs

    def work(job):
        if job == "b":
            raise ValueError("no such layer")
        return job * 2

    assert run_jobs(work, ["a", "c"], workers=2) == ["aa", "cc"]
    with pytest.raises(RuntimeError, match="layer b: ValueError: no such layer"):
        run_jobs(work, ["a", "b", "c"], workers=2, label="layer")
    with pytest.raises(ValueError, match="workers must be >= 1"):
        run_jobs(work, ["a"], workers=0)
