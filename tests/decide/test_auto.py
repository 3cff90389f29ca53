"""fewbits.auto and `fewbits auto`: the choice is measured, within the drop, on disk, resumable."""
import json

import pytest
import torch
from torch import nn

import fewbits
from fewbits.cli import main
from fewbits.decide.auto import low_bit_layers


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 5)).eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(16, 1, 8, 8, generator=g) for _ in range(3)]
    held = torch.randn(256, 1, 8, 8, generator=g)
    with torch.no_grad():
        labels = model(held).argmax(1)

    def agreement(m):  # top-1 agreement with fp32 in percent: fp32 scores 100
        with torch.no_grad():
            return {"agreement": 100.0 * float((m(held).argmax(1) == labels).float().mean())}
    return model, calib, agreement


def test_auto_picks_a_measured_configuration_within_the_drop_and_resumes(tmp_path):
    model, calib, agreement = _setup()
    r = fewbits.auto(model, calib, metric_fn=agreement, max_drop=2.0, out=tmp_path, cache_dir=False)
    assert r.fp32 == 100.0 and r.drop <= 2.0
    measured = [t for t in r.trials if not t.get("resumed")]
    assert measured and all(t["ok"] == (t["drop"] <= 2.0) for t in measured)
    # the cheapest point tried within the drop is the one chosen
    within = [t for t in r.trials if t["ok"]]
    if within:
        assert r.choice.costs["bytes"] == min(t["costs"]["bytes"] for t in within)
    lines = (tmp_path / "trials.jsonl").read_text().splitlines()
    assert len(lines) == len(measured)
    recipe = fewbits.get_recipe(str(tmp_path / "recipe.json"))
    q = fewbits.calibrate(fewbits.prepare(model, recipe), calib)
    assert agreement(q)["agreement"] == r.metric  # the file is the configuration measured (deterministic)
    assert (tmp_path / "model.fewbits").is_file() and json.loads((tmp_path / "auto.json").read_text())["schema_version"] == 1
    again = fewbits.auto(model, calib, metric_fn=agreement, max_drop=2.0, out=tmp_path, cache_dir=False)
    assert all(t.get("resumed") for t in again.trials) and again.choice.formats == r.choice.formats
    assert len((tmp_path / "trials.jsonl").read_text().splitlines()) == len(lines)  # nothing measured twice


def test_a_low_bit_point_that_misses_the_drop_is_retried_with_gptq_on_exactly_its_low_bit_layers(tmp_path):
    model, calib, agreement = _setup()
    seen = []  # (layers GPTQ treated, layers with weights of <= 4 bits) per quantized model measured

    def only_with_gptq(m):  # a metric that passes a low-bit point only when GPTQ treated its low-bit layers
        if not isinstance(m, fewbits.QuantizedModel):
            return {"score": 100.0}
        applied = [r for r in m.applied if r.step.get("name") == "gptq"]
        low = sorted(n for n, layer in m.quantized_layers().items()
                     if layer.weight_quantizer is not None and layer.weight_quantizer.spec.bits <= 4)
        seen.append((sorted(applied[0].layers) if applied else None, low))
        return {"score": 0.0 if low and not applied else agreement(m)["agreement"]}

    r = fewbits.auto(model, calib, metric_fn=only_with_gptq, max_drop=50.0, candidates=("float", "w8", "w3"),
                     out=tmp_path, cache_dir=False, report=False)
    low = low_bit_layers(r.choice.formats)
    assert low and r.algorithms == ["gptq"]  # the cheapest point passes only on its retry
    for t in (t for t in r.trials if t["algorithms"] == ["gptq"]):  # a retry follows a plain miss of its point
        assert any(p["point"] == t["point"] and not p["ok"] and not p["algorithms"] for p in r.trials)
    assert any(g for g, _ in seen) and all(g == low_now for g, low_now in seen if g is not None)
    recipe = fewbits.get_recipe(str(tmp_path / "recipe.json"))
    assert [type(s).__name__ for s in recipe.steps] == ["GPTQ", "BiasCorrection"]
    assert tuple(recipe.steps[0].layers) == low  # exact names, not a glob
    again = fewbits.auto(model, calib, metric_fn=only_with_gptq, max_drop=50.0, candidates=("float", "w8", "w3"),
                         out=tmp_path, cache_dir=False, report=False)
    assert all(t.get("resumed") for t in again.trials) and again.algorithms == ["gptq"]
    assert again.choice.formats == r.choice.formats


