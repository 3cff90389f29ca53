"""Measured latency: a look-up table of every layer shape in every candidate format, timed alone
in ONNX Runtime on this machine, and the prediction of a whole configuration from it.

**The table** (:class:`LatencyTable`, versioned JSON) is keyed by the CPU (its name and
fewbits' int8 kernel profile), the ONNX Runtime version and the thread count; a file written
elsewhere is refused naming what differs. One entry per layer shape — the module's type and
geometry (``extra_repr``) and its input shape at the deployment batch — holding, in seconds per
call:

- each candidate format: the layer alone, exported exactly as fewbits deploys it (float input,
  float output: an integer convolution with its own output grid, so that it fuses) — all
  layers of one format are exported in one file and each is cut out of it (``onnx.utils.Extractor``);
- ``quantize_input``: a ``QuantizeLinear`` of its input to uint8, ``quantize_output`` and
  ``dequantize_output``: of its output to uint8 and back — the conversions at a format boundary.

Each time is the median of interleaved rounds (:func:`fewbits.export.timing.interleaved_medians`)
minus the cost of running an empty graph, divided by the time of a fixed reference graph
(``REFERENCE``) timed in the same rounds; a table in use is scaled back to seconds by the
reference timed then, beside the whole fp32 model — the clock of a shared machine drifts by tens
of percent between minutes, a ratio taken in one run does not. Entries missing from the table are measured when
``measure=True`` and otherwise an error naming them, never a guess.

**The prediction** of a configuration (``Costs.total(formats, "latency_s")``): the float ops between
layers (``rest_s``: the whole fp32 model measured, minus its layers' float entries, plus what its
float chain pairs save) plus each layer's entry in its format, minus, on every chain edge
``(a, b)`` (``fewbits.decide.graph``: a layer read by ``b`` alone), what the pair timed alone in
the two layers' domains saves against the two alone: two integer layers skip the conversions
between them (``a`` hands uint8 on at ``b``'s grid), two float ones share layout changes, a
weight-only neighbour adds reorders (a negative saving); and minus what the groups of
:mod:`fewbits.decide.layout` save — the layout changes a layer alone carries (``layout_in`` /
``layout_out`` per format, each timed alone as the nodes ONNX Runtime put there) across a
residual stream whose layers all run in one layout, and the input quantization integer siblings
share. Each layer's entry is scaled to its time inside a model: per domain, a bank of all the
model's layers in that domain's format is run whole when the table is read and set against the
sum of the layers alone (``LayerLatency.in_model``: alone, a layer's weights stay in cache).
"""
from __future__ import annotations

import copy
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..files import write_json_atomic
from ..flow import calibrate, prepare
from ..progress import Progress
from ..recipe import _ACT_STATIC, LayerRecipe, Recipe
from ..target import cpu_name, int8_kernel_profile
from ..wrap.handle import as_call
from .candidates import CANDIDATES, DOMAIN_FORMATS, DOMAINS, Candidate, formats_recipe, get_candidates
from .graph import CONV_TYPES, layer_readers, own_output_grids, replay
from .layout import SIDES, latency_groups, layout_graphs
from .timed import _array_runner, _conversion_graphs, _empty_run_seconds, _empty_runner, _reference_runner, _runner, _session

SCHEMA_VERSION = 4  # 2: entries in units of the reference graph's time (REFERENCE); 3: layout changes;
# 4: per-group weights timed on ONNX Runtime's 4-bit kernel (before: simulated as float operations)
# the yardstick every entry is timed against, interleaved: a table measured while the machine ran
# slow or fast is scaled by the reference timed when the table is used
REFERENCE = "MatMul 32x256 by a constant 256x256, then Relu"
CONVERSIONS = ("quantize_input", "quantize_output", "dequantize_output")
PAIR_FORMATS = tuple(f"{a}|{b}" for a in DOMAINS for b in DOMAINS)  # head's domain | reader's


def machine_key(threads: int) -> dict:
    """What a latency table is only valid for."""
    import onnxruntime as ort

    profile = int8_kernel_profile()
    kind = f"{profile.isa}{'+vnni' if profile.vnni else ''}{'+pair-saturation' if profile.pair_saturation else ''}"
    return {"cpu": cpu_name(), "profile": kind, "runtime": f"onnxruntime {ort.__version__}",
            "threads": int(threads)}


