"""The measured-latency table, the integer chains a mixed choice keeps, and the ILP with chain
savings against brute force."""
import itertools
import json

import pytest
import torch
from torch import nn

import fewbits
from fewbits.decide.cost import layer_costs
from fewbits.decide.graph import FLOAT_OP, MODEL_OUTPUT, layer_readers, replay
from fewbits.decide.latency import LatencyTable, latency_table, machine_key
from fewbits.decide.search import _choice, solve
from fewbits.export.onnx import export_onnx


class _Block(nn.Module):
    """conv → ReLU → max pool → conv, a residual addition, a linear head behind a ReLU."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 1)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        y = self.b(torch.max_pool2d(torch.relu(self.a(x)), 2))
        y = y + self.c(y)  # b is read by c and by the addition: no chain
        return self.fc2(torch.relu(self.fc1(torch.relu(y).flatten(1))))


def _model():
    torch.manual_seed(0)
    return _Block().eval()


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)]


def test_readers_follow_value_preserving_ops_to_the_next_layer():
    model, x = _model(), _batches()[0]
    r = layer_readers(model, ["a", "b", "c", "fc1", "fc2"], x)
    assert r.readers["a"] == {"b"} and r.readers["b"] == {"c", FLOAT_OP} and r.readers["fc2"] == {MODEL_OUTPUT}
    assert r.sources["b"] == {"a"} and r.sources["fc1"] == set()  # fc1 reads the addition's output
    assert r.activated == {"a", "fc1"}  # c's output meets the addition before its ReLU
    assert r.chains() == [("a", "b"), ("fc1", "fc2")]
    with torch.no_grad():  # the recorded ops between a and b are the forward's
        assert torch.equal(replay(r.paths[("a", "b")], model.a(x)), torch.max_pool2d(torch.relu(model.a(x)), 2))


def test_a_mixed_choice_keeps_every_integer_layer_on_integer_kernels(tmp_path):
    model, batches = _model(), _batches()
    costs = layer_costs(model, batches[0], ["float", "w8a8", "w8"])
    sens = fewbits.sensitivity(model, batches, ["float", "w8a8", "w8"], method="sqnr", cache_dir=False)
    # a hands on to b (integer), b is read by an addition, fc1 (behind a ReLU) by a float layer
    choice = _choice({"a": "w8a8", "b": "w8a8", "c": "w8", "fc1": "w8a8", "fc2": "float"}, sens, costs)
    assert choice.outputs == ("b", "fc1")
    q = fewbits.calibrate(fewbits.prepare(model, choice.recipe()), batches)
    with _no_unfused_warning():
        exported = export_onnx(q, batches[0], tmp_path / "m.onnx", verify=False)
    assert exported.kernels.integer == 3 and not exported.kernels.unfused


class _no_unfused_warning:
    def __enter__(self):
        import warnings

        self.catch = warnings.catch_warnings(record=True)
        self.caught = self.catch.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self.catch.__exit__(*exc)
        assert not [w for w in self.caught if "did not fuse" in str(w.message)]


def _fake_latency_costs():
    """Costs with made-up latencies and chain savings (no timing): the ILP's arithmetic alone."""
    model, batches = _model(), _batches()
    costs = layer_costs(model, batches[0], ["float", "w8a8", "w8"])
    g = torch.Generator().manual_seed(3)
    for row in costs.table.values():
        for cell in row.values():
            cell["latency_s"] = float(torch.rand(1, generator=g)) * 1e-3
    costs.constant["latency_s"] = 2e-4
    for saving in costs.chain_savings:  # negative ones too: a pair that costs more than its layers alone
        for k, combo in enumerate(("integer|integer", "float|float", "weight|float", "integer|weight")):
            saving[combo] = {"latency_s": (4e-4, 1e-4, -2e-4, -1e-4)[k]}
    # groups (layout regions, siblings): a saving when every member is in one of its domains
    costs.groups = [{"members": {"a": ["integer"], "b": ["integer"], "c": ["integer"]}, "latency_s": 3e-4},
                    {"members": {"b": ["float", "weight"], "c": ["float", "weight"]}, "latency_s": 1e-4}]
    sens = fewbits.sensitivity(model, batches, ["float", "w8a8", "w8"], method="sqnr", cache_dir=False)
    return sens, costs