def test_a_coarse_front_is_refined_between_the_chosen_point_and_its_cheaper_neighbour_that_missed(tmp_path):
    model, calib, _ = _setup()

    def at_most_one_low_bit_layer(m):  # passes while no more than one layer has weights below 8 bits
        if not isinstance(m, fewbits.QuantizedModel):
            return {"score": 100.0}
        low = [n for n, layer in m.quantized_layers().items()
               if layer.weight_quantizer is not None and layer.weight_quantizer.spec.bits < 8]
        return {"score": 100.0 if len(low) <= 1 else 0.0}

    kwargs = dict(metric_fn=at_most_one_low_bit_layer, max_drop=1.0, candidates=("float", "w8", "w3"), algos="none",
                  points=2, cache_dir=False, report=False)
    coarse = fewbits.auto(model, calib, refine=0, **kwargs)
    assert set(coarse.choice.formats.values()) == {"float"}  # two points: all w3 misses, all float is left
    r = fewbits.auto(model, calib, out=tmp_path, **kwargs)
    assert r.choice.costs["bytes"] < coarse.choice.costs["bytes"] and r.drop <= 1.0
    assert sum(f == "w3" for f in r.choice.formats.values()) <= 1
    costs = [c.costs["bytes"] for c in r.front]
    assert costs == sorted(costs) and len(r.front) > len(coarse.front)  # points inserted, in order
    i = next(i for i, c in enumerate(r.front) if c.formats == r.choice.formats)
    assert any(t["point"] == i - 1 and not t["ok"] for t in r.trials)  # its cheaper neighbour was tried and missed
    assert all(r.front[t["point"]].formats == t["formats"] for t in r.trials)


def test_auto_refuses_what_it_cannot_do(tmp_path):
    model, calib, agreement = _setup()
    with pytest.raises(ValueError, match="objective must be one of"):
        fewbits.auto(model, calib, metric_fn=agreement, objective="speed")
    with pytest.raises(ValueError, match="unknown budget keys"):
        fewbits.auto(model, calib, metric_fn=agreement, budgets={"watts": 1})
    (tmp_path / "trials.jsonl").write_text("{broken\n")
    with pytest.raises(ValueError, match="trials.jsonl line 1: not a trial"):
        fewbits.auto(model, calib, metric_fn=agreement, out=tmp_path, cache_dir=False)


def test_cli_auto_writes_its_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEWBITS_CACHE", str(tmp_path / "cache"))  # the sensitivity cache, not the user's
    out = tmp_path / "auto"
    assert main(["auto", "--task", "digits", "--small", "--max-drop", "1.0", "--out", str(out), "--json", str(tmp_path / "a.json"),
                 "--candidates", "float,w8a8,w4a8,w3", "--points", "6"]) == 0
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["drop"] <= 1.0 and set(data["choice"]["formats"].values()) <= {"float", "w8a8", "w4a8", "w3"}
    assert {"recipe.json", "model.fewbits", "trials.jsonl", "auto.json"} <= {p.name for p in out.iterdir()}
    assert "fewbits auto: digits" in capsys.readouterr().out
    assert len(list((tmp_path / "cache" / "sensitivity").iterdir())) == 1
    assert {"report.html", "report_data.json", "model.onnx"} <= {p.name for p in out.iterdir()}
    assert main(["auto", "--task", "digits", "--budget", "watts=3"]) == 2
