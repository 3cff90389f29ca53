"""The ``fewbits`` command line: ``tasks``, ``quantize``, ``auto``, ``report``, ``train``, ``compress``, ``demo``.

Errors are one line on stderr and exit code 2; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path



def _write_json(data: dict, path: Path) -> None:
    from fewbits.files import write_json_atomic

    write_json_atomic(path, data)


# ---- user models -----------------------------------------------------------------------------
def load_user_model(spec: str, checkpoint: str | None):
    """``path/to/file.py:factory`` → ``factory()`` (an nn.Module), with an optional state_dict."""
    import importlib.util

    import torch

    path, _, factory = spec.rpartition(":")
    if not path or not factory:
        raise ValueError(f"--model must be path/to/file.py:factory, got {spec!r}")
    if not Path(path).is_file():
        raise ValueError(f"--model: file {path} not found")
    module_spec = importlib.util.spec_from_file_location("fewbits_user_model", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, factory):
        raise ValueError(f"--model: {path} has no '{factory}'")
    model = getattr(module, factory)()
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"--model: {factory}() returned {type(model).__name__}, not a torch.nn.Module")
    if checkpoint:
        state = load_torch_file(checkpoint, "--checkpoint")
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        model.load_state_dict(state, strict=True)
    return model.eval()


def load_torch_file(path: str, option: str):
    """``torch.load`` of a user's file (tensors only), or one line naming the file and the option."""
    import pickle

    import torch

    if not Path(path).is_file():
        raise ValueError(f"{option}: file {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError, ValueError, AttributeError, KeyError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{option}: {path} is not a readable torch file ({type(err).__name__}: {first[:200]})") from None


def load_batches(path: str, batch_size: int) -> list:
    """A ``.pt`` file holding a Tensor (split along dim 0; token ids too), a dict of tensors with
    one first dimension (keyword inputs, e.g. ``input_ids`` and ``attention_mask``, split
    together), or a list of ready batches (tensors, tuples or dicts)."""
    import torch

    data = load_torch_file(path, "--calib-data")
    if isinstance(data, torch.Tensor):
        return list(data.split(batch_size))
    if isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        sizes = {k: v.shape[0] if v.dim() else None for k, v in data.items()}
        if len(set(sizes.values())) != 1 or None in sizes.values():
            raise ValueError(f"--calib-data: {path} holds a dict whose tensors differ in their first dimension: {sizes}")
        n = next(iter(sizes.values()))
        return [{k: v[i:i + batch_size] for k, v in data.items()} for i in range(0, n, batch_size)]
    if isinstance(data, (list, tuple)) and data:
        return list(data)
    raise ValueError(f"--calib-data: {path}: expected a Tensor [N, ...], a dict of Tensors [N, ...] or a non-empty "
                     f"list of batches, got {type(data).__name__}")


def accuracy_metric(path: str):
    """``{"x": Tensor [N, ...], "y": int Tensor [N]}`` → a top-1 accuracy metric."""

    from fewbits.tasks.base import accuracy

    data = load_torch_file(path, "--eval-data")
    if not isinstance(data, dict) or not {"x", "y"} <= set(data):
        raise ValueError(f"{path}: --eval-data must hold a dict with 'x' (inputs) and 'y' (integer labels)")
    return lambda m: {"accuracy": accuracy(m, data["x"], data["y"])}


# ---- commands --------------------------------------------------------------------------------
def cmd_tasks(args) -> None:
    from fewbits.tasks import describe_tasks

    for name, text in describe_tasks().items():
        print(f"{name:20s} {text}")