def default_path(threads: int) -> Path:
    """``$FEWBITS_CACHE/latency/…`` (default ``~/.cache/fewbits``), one file per machine key."""
    import os
    import re

    key = machine_key(threads)
    base = Path(os.environ.get("FEWBITS_CACHE", Path.home() / ".cache" / "fewbits"))
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{key['cpu']}-{key['profile']}-{key['runtime']}-t{threads}").strip("-")
    return base / "latency" / f"{slug}.json"


@dataclass
class LatencyTable:
    """Seconds per call by layer-shape key, then by format or conversion (see module doc)."""

    machine: dict
    entries: dict = field(default_factory=dict)
    fused: dict = field(default_factory=dict)  # key → the formats whose layer ran on an integer kernel
    unavailable: dict = field(default_factory=dict)  # key → formats that layer shape cannot take

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "format": "fewbits.latency", **self.machine,
                "entries": self.entries, "fused": self.fused, "unavailable": self.unavailable}

    @classmethod
    def from_dict(cls, data: dict, where: str = "latency table") -> "LatencyTable":
        if not isinstance(data, dict) or data.get("format") != "fewbits.latency":
            raise ValueError(f"{where}: not a fewbits latency table")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"{where}: schema version {data.get('schema_version')!r}; this fewbits reads "
                             f"{SCHEMA_VERSION}: delete the file to measure the table again")
        try:
            machine = {k: data[k] for k in ("cpu", "profile", "runtime", "threads")}
            entries = {str(k): {str(f): float(s) for f, s in v.items()} for k, v in data["entries"].items()}
            fused = {str(k): list(v) for k, v in data.get("fused", {}).items()}
            unavailable = {str(k): list(v) for k, v in data.get("unavailable", {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{where}: corrupt latency table ({type(err).__name__}: {err})") from None
        return cls(machine, entries, fused, unavailable)

    @classmethod
    def load(cls, path, threads: int) -> "LatencyTable":
        """The table at ``path`` (a new, empty one when there is no file); a table measured on
        another machine, runtime or thread count is an error naming what differs."""
        path = Path(path)
        here = machine_key(threads)
        if not path.is_file():
            return cls(here)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: unreadable latency table ({type(err).__name__}); delete it to measure again") \
                from None
        older = data.get("schema_version") if isinstance(data, dict) and data.get("format") == "fewbits.latency" else None
        if isinstance(older, int) and older < SCHEMA_VERSION:  # a cache of an earlier fewbits: measured again
            import warnings

            warnings.warn(f"{path}: a latency table of schema {older} (this fewbits writes {SCHEMA_VERSION}): "
                          "measuring it again", stacklevel=3)
            return cls(here)
        table = cls.from_dict(data, str(path))
        differs = {k: (table.machine[k], here[k]) for k in here if table.machine[k] != here[k]}
        if differs:
            raise ValueError(f"{path}: measured for another machine or runtime: "
                             + ", ".join(f"{k} {a!r} (here {b!r})" for k, (a, b) in differs.items()))
        return table

    def save(self, path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(path), self.to_dict())

    def missing(self, keys: dict, formats: list[str]) -> list[str]:
        """``"key | format"`` of every entry not in the table (``keys``: layer → shape key)."""
        need = list(formats) + list(CONVERSIONS)
        return sorted({f"{k} | {f}" for k in keys.values() for f in need
                       if f not in self.entries.get(k, {}) and f not in self.unavailable.get(k, [])})


@dataclass
class LayerLatency:
    """One model's layers in the table: ``seconds[layer][format]``, the two conversions per layer
    (``conversions[layer]``), what each chain edge saves against its two layers alone in each pair
    of domains (``chain_savings[(a, b)]["integer|weight"]``: the pair timed alone, ``a`` in
    ``w8a8``, ``b`` in ``w8``; ``DOMAIN_FORMATS``; negative where the pair costs more),
    and ``rest_s``: the whole fp32 model measured (``fp32_s``) minus its layers' float entries
    and plus the float chains' savings — the float ops between layers, which no format changes."""

    seconds: dict
    conversions: dict
    keys: dict
    rest_s: float
    fp32_s: float
    batch_size: int
    machine: dict
    path: Optional[str] = None
    fused: dict = field(default_factory=dict)
    chain_savings: dict = field(default_factory=dict)  # (a, b) → {"float|integer": s, …} the pair saves
    reference_s: float = 0.0  # the reference graph's seconds when the table was read (the unit of its entries)
    layout: dict = field(default_factory=dict)  # layer → format → {"layout_in": s, "layout_out": s} alone
    groups: list = field(default_factory=list)  # layout regions and siblings (fewbits.decide.layout)
    shared_input: dict = field(default_factory=dict)  # layer → the input quantization its siblings share
    integer_anchor: dict = field(default_factory=dict)  # {"formats": every layer it can be integer, "seconds": measured}
    in_model: dict = field(default_factory=dict)  # domain → a bank of its layers run whole / the layers alone

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "conversions": self.conversions, "keys": self.keys, "rest_s": self.rest_s,
                "fp32_s": self.fp32_s, "batch_size": self.batch_size, "machine": self.machine, "path": self.path,
                "fused": self.fused, "reference_s": self.reference_s, "chain_savings": {f"{a} -> {b}": v for (a, b), v in self.chain_savings.items()},
                "layout": self.layout, "groups": self.groups, "shared_input": self.shared_input,
                "integer_anchor": self.integer_anchor, "in_model": self.in_model}


class _Bank(nn.Module):
    """Independent layers side by side: ``forward(xs)`` returns each layer applied to its input."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, xs: list[torch.Tensor]):
        return tuple(layer(x) for layer, x in zip(self.layers, xs))


def _first_inputs(model: nn.Module, names: list[str], batch) -> dict:
    """Each layer's first input and output (tensors) on ``batch``."""
    seen = {}

    def hook(name):
        def keep(module, args, out):
            seen.setdefault(name, (args[0].detach(), out.detach()))
        return keep

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    args, kwargs = as_call(batch, 0)
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    never = [n for n in names if n not in seen]
    if never:
        raise ValueError(f"latency: the forward never ran layer(s) {never[:5]}{' …' if len(never) > 5 else ''}; "
                         "give an example batch that reaches every layer")
    return seen


def _example(shape: tuple, like: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if like.is_floating_point():
        return torch.randn(shape, generator=gen)
    return torch.randint(0, getattr(layer, "num_embeddings", 2), shape, generator=gen, dtype=like.dtype)


def shape_key(layer: nn.Module, shape: tuple) -> str:
    """A layer shape: type, geometry and input shape (``Conv2d(32, 64, kernel_size=(3, 3)…)@1x32x24x24``)."""
    bias = "" if getattr(layer, "bias", None) is not None or not hasattr(layer, "bias") else ",nobias"
    return f"{type(layer).__name__}({layer.extra_repr()}{bias})@{'x'.join(map(str, shape))}"


def _recipe(cand: Candidate) -> Recipe:
    """The candidate on every layer; an integer convolution with an output grid of its own."""
    recipe = cand.recipe()
    if cand.act_bits is None:
        return recipe
    by_type = tuple((t, LayerRecipe(lr.weight, lr.input, _ACT_STATIC) if t in CONV_TYPES else lr)
                    for t, lr in recipe.by_type)
    return Recipe(recipe.name, by_type)


def _cut(model, inputs: list[str], outputs: list[str], path: Path) -> str:
    import onnx
    from onnx.utils import Extractor

    onnx.save(Extractor(model).extract_model(inputs, outputs), str(path))
    return str(path)


def _bank_file(modules: list, xs: list, recipe: Optional[Recipe], path: Path, expect=None) -> tuple:
    """``modules`` side by side in one ONNX file, float (``recipe`` None) or as ``recipe``
    deploys them; and the indices of the modules it quantized as asked (every layer inside, or
    the children named in ``expect``)."""
    import warnings

    import onnx

    from ..export.onnx import _torch_onnx_bytes, export_onnx

    bank = _Bank(modules).eval()
    if recipe is None:
        path.write_bytes(_torch_onnx_bytes(bank, (xs,), {}, "none"))
        return onnx.load(str(path)), set(range(len(modules)))
    q = calibrate(prepare(bank, recipe), [(xs,)])
    quantized = set(q.quantized_layers())
    done = {i for i, m in enumerate(modules)
            if all(f"layers.{i}.{n}".rstrip(".") in quantized for n, c in m.named_modules()
                   if isinstance(c, _LAYERS) and (expect is None or n in expect))}
    if not done:
        return None, done
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a layer alone that does not fuse is measured as it is
        export_onnx(q, (xs,), path, verify=False, dynamic="none")
    return onnx.load(str(path)), done


_LAYERS = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)


def _cut_runner(model, i: int, x: torch.Tensor, tmp: Path, tag: str, threads: int) -> tuple:
    """The ``i``-th module of a bank file alone: its runner, whether it ran on an integer kernel
    and the file of ONNX Runtime's optimized graph of it."""
    from ..export.kernels import INTEGER_GEMMS

    path = _cut(model, [model.graph.input[i].name], [model.graph.output[i].name], tmp / f"{tag}-{i}.onnx")
    optimized = tmp / f"opt-{tag}-{i}.onnx"
    fused = any(op in INTEGER_GEMMS for op in _optimized_ops(path, threads, optimized))
    return _runner(path, threads, x), fused, str(optimized)


def _medians(runs: dict, reference, seconds: float, empty: float) -> dict:
    """Each run's median less the empty call, in units of ``reference`` timed in the same rounds."""
    from ..export.timing import interleaved_medians

    medians = interleaved_medians({**runs, "__reference__": reference}, seconds_per_engine=seconds,
                                  sample_seconds=0.01, min_rounds=7, max_rounds=25)
    unit = medians.pop("__reference__")["median_s"] - empty
    return {f: max(0.0, m["median_s"] - empty) / unit for f, m in medians.items()}


def _measure(table: LatencyTable, todo: dict, pairs: dict, chosen: list[Candidate], combos: list, threads: int,
             seconds: float) -> None:
    """Time every shape key in ``todo`` (key → (layer, input shape, input, output shape)) in every
    format with its conversions, and every chain pair in ``pairs`` (key → (pair module, input
    shape, input)) float and integer."""
    keys = list(todo)
    xs = [_example(todo[k][1], todo[k][2], todo[k][0]) for k in keys]
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        files = {}  # format → the ONNX file of every layer in it, and which layers it quantized
        combos = combos if pairs else []
        with Progress("latency: exporting format", len(chosen) + len(combos)) as progress:
            for cand in chosen:
                progress.step(cand.name)
                if keys:
                    files[cand.name] = _bank_file([todo[k][0] for k in keys], xs,
                                                  None if cand.layer is None else _recipe(cand), tmp / f"{cand.name}.onnx")
            pair_keys = list(pairs)
            pair_xs = [_example(pairs[k][1], pairs[k][2], pairs[k][0].a) for k in pair_keys]
            pair_files = {}
            for fmt in combos:
                da, db = fmt.split("|")
                progress.step(f"pairs {fmt}")
                pair_files[fmt] = _bank_file([pairs[k][0] for k in pair_keys], pair_xs, _pair_recipe(da, db),
                                             tmp / f"pair-{da}-{db}.onnx", expect=("a",) * (da != "float") + ("b",) * (db != "float"))
        empty = _empty_run_seconds(tmp, threads)
        reference = _reference_runner(tmp, threads)
        with Progress("latency: timing layer shape", len(keys) + len(pairs)) as progress:
            for i, key in enumerate(keys):
                progress.step()
                runs, fused = {}, []
                for fmt, (model, done) in files.items():
                    if i in done:
                        runs[fmt], ok, optimized = _cut_runner(model, i, xs[i], tmp, fmt, threads)
                        if ok:
                            fused.append(fmt)
                        for side, (path, x) in layout_graphs(optimized, todo[key][1], tuple(todo[key][3]), tmp,
                                                             f"{fmt}-{i}").items():
                            runs[f"{side}|{fmt}"] = _array_runner(path, threads, x)
                q_path, qo_path, dq_path = _conversion_graphs(todo[key][1], tuple(todo[key][3]), tmp, str(i))
                runs["quantize_input"] = _runner(q_path, threads, xs[i].float())
                runs["quantize_output"] = _runner(qo_path, threads, torch.randn(todo[key][3]))
                runs["dequantize_output"] = _runner(dq_path, threads, torch.zeros(todo[key][3], dtype=torch.uint8))
                table.entries[key] = {**table.entries.get(key, {}), **_medians(runs, reference, seconds, empty)}
                table.fused[key] = sorted(set(table.fused.get(key, [])) | set(fused))
                table.unavailable[key] = sorted(set(table.unavailable.get(key, []))
                                                | {c.name for c in chosen if c.name not in runs})
            for i, key in enumerate(pair_keys):
                progress.step()
                runs = {fmt: _cut_runner(model, i, pair_xs[i], tmp, f"pair-{fmt.replace('|', '-')}", threads)[0]
                        for fmt, (model, done) in pair_files.items() if i in done}
                table.entries[key] = {**table.entries.get(key, {}), **_medians(runs, reference, seconds, empty)}
                table.unavailable[key] = sorted(set(table.unavailable.get(key, [])) | (set(pair_files) - set(runs)))


class _Pair(nn.Module):
    """Layer ``a``, the recorded ops after it, layer ``b``: a chain edge alone."""

    def __init__(self, a: nn.Module, path: tuple, b: nn.Module) -> None:
        super().__init__()
        # copies: a layer heads one pair and reads another, and a bank holds each module once
        self.a, self.b, self.path = copy.deepcopy(a), copy.deepcopy(b), path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(replay(self.path, self.a(x)))


def _pair_recipe(da: str, db: str) -> Optional[Recipe]:
    """A pair's head in domain ``da``'s format, its reader in ``db``'s (``DOMAIN_FORMATS``); an
    integer head hands its output on to an integer reader and otherwise has its own output grid,
    an integer convolution reader its own too (as alone). ``None``: both float."""
    if da == db == "float":
        return None

    def layer(domain: str, own_output: bool):
        cand = CANDIDATES[DOMAIN_FORMATS[domain]]
        if cand.layer is None or not own_output or cand.act_bits is None:
            return cand.layer
        return LayerRecipe(cand.layer.weight, cand.layer.input, _ACT_STATIC)

    by_type = () if db == "float" else tuple((t, layer(db, t in CONV_TYPES)) for t in ("Linear", *CONV_TYPES))
    return Recipe(f"latency-pairs-{da}-{db}", by_type, (("layers.*.a", layer(da, db != "integer")),))


def pair_key(a_key: str, path: tuple, b_key: str) -> str:
    """A chain pair: both layer shapes and the ops between them."""
    ops = ",".join(f"{getattr(f, '__name__', f)}{list(args) if args else ''}{kw if kw else ''}" for f, args, kw in path)
    return f"{a_key} >> {ops} >> {b_key}"


def _optimized_ops(path: str, threads: int, out: Path) -> list[str]:
    import onnx

    from ..export.onnx import OnnxModel

    OnnxModel(path, threads=threads, optimized_path=out)
    return [n.op_type for n in onnx.load(str(out)).graph.node]


def _slice(batch, batch_size: int):
    """The first ``batch_size`` samples of every tensor in a batch."""
    return torch.utils._pytree.tree_map(
        lambda v: v[:batch_size] if isinstance(v, torch.Tensor) and v.dim() else v, batch)


def model_latency(qmodel, example, threads: int = 2, seconds: float = 4.0, reference: bool = False):
    """Measured seconds per call of ``qmodel`` (from :func:`fewbits.prepare`, calibrated)
    exported to ONNX and run by ONNX Runtime on ``example``; and the export's kernel report.
    ``reference``: also the reference graph's and an empty call's seconds, timed in the same
    rounds (a third and fourth value)."""
    import warnings

    from ..export.onnx import export_onnx
    from ..export.timing import interleaved_medians

    with tempfile.TemporaryDirectory() as tmpdir, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unfused layers are in the kernel report returned
        exported = export_onnx(qmodel, example, Path(tmpdir) / "model.onnx", verify=False, dynamic="none")
        s = _session(exported.path, threads)
        args, kwargs = as_call(example, 0)
        feeds = s.feeds(*args, **kwargs)
        runs = {"model": lambda: s.run(feeds)}
        if reference:
            runs["reference"] = _reference_runner(Path(tmpdir), threads)
            runs["empty"] = _empty_runner(Path(tmpdir), threads)
        medians = {k: m["median_s"] for k, m in interleaved_medians(runs, seconds_per_engine=seconds).items()}
    if reference:
        return medians["model"], exported.kernels.to_dict(), medians["reference"], medians["empty"]
    return medians["model"], exported.kernels.to_dict()


def latency_table(model: nn.Module, batch, candidates, *, path=None, batch_size: int = 1, threads: int = 2,
                  measure: bool = True, seconds: float = 0.3) -> LayerLatency:
    """Every quantizable layer of ``model`` in every candidate format, from the table at ``path``
    (default :func:`default_path`); entries not in it are measured and added (``measure=False``:
    an error naming them). ``batch``: an example input; the layers are timed at its first
    ``batch_size`` samples. Also measures the whole fp32 model once (the float ops between
    layers, ``rest_s``). ``model`` is not modified."""
    chosen = get_candidates(candidates)
    if "float" not in [c.name for c in chosen]:
        chosen = [get_candidates(["float"])[0], *chosen]
    path = Path(path) if path is not None else default_path(threads)
    table = LatencyTable.load(path, threads)
    example = _slice(batch, batch_size)
    float_q = prepare(model, Recipe("float", ()))
    names = sorted({n for c in chosen if c.layer is not None for n in prepare(model, c.recipe()).quantized_layers()})
    float_model = float_q.float_model
    seen = _first_inputs(float_model, names, example)
    keys, todo = {}, {}
    for n in names:
        layer = float_model.get_submodule(n)
        x, y = seen[n]
        keys[n] = shape_key(layer, tuple(x.shape))
        if keys[n] not in todo:
            todo[keys[n]] = (layer, tuple(x.shape), x, tuple(y.shape))
    readers = layer_readers(float_model, names, example)
    chains = [c for c in readers.chains() if c in readers.paths]
    pair_keys, pairs = {}, {}
    for a, b in chains:
        pair_keys[(a, b)] = pair_key(keys[a], readers.paths[(a, b)], keys[b])
        if pair_keys[(a, b)] not in pairs:
            pairs[pair_keys[(a, b)]] = (_Pair(float_model.get_submodule(a), readers.paths[(a, b)],
                                              float_model.get_submodule(b)), tuple(seen[a][0].shape), seen[a][0])
    formats = [c.name for c in chosen]
    missing = table.missing(keys, formats)
    domains = {c.domain for c in chosen}  # float is always among them
    combos = [f for f in PAIR_FORMATS if set(f.split("|")) <= domains]
    missing_pairs = [k for k in pairs if not all(f in table.entries.get(k, {}) or f in table.unavailable.get(k, [])
                                                 for f in combos)]
    if (missing or missing_pairs) and not measure:
        raise ValueError(f"latency table {path}: {len(missing) + len(missing_pairs)} entries missing, e.g. "
                         f"{(missing + [f'{k} | pair' for k in missing_pairs])[:3]}; measure them (measure=True) on "
                         "this machine")
    if missing or missing_pairs:
        needed = {k for k in todo if any(m.startswith(k + " | ") for m in missing)}
        _measure(table, {k: todo[k] for k in needed}, {k: pairs[k] for k in missing_pairs}, chosen, combos, threads,
                 seconds)
        table.save(path)
    fp32_s, _, ref_s, empty_s = model_latency(float_q, example, threads, reference=True)
    unit = ref_s - empty_s  # seconds of one reference, now
    # formats a layer cannot take (not quantized by it) have no entry: costs leave them out
    seconds_by_layer = {n: {f: unit * table.entries[keys[n]][f] for f in formats if f in table.entries[keys[n]]}
                        for n in names}
    conversions = {n: {c: unit * table.entries[keys[n]][c] for c in CONVERSIONS} for n in names}
    chain_savings = {}
    for (a, b), key in pair_keys.items():
        measured = {f: unit * v for f, v in table.entries.get(key, {}).items()}
        saving = {}
        for combo in PAIR_FORMATS:
            fa, fb = (DOMAIN_FORMATS[d] for d in combo.split("|"))
            if combo in measured and fa in seconds_by_layer[a] and fb in seconds_by_layer[b]:
                saving[combo] = seconds_by_layer[a][fa] + seconds_by_layer[b][fb] - measured[combo]
        chain_savings[(a, b)] = saving
    in_model = _in_model_ratios(float_model, names, seen, seconds_by_layer, threads, unit)
    for n in names:  # a layer inside the model, not alone (the pairs' savings stay differences of alone times)
        for f in seconds_by_layer[n]:
            seconds_by_layer[n][f] *= in_model.get(CANDIDATES[f].domain, 1.0)
    layout = {n: {f: {side: unit * table.entries[keys[n]][f"{side}|{f}"] for side in SIDES
                      if f"{side}|{f}" in table.entries[keys[n]]} for f in formats} for n in names}
    groups, shared, unchanged = latency_groups(readers, seconds_by_layer, layout, conversions, DOMAIN_FORMATS)
    rest = fp32_s - sum(s["float"] for s in seconds_by_layer.values()) \
        + sum(s.get("float|float", 0.0) for s in chain_savings.values()) + unchanged
    anchor = _integer_anchor(model, example, readers, seconds_by_layer, threads, unit)
    return LayerLatency(seconds_by_layer, conversions, keys, rest, fp32_s, batch_size, table.machine, str(path),
                        {n: table.fused.get(keys[n], []) for n in names}, chain_savings, unit, layout, groups, shared,
                        anchor, in_model)


def _in_model_ratios(float_model, names: list, seen: dict, seconds_by_layer: dict, threads: int, unit: float) -> dict:
    """Per domain: every layer of the model that takes the domain's format, run one after
    another in one session (a bank), against the sum of the layers timed alone. Alone, a layer
    is called again and again and its weights stay in cache; in a model they are read from
    memory again each call (``benchmarks/latency_model.py``: ratios 1.3–1.6). Every format of the
    domain is scaled by its ratio."""
    from ..export.timing import interleaved_medians

    ratios = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        yardsticks = {"reference": _reference_runner(tmp, threads), "empty": _empty_runner(tmp, threads)}
        for dom, fmt in DOMAIN_FORMATS.items():
            layers = [n for n in names if fmt in seconds_by_layer[n]]
            if not layers:
                continue
            xs = [_example(tuple(seen[n][0].shape), seen[n][0], float_model.get_submodule(n)) for n in layers]
            cand = CANDIDATES[fmt]
            model, done = _bank_file([float_model.get_submodule(n) for n in layers], xs,
                                     None if cand.layer is None else _recipe(cand), tmp / f"bank-{fmt}.onnx")
            if len(done) != len(layers):  # the bank quantized fewer layers than the table holds: not comparable
                continue
            s = _session(str(tmp / f"bank-{fmt}.onnx"), threads)
            feeds = {s.inputs[i]: x.numpy() for i, x in enumerate(xs)}
            medians = interleaved_medians({"bank": lambda: s.run(feeds), **yardsticks}, seconds_per_engine=2.0)
            m = {k: v["median_s"] for k, v in medians.items()}
            bank_s = (m["bank"] - m["empty"]) / (m["reference"] - m["empty"]) * unit
            ratios[dom] = bank_s / sum(seconds_by_layer[n][fmt] for n in layers)
    return ratios


def _integer_anchor(model, example, readers, seconds_by_layer: dict, threads: int, unit: float) -> dict:
    """The whole model with every layer that can take it in the integer domain's format (the
    others float), measured now and scaled to the unit the table is read in: what
    :func:`fewbits.decide.cost.layer_costs` calibrates the integer neighbours' savings on."""
    fmt = DOMAIN_FORMATS["integer"]
    integer = {n for n, s in seconds_by_layer.items() if fmt in s}
    if not integer:
        return {}
    formats = {n: fmt if n in integer else "float" for n in seconds_by_layer}
    embeddings = {n for n, t in readers.types.items() if t == "Embedding"}
    recipe = formats_recipe(formats, own_output_grids(integer, readers.heads(), readers.chains()),
                            embeddings, "latency-integer-anchor")
    q = calibrate(prepare(model, recipe), [example])  # ranges only: the time does not depend on them
    seconds, _, ref_s, empty_s = model_latency(q, example, threads, reference=True)
    return {"formats": formats, "seconds": seconds * unit / (ref_s - empty_s)}
