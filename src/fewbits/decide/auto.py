"""The automatic recipe: sensitivity → exact search → validated by quantizing and measuring.

``fewbits.auto(model, calibration, metric_fn=..., max_drop=1.0, objective="size")``:

1. every layer's sensitivity in every candidate format (:func:`fewbits.sensitivity`, on the
   first ``score_batches`` calibration batches) and its cost (:func:`layer_costs`);
2. the Pareto front of predicted damage against the objective's cost, within any other
   ``budgets`` (:func:`pareto_front`, integer linear programming);
3. a bisection along the front: each point tried is quantized (with the default's bias
   correction for convolutions when ``algos="auto"``) and measured with ``metric_fn``; the
   cheapest point whose measured drop is within ``max_drop`` wins. The last point of the front
   keeps every layer float and needs no trial. With ``algos="auto"`` a point that misses the
   drop and gives some layers uniform weights of 4 bits or fewer is tried once more with GPTQ on
   exactly those layers (where the rounding choice pays most); the attempt that passes, or the
   better one, is the point's trial. When the bisection ends with the cheaper neighbour of the
   chosen point missing the drop, the front is refined between the two (``refine`` rounds of
   ``points // 2`` budgets) and bisected again.

Every trial is appended to ``trials.jsonl`` in ``out``; the best configuration so far is always
on disk (``recipe.json`` — ``fewbits quantize --recipe out/recipe.json`` re-uses it — and
``model.fewbits``), so an interrupted run loses nothing, and a second run with the same ``out``
reads the trials back instead of measuring them again. At the end ``model.onnx`` (where the
example input exports), ``auto.json`` (the front, the trials, the choice), ``report_data.json``
and ``report.html`` (:mod:`fewbits.report.html`) are written.

``objective="latency"`` (or a ``latency_s`` budget) builds the measured-latency table first
(:func:`~fewbits.decide.latency.latency_table`, cached per machine); the chosen model's deployed
latency is then measured and set beside the prediction.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from ..files import write_atomic, write_json_atomic
from ..flow import calibrate, prepare
from ..recipe import CONV_BIAS_CORRECTION
from ..spec import QuantSpec
from ..steps import GPTQ
from .candidates import CANDIDATES
from .cost import layer_costs
from .latency import latency_table
from .search import COST_KEYS, Choice, pareto_front
from .sensitivity import sensitivity

OBJECTIVES = {"size": "bytes", "latency": "latency_s", "energy": "energy_pj", "bops": "bops"}
AUTO_CANDIDATES = ("float", "w8a8", "w4a8", "w8", "w4-g128", "w3")
SCHEMA_VERSION = 1
LOW_BITS = 4  # uniform weights this narrow or narrower get GPTQ on a retry (algos="auto")


def low_bit_layers(formats: dict) -> tuple:
    """The layers a point gives uniform weights of ``LOW_BITS`` or fewer (GPTQ's layers on a retry)."""
    def low(fmt: str) -> bool:
        c = CANDIDATES[fmt]
        return c.weight_bits is not None and c.weight_bits <= LOW_BITS and isinstance(c.layer.weight.spec, QuantSpec)
    return tuple(sorted(name for name, fmt in formats.items() if low(fmt)))


@dataclass
class AutoResult:
    """The chosen configuration (``choice``, its measured ``metric`` and ``drop``), the front
    and every trial."""

    choice: Choice
    metric: float
    drop: float
    fp32: float
    front: list = field(default_factory=list)
    trials: list = field(default_factory=list)
    files: dict = field(default_factory=dict)
    seconds: float = 0.0
    algorithms: list = field(default_factory=list)  # what ran beyond the formats' own steps ("gptq")

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "choice": self.choice.to_dict(), "metric": self.metric,
                "drop": self.drop, "fp32": self.fp32, "front": [c.to_dict() for c in self.front],
                "trials": self.trials, "files": self.files, "seconds": round(self.seconds, 2),
                "algorithms": self.algorithms}


def _tag(formats: dict, algorithms) -> str:
    """A trial's identity: its formats and the algorithms it ran (what a resumed run looks up)."""
    return json.dumps({"formats": formats, "algorithms": list(algorithms)}, sort_keys=True)


def _read_trials(path: Path) -> dict:
    """Earlier trials by their formats (a line that does not parse is an error naming the file)."""
    trials = {}
    if not path.is_file():
        return trials
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            trial = json.loads(line)
            trials[_tag(trial["formats"], trial.get("algorithms", []))] = trial
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path} line {i}: not a trial ({type(err).__name__}); delete the file to start over") \
                from None
    return trials