def model_and_data(args) -> tuple:
    """``(name, model, calibration, metric_fn, metric, lower_is_better)`` from ``--task`` or
    ``--model`` / ``--hf-model`` with their data options."""
    if sum(map(bool, (args.task, args.model, args.hf_model))) != 1:
        raise ValueError("give one of --task, --model or --hf-model")
    if args.task:
        from fewbits.tasks import load_task

        task = load_task(args.task, small=args.small)
        return task.name, task.model, task.calibration, task.evaluate, task.metric, task.lower_is_better
    if args.calib_text and not args.hf_model:
        raise ValueError("--calib-text needs --hf-model (its tokenizer reads the text)")
    if not (args.calib_data or args.calib_text):
        raise ValueError(f"{'--hf-model' if args.hf_model else '--model'} needs --calib-data (a .pt file of "
                         "calibration inputs)" + (" or --calib-text (a text file)" if args.hf_model else ""))
    if args.hf_model:
        from fewbits.hf import load_hf_model, tokenized_batches

        model = load_hf_model(args.hf_model)
        name = Path(args.hf_model).name
    else:
        model = load_user_model(args.model, args.checkpoint)
        name = Path(args.model.rpartition(":")[0]).stem
    calibration = load_batches(args.calib_data, args.batch_size) if args.calib_data else \
        tokenized_batches(args.hf_model, args.calib_text, args.seq_len, args.batch_size)
    metric_fn = accuracy_metric(args.eval_data) if args.eval_data else None
    metric = "accuracy" if args.eval_data else None
    return name, model, calibration, metric_fn, metric, False


def left_float_rows(left_float, limit: int = 12) -> list[dict]:
    """One row per layer left float; beyond ``limit`` layers, one row per type and reason with
    the count and the first names (an LLM's 61 norms are one row). The JSON keeps every layer."""
    if len(left_float) <= limit:
        return [{"left float": x.name, "type": x.type, "reason": x.reason} for x in left_float]
    groups: dict = {}
    for x in left_float:
        groups.setdefault((x.type, x.reason), []).append(x.name)
    return [{"left float": f"{len(names)} layer(s): {', '.join(names[:2])}{' …' if len(names) > 2 else ''}",
             "type": kind, "reason": reason} for (kind, reason), names in groups.items()]


def cmd_quantize(args) -> dict:
    from fewbits.flow import quantize_model
    from fewbits.report.summary import result_json, summary_row
    from fewbits.report.table import format_table

    name, model, calibration, metric_fn, metric, lower_is_better = model_and_data(args)
    qmodel, report, recipe = quantize_model(model, calibration, args.recipe, metric_fn=metric_fn, metric=metric,
                                            calib=args.calib, algo=args.algo, fit_cpu=args.fit_cpu,
                                            exclude=(args.exclude or "").split(","))
    result = result_json(name, recipe, report, lower_is_better=lower_is_better)
    print(format_table([summary_row(result)], title=f"fewbits quantize: {name}"))
    if report.left_float:
        print(format_table(left_float_rows(report.left_float)))
    if result["float_ops"]:  # modules whose additions / pools / concatenations stay float, by reason
        groups: dict = {}
        for x in result["float_ops"]:
            groups.setdefault(x["reason"].split(":")[0].split(" (")[0], []).append(x["name"] or "(model)")
        print(format_table([{"ops kept float in": f"{len(names)} module(s): {', '.join(names[:3])}"
                                                  f"{' …' if len(names) > 3 else ''}", "why": why}
                            for why, names in groups.items()]))
    if args.save:
        import fewbits

        result["saved"] = {"path": str(args.save), "bytes": fewbits.save(qmodel, args.save).stat().st_size}
    if args.onnx:
        result["onnx"] = export_for_cli(qmodel, calibration, args)
    if args.json:
        _write_json(result, Path(args.json))
    if args.out:
        out = Path(args.out)
        _write_json(result, out / "report.json")
        from fewbits.report.plot import plot_layer_sqnr

        plot_layer_sqnr({f"{name} | {recipe.name}": report}, out / "layer_sqnr.png")
    if args.report:
        from fewbits.files import write_json_atomic
        from fewbits.report.collect import quantize_report_data
        from fewbits.report.html import write_report

        if not args.out:
            raise ValueError("--report writes OUT/report.html and OUT/report_data.json: give --out")
        data = quantize_report_data(name, qmodel, report, calibration, result.get("onnx"), lower_is_better=lower_is_better)
        write_json_atomic(Path(args.out) / "report_data.json", data)
        result["report"] = str(write_report(data, Path(args.out) / "report.html"))
        print(f"fewbits: report {result['report']}")
    return result