def test_the_ilp_with_chain_savings_finds_the_brute_force_optimum():
    sens, costs = _fake_latency_costs()
    assert costs.chains == [("a", "b"), ("fc1", "fc2")]
    layers = list(sens.scores)
    options = [[c for c, s in sens.scores[l].items() if s is not None and c in costs.table[l]] for l in layers]
    configs = [dict(zip(layers, combo)) for combo in itertools.product(*options)]
    totals = sorted(costs.total(c, "latency_s") for c in configs)
    for budget in (totals[0], totals[len(totals) // 4], totals[len(totals) // 2]):
        best = min(sum(sens.scores[l][c] for l, c in f.items()) for f in configs
                   if costs.total(f, "latency_s") <= budget + 1e-15)
        choice = solve(sens, costs, {"latency_s": budget + 1e-15})
        # the ILP's cost is the same sum as Costs.total (savings on chain edges whose ends agree, and on groups)
        assert choice.costs["latency_s"] <= budget + 1e-12
        assert choice.damage == pytest.approx(best, rel=1e-9, abs=1e-15)  # HiGHS is exact on problems this small


def test_the_latency_table_measures_once_and_refuses_what_it_does_not_hold(tmp_path):
    model, batches = _model(), _batches()
    path = tmp_path / "latency.json"
    lat = latency_table(model, batches[0], ["float", "w8a8"], path=path, seconds=0.05)
    assert set(lat.seconds) == {"a", "b", "c", "fc1", "fc2"}
    assert all({"float", "w8a8"} <= set(s) for s in lat.seconds.values())
    assert all(v >= 0 for s in lat.seconds.values() for v in s.values())
    assert set(lat.chain_savings) == {("a", "b"), ("fc1", "fc2")}
    assert set(lat.chain_savings[("a", "b")]) == {"float|float", "float|integer", "integer|float", "integer|integer"}
    data = json.loads(path.read_text())
    assert data["format"] == "fewbits.latency" and data["schema_version"] == 4
    older = tmp_path / "older.json"  # a table an earlier fewbits wrote: measured again, with a warning
    older.write_text(json.dumps({**data, "schema_version": 2}))
    with pytest.warns(UserWarning, match="schema 2.*measuring it again"):
        assert LatencyTable.load(older, 2).entries == {}
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({**data, "schema_version": 99}))
    with pytest.raises(ValueError, match="schema version 99"):
        LatencyTable.load(newer, 2)
    assert data["runtime"].startswith("onnxruntime ") and data["profile"] == machine_key(2)["profile"]
    assert any(" >> " in k for k in data["entries"])  # the chain pairs, timed alone
    # every entry there: read back, nothing measured (the fp32 model is timed again)
    again = latency_table(model, batches[0], ["float", "w8a8"], path=path, measure=False, seconds=0.05)
    # the same entries, in seconds of the reference graph timed at each reading (exact but for rounding)
    # (each layer's time inside the model: the table's entry times its domain's bank ratio, measured at each reading)
    from fewbits.decide.candidates import CANDIDATES

    def entries(t):
        return {(n, f): v / t.reference_s / t.in_model[CANDIDATES[f].domain] for n, d in t.seconds.items()
                for f, v in d.items()}

    assert set(again.in_model) == {"float", "integer"} and all(r > 0 for r in again.in_model.values())
    assert entries(again) == pytest.approx(entries(lat), rel=1e-12)
    costs = layer_costs(model, batches[0], ["float", "w8a8"], latency=again)
    # by construction the table predicts the fp32 model it was calibrated on
    assert costs.total({n: "float" for n in costs.table}, "latency_s") == pytest.approx(again.fp32_s, rel=1e-9)
    with pytest.raises(ValueError, match=r"entries missing, e\.g\..*\| w8"):
        latency_table(model, batches[0], ["float", "w8a8", "w8"], path=path, measure=False)
    with pytest.raises(ValueError, match="no entry for"):
        layer_costs(model, batches[0], ["float", "w8a8", "w8"], latency=again)
    other = dict(data, cpu="another CPU")
    path.write_text(json.dumps(other))
    with pytest.raises(ValueError, match="another machine.*cpu 'another CPU'"):
        LatencyTable.load(path, 2)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable latency table"):
        LatencyTable.load(path, 2)


def test_auto_minimises_measured_latency_and_writes_its_report(tmp_path, monkeypatch):
    from fewbits.cli import main

    monkeypatch.setenv("FEWBITS_CACHE", str(tmp_path / "cache"))
    model, batches = _model(), _batches()
    held = torch.randn(128, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        labels = model(held).argmax(1)

    def agreement(m):  # top-1 agreement with fp32 in percent
        with torch.no_grad():
            return {"agreement": 100.0 * float((m(held).argmax(1) == labels).float().mean())}

    out = tmp_path / "run"
    # the table timed briefly beforehand (auto reads what it holds and measures nothing again)
    latency_table(model, batches[0], ["float", "w8a8", "w8"], path=tmp_path / "latency.json", seconds=0.05)
    r = fewbits.auto(model, batches, metric_fn=agreement, max_drop=5.0, objective="latency", out=out,
                     candidates=("float", "w8a8", "w8"), method="sqnr", points=4, cache_dir=False,
                     latency_path=tmp_path / "latency.json")
    assert "latency_s" in r.choice.costs and r.drop <= 5.0
    data = json.loads((out / "report_data.json").read_text())
    assert data["front_key"] == "latency_s" and data["summary"]["latency_s"] > 0
    assert {c["name"] for c in data["latency_check"]} == {"chosen", "fp32", "uniform w8a8"}
    page = (out / "report.html").read_text()
    assert page.count("<img class=plot") >= 3 and "a" in [row["name"] for row in data["layers"]]
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.html").is_file()
    assert main(["report", str(tmp_path / "nothing-here")]) == 2


class _Stream(nn.Module):
    """A residual stream of 1×1 convolutions (one layout region), then a float mean read by three
    sibling linear layers."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.p1, self.p2, self.head = nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 1)
        self.q, self.k, self.v = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(16, 8)

    def forward(self, x):
        s = torch.relu(self.stem(x))
        s = s + self.p1(s)
        s = s + self.p2(s)
        t = self.head(s).mean((2, 3))
        return self.q(t) + self.k(t) * self.v(t)


def test_layout_regions_and_siblings_are_found_measured_and_priced(tmp_path):
    torch.manual_seed(0)
    model = _Stream().eval()
    x = torch.randn(1, 3, 12, 12)
    names = ["stem", "p1", "p2", "head", "q", "k", "v"]
    r = layer_readers(model, names, x)
    assert r.layout_regions() == [{"producers": ["p1", "p2", "stem"], "consumers": ["head", "p1", "p2"],
                                   "float_op": False}]
    assert r.siblings == [["q", "k", "v"]]
    lat = latency_table(model, x, ["float", "w8a8"], path=tmp_path / "lat.json", seconds=0.05)
    # alone, an integer convolution has a uint8 transpose on each side, a float one a reorder; each
    # side is timed (never negative: the empty call is subtracted and clamped). Not asserted > 0: a
    # transpose of 432 bytes costs less than the empty call's noise, and a CI run measured 0.0
    for n in ("stem", "p1", "p2", "head"):
        assert set(lat.layout[n]["w8a8"]) == {"layout_in", "layout_out"} and min(lat.layout[n]["w8a8"].values()) >= 0
    region = {"stem": ["integer"], "p1": ["integer"], "p2": ["integer"], "head": ["integer"]}
    (integer,) = [g for g in lat.groups if g["why"] == "layout region" and g["members"] == region]
    assert integer["latency_s"] == pytest.approx(
        sum(lat.layout[p]["w8a8"]["layout_out"] for p in ("stem", "p1", "p2"))
        + sum(lat.layout[c]["w8a8"]["layout_in"] for c in ("p1", "p2", "head")), rel=1e-12)  # the same sum
    (siblings,) = [g for g in lat.groups if g["why"] == "siblings"]
    assert siblings["members"] == {s: ["float", "weight"] for s in ("q", "k", "v")}
    assert all(lat.shared_input[s] == siblings["latency_s"] for s in ("q", "k", "v"))
    costs = layer_costs(model, x, ["float", "w8a8"], latency=lat)
    # exact on the two models measured whole: fp32, and every layer integer (its neighbours' savings scaled)
    assert costs.total({n: "float" for n in names}, "latency_s") == pytest.approx(lat.fp32_s, rel=1e-9)
    assert lat.integer_anchor["formats"] == {n: "w8a8" for n in names}
    scale = costs.calibration["integer_savings_scale"]
    predicted = costs.total(lat.integer_anchor["formats"], "latency_s")
    if scale > 0:  # the same sums in another order
        assert predicted == pytest.approx(lat.integer_anchor["seconds"], rel=1e-9)
    else:  # clamped: measured slower than predicted even with no integer saving at all
        assert predicted < lat.integer_anchor["seconds"]
    # three integer siblings pay one input quantization, not three
    one = {**{n: "float" for n in names}, "q": "w8a8"}
    three = {**one, "k": "w8a8", "v": "w8a8"}
    cell = {s: lat.seconds[s]["w8a8"] - lat.seconds[s]["float"] for s in ("k", "v")}
    q_in = siblings["latency_s"]
    assert costs.total(three, "latency_s") - costs.total(one, "latency_s") == pytest.approx(
        cell["k"] + cell["v"] - 2 * q_in, rel=1e-9, abs=1e-12)  # float sums in another order
    # what the model assumes of ONNX Runtime: in one integer region the transposes cancel
    from fewbits.decide.latency import _optimized_ops

    sens = fewbits.sensitivity(model, [x], ["float", "w8a8"], method="sqnr", cache_dir=False)
    q = fewbits.calibrate(fewbits.prepare(model, _choice({n: "w8a8" for n in names}, sens, costs).recipe()), [x])
    exported = export_onnx(q, x, tmp_path / "all.onnx", verify=False, dynamic="none")
    ops = _optimized_ops(exported.path, 2, tmp_path / "all-opt.onnx")
    assert ops.count("Transpose") <= 2  # the 4 convolutions alone carry 8
    import onnx

    gemms = [n for n in onnx.load(str(tmp_path / "all-opt.onnx")).graph.node if n.op_type == "QGemm"]
    assert len(gemms) == 3 and len({n.input[0] for n in gemms}) == 1  # one quantized input for the three siblings