def auto(model, calibration, *, metric_fn: Callable, metric: Optional[str] = None, max_drop: float = 1.0,
         objective: str = "size", budgets: Optional[dict] = None, candidates=AUTO_CANDIDATES, method: str = "loss",
         algos: str = "auto", lower_is_better: bool = False, out=None, points: int = 12, score_batches: int = 4,
         example=None, cache_dir=None, latency_path=None, latency_batch: int = 1, threads: int = 2,
         title: Optional[str] = None, report: bool = True, refine: int = 2, workers: int = 1) -> AutoResult:
    """The smallest (``objective="size"``; ``"energy"``, ``"bops"``) configuration whose measured
    metric is within ``max_drop`` of fp32 (see the module docstring). ``metric_fn(model) ->
    {name: value}``; ``metric``: the key to read (default: the first); ``lower_is_better`` for
    perplexity-like metrics; ``out``: the run's directory; ``example``: the input the ONNX file
    is exported on (default: the first calibration batch); ``latency_path``, ``latency_batch``,
    ``threads``: the latency table's file, the batch size and threads it is timed at; ``refine``:
    rounds of budgets inserted between the chosen point and its cheaper neighbour that missed;
    ``workers``: processes the sensitivity is scored in (:func:`~fewbits.decide.sensitivity`)."""
    start = time.perf_counter()
    if objective not in OBJECTIVES:
        raise ValueError(f"auto objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    if algos not in ("auto", "none"):
        raise ValueError(f"auto algos must be 'auto' or 'none', got {algos!r}")
    if max_drop < 0:
        raise ValueError(f"auto max_drop must be >= 0, got {max_drop}")
    budgets = dict(budgets or {})
    unknown = sorted(set(budgets) - set(COST_KEYS))
    if unknown:
        raise ValueError(f"unknown budget keys {unknown}; known: {list(COST_KEYS)}")
    calibration = list(calibration)
    if not calibration:
        raise ValueError("auto: no calibration batches given")
    key = OBJECTIVES[objective]
    out = Path(out) if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    def measure(m) -> float:
        values = metric_fn(m)
        return float(values[metric] if metric else next(iter(values.values())))

    fp32 = measure(model)
    sens = sensitivity(model, calibration[:score_batches], candidates, method, cache_dir=cache_dir, workers=workers)
    latency = None
    if key == "latency_s" or "latency_s" in budgets:
        latency = latency_table(model, calibration[0], candidates, path=latency_path, batch_size=latency_batch,
                                threads=threads)
    costs = layer_costs(model, calibration[0], candidates, latency=latency)
    front = pareto_front(sens, costs, key, points=points, budgets=budgets)
    known = _read_trials(out / "trials.jsonl") if out is not None else {}
    trials = []

    def recipe_of(i: int, gptq: bool = False):
        recipe = front[i].recipe(f"auto-{objective}-{i}")
        if algos == "none":
            return recipe
        low = low_bit_layers(front[i].formats) if gptq else ()
        return replace(recipe, steps=((GPTQ(layers=low),) if low else ()) + (CONV_BIAS_CORRECTION,))

    def attempt(i: int, gptq: bool) -> tuple[dict, object]:
        """One quantization of point ``i``: its record and model (``None`` when read back from an
        earlier run)."""
        algorithms = ["gptq"] if gptq else []
        tag = _tag(front[i].formats, algorithms)
        if tag in known:
            trials.append(dict(known[tag], resumed=True))
            return trials[-1], None
        t0 = time.perf_counter()
        q = calibrate(prepare(model, recipe_of(i, gptq)), calibration)
        value = measure(q)
        drop = (value - fp32) if lower_is_better else (fp32 - value)
        trials.append({"point": i, "formats": front[i].formats, "algorithms": algorithms,
                       "predicted": front[i].damage, "costs": front[i].costs, "metric": value, "drop": drop,
                       "ok": drop <= max_drop, "seconds": round(time.perf_counter() - t0, 2)})
        if out is not None:
            with open(out / "trials.jsonl", "a") as f:
                f.write(json.dumps(trials[-1]) + "\n")
        return trials[-1], q

    def trial(i: int) -> tuple[dict, object, bool]:
        """Point ``i`` quantized as it is, and once more with GPTQ on its low-bit layers when that
        misses the drop (``algos="auto"``): the passing (or better) attempt, its model, and
        whether it ran GPTQ."""
        record, q = attempt(i, False)
        if record["ok"] or algos == "none" or not low_bit_layers(front[i].formats):
            return record, q, False
        again, q2 = attempt(i, True)
        return (again, q2, True) if again["drop"] < record["drop"] else (record, q, False)

    best, best_record, best_model = len(front) - 1, None, None  # the last point keeps every layer float
    best_gptq, missed = False, set()
    lo, hi = 0, len(front) - 1
    for round_ in range(refine + 1):
        while lo < hi:  # the cheapest point within max_drop, assuming the measured drop falls along the front
            mid = (lo + hi) // 2
            record, q, with_gptq = trial(mid)
            if record["ok"]:
                hi = best = mid
                best_record, best_model, best_gptq = record, q, with_gptq
                if q is not None and out is not None:  # the best so far on disk (a resumed one is there already)
                    _write_files(out, recipe_of(best, best_gptq), q)
            else:
                missed.add(mid)
                lo = mid + 1
        if round_ == refine or best - 1 not in missed:
            break
        # the cheaper neighbour missed the drop: budgets between the two, bisected in turn
        between = _between(front[best - 1], front[best], sens, costs, key, budgets, max(3, points // 2))
        if not between:
            break
        front[best:best] = between
        missed = {i for i in missed if i < best}
        lo, hi, best = best, best + len(between), best + len(between)
    for t in trials:  # the index in the final front (refining inserts points)
        t["point"] = next(i for i, c in enumerate(front) if c.formats == t["formats"])
    value = best_record["metric"] if best_record else fp32
    result = AutoResult(front[best], value, (value - fp32) if lower_is_better else (fp32 - value), fp32, front, trials,
                        algorithms=["gptq"] if best_gptq else [])
    if out is not None:
        if best_model is None:  # read back, or all float: quantized once more to write it
            best_model = calibrate(prepare(model, recipe_of(best, best_gptq)), calibration)
            _write_files(out, recipe_of(best, best_gptq), best_model)
        example = example if example is not None else calibration[0]
        result.files = {"recipe": str(out / "recipe.json"), "model": str(out / "model.fewbits"),
                        **_write_onnx(out, best_model, example, calibration)}
    if out is not None and report:
        from .summary import auto_report

        data = auto_report(result, model, best_model, sens, costs, key, calibration, example, latency,
                           title or f"fewbits auto: {objective}, max drop {max_drop}", metric, lower_is_better, threads,
                           latency_batch)
        result.files.update(_write_report(out, data))
    result.seconds = time.perf_counter() - start
    if out is not None:
        write_json_atomic(out / "auto.json", result.to_dict())
    return result


def _between(cheaper: Choice, dearer: Choice, sens, costs, key: str, budgets: dict, n: int) -> list:
    """The front's points at ``n`` budgets strictly between two of its points, by cost."""
    front = pareto_front(sens, costs, key, points=n + 2, budgets={**budgets, key: dearer.costs[key]},
                         lower=cheaper.costs[key])
    return [c for c in front if cheaper.costs[key] < c.costs[key] < dearer.costs[key]
            and dearer.damage < c.damage < cheaper.damage]


def _write_report(out: Path, data: dict) -> dict:
    """``report.json`` (the data) and ``report.html`` (the page) in ``out``."""
    from ..report.html import write_report

    write_json_atomic(out / "report_data.json", data)
    write_report(data, out / "report.html")
    return {"report": str(out / "report.html"), "report_data": str(out / "report_data.json")}


def _write_files(out: Path, recipe, qmodel) -> None:
    """``recipe.json`` and ``model.fewbits`` of the best point so far."""
    from ..export import save

    write_atomic(out / "recipe.json", recipe.to_json().encode())
    save(qmodel, out / "model.fewbits")


def _write_onnx(out: Path, qmodel, example, calibration) -> dict:
    """``model.onnx`` of the choice and its integer-GEMM share, or why it could not be written."""
    from ..export.onnx import export_onnx, onnx_available

    missing = onnx_available()
    if missing:
        return {"onnx_error": missing}
    try:
        exported = export_onnx(qmodel, example, out / "model.onnx", batches=calibration[:2])
    except Exception as err:  # noqa: BLE001 — the choice stands; the file is what failed, said in files
        return {"onnx_error": f"{type(err).__name__}: {str(err)[:300]}"}
    k = exported.kernels
    return {"onnx": str(exported.path), "onnx_integer_gemms": f"{k.integer}/{k.integer + k.float}"}
