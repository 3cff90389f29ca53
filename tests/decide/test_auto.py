"""fewbits.auto and `fewbits auto`: the choice is measured, within the drop, on disk, resumable."""
import json

import pytest
import torch
from torch import nn

import fewbits
from fewbits.cli import main


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