def cmd_report(args) -> dict:
    """``fewbits report DIR``: DIR/report.html again from DIR/report_data.json."""
    from fewbits.report.html import read_report_data, write_report

    src = Path(args.dir)
    data_path = src / "report_data.json" if src.is_dir() else src
    if not data_path.is_file():
        raise FileNotFoundError(f"{data_path}: no report data (written by fewbits auto --out DIR or "
                                "fewbits quantize --report --out DIR)")
    page = write_report(read_report_data(data_path), Path(args.html) if args.html else data_path.parent / "report.html")
    print(f"fewbits: report {page}")
    return {"report": str(page)}


def export_for_cli(qmodel, calibration, args) -> dict:
    """``--onnx``: export, verify on the first calibration batches, print what was chosen."""
    from fewbits.export.onnx import export_onnx, onnx_available
    from fewbits.report.summary import megabytes
    from fewbits.report.table import format_table

    missing = onnx_available()
    if missing:
        raise ImportError(missing)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exported = export_onnx(qmodel, calibration[0], args.onnx, batches=calibration[:4], weights=args.onnx_weights,
                               strict=args.strict)
    for w in caught:  # the exporter's warnings (a layer that did not fuse, a parity miss) as one line each
        if str(w.message).startswith("export_onnx:"):
            print(f"fewbits: warning: {w.message}", file=sys.stderr)
    v, k = exported.verification, exported.kernels
    modes = ", ".join(f"{n} {m}" for m, n in exported.counts().items())
    narrowed = sum(e.narrowed_from is not None for e in exported.layers)
    print(format_table([{"onnx": Path(exported.path).name, "MB": megabytes(exported.bytes), "layers": modes,
                         "integer GEMMs in ORT": f"{k.integer}/{k.integer + k.float} ({k.share:.0%})",
                         "weights narrowed": narrowed, "max level diff": v.max_levels,
                         "levels differing": f"{v.differing:.1e}", "ok": v.ok}],
                       title=f"ONNX export ({exported.profile.describe()})"))
    return exported.to_dict()


def cmd_auto(args) -> dict:
    """Sensitivity → exact search → validated: the smallest configuration within --max-drop."""
    from fewbits.decide import auto
    from fewbits.report.summary import megabytes
    from fewbits.report.table import format_table

    name, model, calibration, metric_fn, metric, lower_is_better = model_and_data(args)
    if metric_fn is None:
        raise ValueError("fewbits auto measures every configuration it tries: give --task, or --eval-data with --model")
    budgets = {}
    for item in args.budget or []:
        key, _, value = item.partition("=")
        try:
            budgets[key] = float(value)
        except ValueError:
            raise ValueError(f"--budget takes key=value (bytes, bops, energy_pj, latency_s), got {item!r}") from None
    result = auto(model, calibration, metric_fn=metric_fn, metric=metric, max_drop=args.max_drop,
                  lower_is_better=lower_is_better,
                  objective=args.objective, budgets=budgets, candidates=args.candidates, method=args.method,
                  algos=args.algos, out=args.out, points=args.points, latency_path=args.latency_table,
                  latency_batch=args.latency_batch, threads=args.threads, report=args.report, workers=args.workers)
    print(format_table([{"point": t["point"], "MB": megabytes(int(t["costs"]["bytes"])), "predicted": f"{t['predicted']:.3g}",
                         metric or "metric": round(t["metric"], 3), "drop": round(t["drop"], 3), "within": t["ok"],
                         "algorithms": ", ".join(t.get("algorithms", [])) or "-", "resumed": t.get("resumed", False)} for t in result.trials],
                       title=f"fewbits auto: {name} (fp32 {result.fp32:.3f}, max drop {args.max_drop})"))
    counts: dict = {}
    for cand in result.choice.formats.values():
        counts[cand] = counts.get(cand, 0) + 1
    print(format_table([{"chosen": ", ".join(f"{n} {c}" for c, n in counts.items()),
                         "MB": megabytes(int(result.choice.costs["bytes"])), metric or "metric": round(result.metric, 3),
                         "drop": round(result.drop, 3), "algorithms": ", ".join(result.algorithms) or "-",
                         "seconds": round(result.seconds, 1), **result.files}]))
    data = result.to_dict()
    if args.json:
        _write_json(data, Path(args.json))
    return data


