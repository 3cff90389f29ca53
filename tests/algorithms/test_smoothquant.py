"""SmoothQuant: the closed-form scale, the float function kept, outliers moved, recipe steps."""
import copy
import json

import pytest
import torch
from torch import nn

import fewbits
from fewbits import SmoothQuant
from fewbits.algorithms.smoothquant import LayerInputs, choose_alpha, smoothing_scale
from fewbits.steps import parse_steps, step_from_dict
from fewbits.wrap import Status, quantization_disabled


class Block(nn.Module):
    """LayerNorm → Linear → GELU → Linear with a few huge LayerNorm channels, as in BERT."""

    def __init__(self, d=32, hidden=64):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(d)
        with torch.no_grad():
            self.norm.weight[:3] = torch.tensor([40.0, -25.0, 30.0])
        self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return self.down(nn.functional.gelu(self.up(self.norm(x))))


def _batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 16, 32, generator=g) for _ in range(n)]


def test_smoothing_scale_is_the_papers_formula():
    act, w = torch.tensor([4.0, 1.0, 0.0, 9.0]), torch.tensor([1.0, 4.0, 2.0, 0.0])
    s = smoothing_scale(act, w, 0.5)
    # s_j = sqrt(act_j / w_j); channels with a zero column or a silent input keep s = 1
    assert torch.equal(s, torch.tensor([2.0, 0.5, 1.0, 1.0]))
    assert torch.equal(smoothing_scale(act, w, 1.0)[:2], act[:2])
    assert torch.allclose(smoothing_scale(act, w, 0.0)[:2], 1 / w[:2])


def test_smoothing_keeps_the_float_function_and_moves_outliers_into_weights():
    model = Block().eval()
    batches = _batches()
    q = fewbits.prepare(model, "w8a8")
    result = fewbits.apply(q, SmoothQuant(alpha=0.5), batches)
    assert set(result.layers) == {"up", "down"} and result.skipped == [] and result.seconds > 0
    assert q.status is Status.PREPARED  # the smoothed inputs need new ranges
    x = batches[0]
    with torch.no_grad(), quantization_disabled(q) as float_path:
        # same function: only float32 rounding of x / s and W · s differs
        assert torch.allclose(float_path(x), model(x), atol=1e-4, rtol=1e-4)
    # the layer fed by the outlier channels gains most: the paper's point
    assert result.layers["up"]["sqnr_db_after"] > result.layers["up"]["sqnr_db_before"] + 6
    assert model.up.weight.abs().amax(0)[0] < q.model.up.weight.abs().amax(0)[0]  # input model untouched
    fewbits.calibrate(q, batches)
    plain = fewbits.prepare(model, "w8a8")
    fewbits.calibrate(plain, batches)
    ref = model(x)
    err = lambda m: (m(x) - ref).pow(2).mean().item()  # noqa: E731
    assert err(q) < err(plain) / 2


def test_search_keeps_a_layer_unsmoothed_when_nothing_helps():
    torch.manual_seed(0)
    x = torch.randn(256, 16)  # no outlier channels in the input ...
    w = torch.randn(8, 16)
    w[:, 0] *= 100  # ... but one in the weight
    inputs = LayerInputs(x.amin(0), x.amax(0), x)
    a8 = fewbits.QuantSpec(bits=8, signed=False, symmetric=False)
    w8 = fewbits.QuantSpec(bits=8, granularity=fewbits.PerChannel(0))
    alpha, before, best = choose_alpha(inputs, w, (0.0,), a8, w8)
    # α = 0 would move w's outlier column into x's per-tensor range: the layer stays as it is
    assert alpha is None and best == before
    alpha, before, best = choose_alpha(inputs, w, tuple(i / 10 for i in range(11)), a8, w8)
    assert best >= before


def test_recipe_steps_run_once_inside_calibrate_and_round_trip():
    recipe = fewbits.get_recipe("w8a8-smoothquant")
    assert recipe.steps == (SmoothQuant(alpha=None),)
    assert fewbits.Recipe.from_json(recipe.to_json()) == recipe
    model, batches = Block().eval(), _batches()
    q = fewbits.prepare(model, recipe)
    fewbits.calibrate(q, iter(batches))  # a one-shot iterator serves both the step and the ranges
    assert len(q.applied) == 1 and q.status is Status.CALIBRATED
    fewbits.calibrate(q, batches)
    assert len(q.applied) == 1  # already smoothed: not smoothed twice
    json.dumps(q.applied[0].to_dict())


def test_step_errors_name_the_fault():
    with pytest.raises(ValueError, match=r"unknown step 'gptx'; known: \['adaround', 'awq', 'bc', 'cle', 'gptq', 'smoothquant', 'stochastic'\]"):
        step_from_dict({"name": "gptx"})
    with pytest.raises(ValueError, match=r"step 'smoothquant': unknown keys \['beta'\]"):
        step_from_dict({"name": "smoothquant", "beta": 1})
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\], got 1.5"):
        SmoothQuant(alpha=1.5)
    assert parse_steps("smoothquant") == [SmoothQuant()]
    q = fewbits.prepare(Block().eval(), "w8a8")
    with pytest.raises(ValueError, match="not an algorithm step"):
        fewbits.apply(q, "smoothquant", _batches())


def test_bad_batch_changes_nothing():
    q = fewbits.prepare(Block().eval(), "w8a8")
    before = copy.deepcopy(q.model.state_dict())
    bad = _batches(2) + [torch.full((8, 16, 32), float("nan"))]
    with pytest.raises(ValueError, match="calibration batch 2: argument 0 has non-finite values"):
        fewbits.apply(q, SmoothQuant(), bad)
    after = q.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and q.applied == []


def test_layers_it_cannot_smooth_are_listed():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.conv = nn.Linear(8, 8), nn.Linear(8, 8), nn.Conv1d(8, 8, 1)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.conv(self.b(self.a(x)).unsqueeze(-1))

    q = fewbits.prepare(Tied().eval(), "w8a8")
    result = fewbits.apply(q, SmoothQuant(), [torch.randn(4, 8)])
    reasons = {s.name: s.reason for s in result.skipped}
    assert set(reasons) == {"a", "b", "conv"} and "tied" in reasons["a"] and "Conv1d" in reasons["conv"]
    w8 = fewbits.prepare(Block().eval(), "w8")
    assert all("input" in s.reason for s in fewbits.apply(w8, SmoothQuant(), _batches()).skipped)


def test_minilm_fidelity_with_smoothquant(task_scores):
    scores = task_scores("minilm-wordnet", ("w8a8", "w8a8-smoothquant"))
    # measured on this subset: cosine mean 0.993 -> 0.996, top-10 overlap 0.90 -> 0.94 (full set:
    # 0.998, 0.94); the floors sit between plain w8a8 and what smoothing gives. The minimum over 400
    # embeddings with 64 calibration texts is one outlier sentence: the benchmark checks it on 2,000.
    plain, smooth = scores["w8a8"], scores["w8a8-smoothquant"]
    assert smooth["cosine_mean"] >= 0.995 > plain["cosine_mean"]
    assert smooth["top10_overlap"] >= 0.92 > plain["top10_overlap"]