def cmd_train(args) -> dict:
    """Quantization-aware training of a task's model; ``torchrun --nproc-per-node N -m fewbits
    train …`` runs it data-parallel (each rank takes its share of every global batch)."""
    import os

    import torch

    import fewbits
    from fewbits.batches import ShuffledBatches
    from fewbits.qat import Distillation, chain, fit, prepare_qat, progressive_bits, progressive_layers
    from fewbits.recipe import get_recipe
    from fewbits.report.summary import result_json, summary_row
    from fewbits.report.table import format_table
    from fewbits.tasks import load_task

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")  # every tensor stays on the CPU, CUDA or not
    rank = torch.distributed.get_rank() if distributed else 0
    try:
        task = load_task(args.task, small=args.small)
        if task.train_data is None:
            raise ValueError(f"task '{args.task}' has no training data for quantization-aware training")
        train = task.train_data()
        labelled = isinstance(train, tuple)
        if not labelled and not args.distill:
            raise ValueError(f"task '{args.task}' has no labels: it trains against the fp32 model only, add --distill")
        if labelled:
            x, y = train
            if args.train_size:
                x, y = x[:args.train_size], y[:args.train_size]
            data = ShuffledBatches(x, y, args.batch_size, args.seed)
            size = len(x)
        else:  # ready (inputs, None) batches: tensors, or dicts of keyword arguments
            rows = [len(inputs) if isinstance(inputs, torch.Tensor) else len(next(iter(inputs.values())))
                    for inputs, _ in train]
            keep = len(rows)
            if args.train_size:  # whole batches, at least one, up to about N examples
                keep = max(1, sum(1 for i in range(len(rows)) if sum(rows[:i + 1]) <= args.train_size))
            data, size = train[:keep], sum(rows[:keep])
        recipe = get_recipe(args.recipe)
        schedule = None
        if args.progressive:
            widths = [int(b) for b in args.progressive.split(",")]
            bits = {lr.weight.spec.bits for _, lr in recipe.by_type if lr and lr.weight}
            if widths[-1] not in bits:
                raise ValueError(f"--progressive {args.progressive} must end at one of the recipe's weight widths "
                                 f"{sorted(bits)}")
            schedule = progressive_bits(widths, args.epochs)
        if args.layer_stages:
            schedule = chain(schedule, progressive_layers(args.layer_stages, args.epochs))
        t0 = time.perf_counter()
        qmodel = prepare_qat(task.model, recipe, method=args.method, estimator=args.estimator,
                             batches=task.calibration, batchnorm=args.batchnorm)
        if schedule is not None:
            schedule(0, qmodel)
        distill = None
        if args.distill:  # labelled: KL on logits; otherwise the output itself (an embedding), by cosine
            distill = Distillation(task.model, weight=args.distill_weight if labelled else 1.0,
                                   kind="kl" if labelled else "cosine")
        result = fit(qmodel, data, epochs=args.epochs, lr=args.lr, evaluate=task.evaluate, monitor=task.metric,
                     distill=distill, schedule=schedule, seed=args.seed, forward=task.train_forward,
                     freeze_bn_after=args.freeze_bn_after if args.batchnorm == "train" else None)
        seconds = time.perf_counter() - t0
        if rank:
            return {}
        report = fewbits.evaluate(qmodel, task.model, metric_fn=task.evaluate, metric=task.metric,
                                  batches=task.calibration, seconds=seconds)
        out = result_json(task.name, recipe, report, lower_is_better=task.lower_is_better)
        out["training"] = {"method": args.method, "estimator": args.estimator, "epochs": args.epochs, "lr": args.lr,
                           "batch_size": args.batch_size if labelled else None, "train_size": size,
                           "distill": (distill.kind if distill else None),
                           "batchnorm": args.batchnorm,
                           "progressive": args.progressive, "layer_stages": args.layer_stages, "ranks": torch.distributed.get_world_size()
                           if distributed else 1, "seconds": result.seconds, **result.to_dict()}
        row = summary_row(out)
        row.update({"method": args.method + (" + distill" if args.distill else ""), "epochs": args.epochs,
                    "best epoch": result.best_epoch, "train s": round(result.seconds, 1)})
        print(format_table([row], title=f"fewbits train: {task.name}"))
        if args.json:
            _write_json(out, Path(args.json))
        if args.out:
            outdir = Path(args.out)
            _write_json(out, outdir / "report.json")
            fewbits.save(qmodel, outdir / "model.safetensors")
        return out
    finally:
        if distributed:
            torch.distributed.destroy_process_group()


def cmd_compress(args) -> dict:
    """Deep Compression of a task's model: prune, share weights by k-means, Huffman code."""
    from fewbits.compress.pipeline import DeepCompressionConfig, deep_compression
    from fewbits.report.table import format_table
    from fewbits.tasks import load_task

    config = DeepCompressionConfig(prune=args.prune, bits=args.bits, conv_bits=args.conv_bits, scope=args.scope,
                                   steps=args.steps, retrain_epochs=args.epochs, finetune_epochs=args.finetune_epochs,
                                   lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    task = load_task(args.task, small=args.small)
    train = task.train_data() if task.train_data is not None else None
    if not isinstance(train, tuple):
        raise ValueError(f"task '{args.task}' has no labelled training data: Deep Compression retrains the pruned model")
    if args.train_size:
        train = (train[0][: args.train_size], train[1][: args.train_size])
    result = deep_compression(task.model, train, task.evaluate, task.metric, config, path=args.out)
    rows = [{"stage": s.name, "bytes": s.bytes, "ratio": f"{s.ratio:.1f}x", task.metric: s.metrics[task.metric],
             "seconds": s.seconds} for s in result.stages]
    print(format_table(rows, title=f"fewbits compress: {task.name} (prune {args.prune:.0%}, {args.bits}-bit)"))
    layers = [{"layer": r.name, "type": r.type, "params": r.params, "kept": f"{r.density:.1%}", "bits": r.bits,
               "file bytes": r.file_bytes} for r in result.layers]
    print(format_table(layers, title="per layer"))
    out = {"task": task.name, **result.to_dict()}
    if args.json:
        _write_json(out, Path(args.json))
    return out


DEMO_CONFIGS = [("w8a8", "minmax"), ("w8a8", "percentile"), ("w8a8", "entropy"), ("w8a8-dynamic", None),
                ("w8a8-smoothquant", None), ("w8", None), ("w4a8", "mse")]


def cmd_demo(args) -> list:
    from fewbits.flow import quantize_model
    from fewbits.report.plot import plot_layer_sqnr
    from fewbits.report.summary import result_json, summary_row
    from fewbits.report.table import format_table
    from fewbits.tasks import load_task

    results, reports = [], {}
    for task_name in args.tasks.split(","):
        task = load_task(task_name, small=args.small)
        print(f"fewbits demo: {task.name} — {task.description}", file=sys.stderr, flush=True)
        for recipe_name, calib in DEMO_CONFIGS:
            print(f"  {recipe_name} {calib or ''} ...", file=sys.stderr, flush=True)
            _, report, recipe = quantize_model(task.model, task.calibration, recipe_name, metric_fn=task.evaluate,
                                               metric=task.metric, calib=calib)
            result = result_json(task.name, recipe, report, lower_is_better=task.lower_is_better)
            results.append(result)
            reports[f"{task.name} | {recipe.name} {result['calib']}"] = report
    print(format_table([summary_row(r) for r in results], title="fewbits demo: what quantization cost"))
    out = Path(args.out)
    from fewbits.report.summary import CLI_SCHEMA

    _write_json({"schema_version": CLI_SCHEMA, "results": results}, out / "demo.json")
    plot = plot_layer_sqnr(reports, out / "layer_sqnr.png")
    print(f"\nresults: {out / 'demo.json'}; per-layer SQNR plot: {plot}")
    return results


def _training_options(p: argparse.ArgumentParser, lr: float, batch_help: str) -> None:
    p.add_argument("--lr", type=float, default=lr, help=f"Adam learning rate (default {lr:g})")
    p.add_argument("--batch-size", type=int, default=128, help=batch_help)
    p.add_argument("--train-size", type=int, help="train on the first N examples only (quick runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--small", action="store_true", help="evaluate on a subset (quick)")


def _model_options(p: argparse.ArgumentParser) -> None:
    """The model and data options quantize and auto share."""
    p.add_argument("--task", help="a built-in task (see 'fewbits tasks')")
    p.add_argument("--model", help="your own model: path/to/file.py:factory (factory() returns an nn.Module)")
    p.add_argument("--hf-model", help="a Hugging Face model directory (save_pretrained layout; read offline)")
    p.add_argument("--checkpoint", help="state_dict for --model (.pt)")
    p.add_argument("--calib-data", help="for --model / --hf-model: .pt with a Tensor [N, ...] of inputs (token ids "
                                        "[N, length]), a dict of such Tensors (keyword inputs), or a list of batches")
    p.add_argument("--calib-text", help="for --hf-model: a text file, tokenized by the model's tokenizer")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per --calib-text window (default 128)")
    p.add_argument("--eval-data", help="for --model: .pt with {'x': inputs, 'y': labels} for top-1 accuracy")
    p.add_argument("--batch-size", type=int, default=32)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fewbits", description="Quantize PyTorch models and measure what it costs.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("tasks", help="list the built-in tasks")
    q = sub.add_parser("quantize", help="prepare, calibrate and evaluate one model")
    _model_options(q)
    q.add_argument("--recipe", default="w8a8", help="built-in name or a .json recipe file")
    q.add_argument("--calib", help="activation calibration method: minmax, ema, percentile, mse, entropy, aciq, octav")
    q.add_argument("--algo", help="post-training algorithms, comma-separated, in order: cle, smoothquant, awq, stochastic "
                   "(before calibration), adaround, gptq, bc (after); an order that undoes a step is refused")
    q.add_argument("--exclude", help="layers kept float, comma-separated names or globs (e.g. '*lm_head')")
    q.add_argument("--small", action="store_true", help="evaluate on a subset (quick)")
    q.add_argument("--json", help="write the result as JSON")
    q.add_argument("--out", help="directory for report.json and a per-layer SQNR plot")
    q.add_argument("--save", help="write the quantized model as a packed file (fewbits.load reads it)")
    q.add_argument("--onnx", help="export a QDQ ONNX model (ONNX Runtime runs it in int8) and verify it")
    q.add_argument("--onnx-weights", default="auto", choices=["auto", "full", "narrow"],
                   help="auto: 7-bit weights only where this CPU's int8 kernels would saturate (default)")
    q.add_argument("--strict", action="store_true", help="fail when the ONNX model differs from the integer model")
    q.add_argument("--report", action="store_true", help="also write OUT/report.html (needs --out)")
    q.add_argument("--fit-cpu", action="store_true",
                   help="quantize GEMM weights to the width this CPU's int8 kernels run exactly (7 bits on AVX2 "
                        "without VNNI), before calibration, so bias correction fits the deployed weights")
    a = sub.add_parser("auto", help="per-layer precision chosen for you: the smallest model within --max-drop")
    _model_options(a)
    a.add_argument("--small", action="store_true", help="evaluate on a subset (quick)")
    a.add_argument("--max-drop", type=float, default=1.0, help="largest metric drop accepted (default 1.0)")
    a.add_argument("--objective", default="size", choices=["size", "energy", "bops", "latency"],
                   help="what to minimise (latency: from a table of every layer shape and format timed in ONNX "
                        "Runtime on this machine, built once and cached)")
    a.add_argument("--budget", action="append",
                   help="an extra limit, key=value (bytes, bops, energy_pj, latency_s); repeatable")
    a.add_argument("--latency-table", help="the latency table's file (default: one per machine in ~/.cache/fewbits)")
    a.add_argument("--latency-batch", type=int, default=1, help="batch size latency is timed at (default 1)")
    a.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="write OUT/report.html and OUT/report_data.json (default on)")
    a.add_argument("--candidates", default="float,w8a8,w4a8,w8,w4-g128,w3", help="formats a layer may get")
    a.add_argument("--method", default="loss", choices=["sqnr", "loss", "hessian", "fisher"],
                   help="the sensitivity score (default loss: the best predictor in benchmarks/mixed.py)")
    a.add_argument("--algos", default="auto", choices=["auto", "none"],
                   help="auto: bias correction for the convolutions of every configuration tried, and "
                        "a retry with GPTQ on the <= 4-bit layers of one that misses the drop")
    a.add_argument("--points", type=int, default=12, help="budgets along the Pareto front (default 12)")
    a.add_argument("--workers", type=int, default=1,
                   help="processes the sensitivity scores are computed in, one thread each (default 1)")
    a.add_argument("--out", help="directory: recipe.json, model.fewbits, model.onnx, trials.jsonl, auto.json "
                                 "(a second run with the same directory resumes)")
    a.add_argument("--json", help="write the result as JSON")
    r = sub.add_parser("report", help="write the HTML report again from a run's report_data.json")
    r.add_argument("dir", help="a directory written by fewbits auto --out or quantize --report --out, or the data file")
    r.add_argument("--html", help="where to write the page (default: report.html beside the data)")
    t = sub.add_parser("train", help="quantization-aware training of a task's model (torchrun: data-parallel)")
    t.add_argument("--task", required=True, help="a built-in task with training data (see 'fewbits tasks')")
    t.add_argument("--recipe", default="w8a8", help="built-in name or a .json recipe file")
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--method", default="ste", choices=["ste", "lsq", "pact"],
                   help="ste: ranges tracked (weights each step, activations by moving average); lsq: learned "
                        "steps; pact: learned activation clipping")
    t.add_argument("--estimator", default="clipped", choices=["identity", "clipped", "relu", "soft"],
                   help="the rounding's gradient for ste grids")
    t.add_argument("--distill", action="store_true", help="the fp32 model as teacher: KL on softened logits, or the "
                   "embedding cosine for a task without labels (minilm-wordnet)")
    t.add_argument("--distill-weight", type=float, default=0.5, help="share of the distillation term in the loss")
    t.add_argument("--progressive", help="weight bit widths in stages over the epochs, e.g. 8,4,2 (ends at the recipe's)")
    t.add_argument("--layer-stages", type=int, help="quantize the layers in N groups, one more group per share of the "
                   "epochs (layer-wise staging)")
    t.add_argument("--batchnorm", default="fold", choices=["fold", "train"],
                   help="fold: BatchNorm folded with frozen running statistics; train: it keeps learning on batch "
                        "statistics (its folded weight quantized) until --freeze-bn-after")
    t.add_argument("--freeze-bn-after", type=float, default=0.5, help="share of the steps before BatchNorm freezes")
    _training_options(t, lr=1e-4, batch_help="global batch (split over data-parallel ranks)")
    t.add_argument("--json", help="write the result as JSON (shaped like quantize's, plus 'training')")
    t.add_argument("--out", help="directory for report.json and the trained model (model.safetensors)")
    c = sub.add_parser("compress", help="Deep Compression: prune, k-means weight sharing, Huffman coding into a file")
    c.add_argument("--task", required=True, help="a built-in task with labelled training data")
    c.add_argument("--prune", type=float, default=0.9, help="fraction of the Linear/Conv weights removed (default 0.9)")
    c.add_argument("--bits", type=int, default=5, help="cluster-index bits of linear layers (default 5)")
    c.add_argument("--conv-bits", type=int, help="cluster-index bits of convolutions (default: --bits)")
    c.add_argument("--scope", default="global", choices=["global", "layer"],
                   help="one magnitude threshold over all layers, or the same fraction per layer")
    c.add_argument("--steps", type=int, default=3, help="iterative pruning steps, each followed by retraining")
    c.add_argument("--epochs", type=float, default=1.0, help="retraining epochs after each pruning step")
    c.add_argument("--finetune-epochs", type=float, default=1.0, help="epochs of centroid fine-tuning")
    _training_options(c, lr=1e-3, batch_help="examples per step")
    c.add_argument("--out", help="write the compressed model here (.fbdc); default: a temporary file")
    c.add_argument("--json", help="write per-stage sizes, metrics and the compression ratio as JSON")
    d = sub.add_parser("demo", help="the default tasks through several recipes: one comparison table")
    d.add_argument("--tasks", default="fashion-cnn,minilm-wordnet")
    d.add_argument("--small", action="store_true")
    d.add_argument("--out", default="demo-results")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    commands = {"tasks": cmd_tasks, "quantize": cmd_quantize, "auto": cmd_auto, "report": cmd_report, "train": cmd_train,
                "compress": cmd_compress, "demo": cmd_demo}
    try:
        commands[args.command](args)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError, KeyError) as err:
        if args.debug:
            raise
        print(f"fewbits: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
