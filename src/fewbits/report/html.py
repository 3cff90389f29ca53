"""One self-contained HTML page a person reads in a browser: the summary, the per-layer table
and the plots (PNG, inline as data URIs), rendered from the report data (``report.json``,
versioned) that ``fewbits auto`` and ``fewbits quantize --report`` write.

The data (every key optional but ``schema_version``, ``format`` and ``title``):

- ``summary``: ``metric``, ``fp32``, ``quantized``, ``lower_is_better``, ``bytes_fp32``, ``bytes``,
  ``latency_fp32_s``, ``latency_s``, ``latency_predicted_s``, ``energy_fp32_pj``, ``energy_pj``,
  ``onnx_integer_gemms``;
- ``layers``: rows ``name``, ``type``, ``format``, ``why_float``, ``sensitivity`` (format → score),
  ``sqnr_db``, ``bytes``, ``latency_s``;
- ``front`` (points ``cost``, ``damage``), ``front_key``, ``uniform`` (``name``, ``cost``, ``damage``),
  ``chosen`` (``cost``, ``damage``), ``trials`` (``cost``, ``metric``, ``ok``);
- ``histograms`` (layer → ``edges``, ``counts``, ``range``), ``parity`` (``simulated``,
  ``deployed``), ``latency_check`` (``name``, ``predicted_s``, ``measured_s``).
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from ..files import write_atomic

REPORT_FORMAT, REPORT_VERSION = "fewbits.report", 1
COST_LABELS = {"bytes": ("size", "MB", 1e-6), "latency_s": ("latency", "ms", 1e3), "energy_pj": ("energy", "µJ", 1e-6),
               "bops": ("BOPs", "GBOPs", 1e-9)}


def read_report_data(path) -> dict:
    """The report data at ``path``; anything else is an error naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not readable report data ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT:
        raise ValueError(f"{path}: not fewbits report data (format {data.get('format') if isinstance(data, dict) else None!r})")
    if data.get("schema_version") != REPORT_VERSION:
        raise ValueError(f"{path}: report data version {data.get('schema_version')!r}; this fewbits reads {REPORT_VERSION}")
    return data


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    _plt().close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _front_plot(data: dict):
    front = data.get("front") or []
    if not front:
        return None
    key = data.get("front_key", "bytes")
    label, unit, factor = COST_LABELS.get(key, (key, "", 1.0))
    plt = _plt()
    trials = [t for t in data.get("trials", []) if t.get("cost") is not None]
    fig, axes = plt.subplots(1, 2 if trials else 1, figsize=(12 if trials else 7, 4.2), squeeze=False)
    ax = axes[0, 0]
    ax.plot([p["cost"] * factor for p in front], [max(p["damage"], 1e-12) for p in front], "o-", ms=4,
            label="mixed (Pareto front)")
    for u in data.get("uniform", []):
        if u.get("cost") is not None and u.get("damage") is not None:
            ax.plot(u["cost"] * factor, max(u["damage"], 1e-12), "s", ms=7)
            ax.annotate(u["name"], (u["cost"] * factor, max(u["damage"], 1e-12)), fontsize=8, xytext=(4, 4),
                        textcoords="offset points")
    chosen = data.get("chosen")
    if chosen:
        ax.plot(chosen["cost"] * factor, max(chosen["damage"], 1e-12), "*", ms=16, color="crimson", label="chosen")
    ax.set_yscale("log")
    ax.set_xlabel(f"{label} ({unit})")
    ax.set_ylabel("predicted damage (sum of layer scores)")
    ax.set_title("Pareto front against the uniform recipes")
    ax.legend(fontsize=8)
    if trials:
        ax = axes[0, 1]
        for ok, colour in ((True, "tab:green"), (False, "tab:red")):
            pts = [t for t in trials if bool(t.get("ok")) == ok]
            ax.plot([t["cost"] * factor for t in pts], [t["metric"] for t in pts], "o", color=colour,
                    label="within the drop" if ok else "past the drop")
        summary = data.get("summary", {})
        if summary.get("fp32") is not None:
            ax.axhline(summary["fp32"], color="grey", ls="--", label="fp32")
        ax.set_xlabel(f"{label} ({unit})")
        ax.set_ylabel(summary.get("metric") or "metric")
        ax.set_title("trials, measured")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _sensitivity_plot(data: dict):
    rows = [r for r in data.get("layers", []) if r.get("sensitivity")]
    if not rows:
        return None
    plt = _plt()
    formats = [f for f in rows[0]["sensitivity"] if f != "float"]
    fig, ax = plt.subplots(figsize=(max(8, 0.22 * len(rows) + 3), 4.8))
    for f in formats:
        ys = [r["sensitivity"].get(f) for r in rows]
        ax.plot(range(len(rows)), [max(y, 1e-12) if y is not None else float("nan") for y in ys], "o-", ms=3, label=f)
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["name"] for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel("damage with only this layer quantized")
    ax.set_title(f"per-layer sensitivity ({data.get('method', 'score')})")
    ax.legend(fontsize=8, ncol=min(len(formats), 6))
    fig.tight_layout()
    return fig


def _histogram_plot(data: dict, most: int = 12):
    hists = data.get("histograms") or {}
    if not hists:
        return None
    plt = _plt()
    names = sorted(hists, key=lambda n: -hists[n].get("clipped", 0))[:most]
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, n in zip(axes.flat, names):
        h = hists[n]
        edges, counts = h["edges"], h["counts"]
        ax.bar(edges[:-1], [max(c, 0.5) for c in counts], width=[b - a for a, b in zip(edges, edges[1:])],
               align="edge", color="tab:blue")
        for x in h["range"]:
            ax.axvline(x, color="crimson", lw=1.2)
        ax.set_yscale("log")
        ax.set_title(f"{n} ({100 * h.get('clipped', 0):.2f}% clipped)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle("layer inputs and the clipping range of their grid (red), most clipped first", fontsize=10)
    fig.tight_layout()
    return fig


def _parity_plot(data: dict):
    parity = data.get("parity")
    if not parity:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    a, b = parity["simulated"], parity["deployed"]
    ax.plot(a, b, ".", ms=3)
    lo, hi = min(a + b), max(a + b)
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1)
    ax.set_xlabel("simulated (fewbits)")
    ax.set_ylabel("deployed (ONNX Runtime)")
    ax.set_title(f"outputs: max |Δ| {parity.get('max_abs_diff', 0):.3g}", fontsize=10)
    fig.tight_layout()
    return fig


def _latency_plot(data: dict):
    check = data.get("latency_check") or []
    if not check:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 4.5))
    ps, ms = [c["predicted_s"] * 1e3 for c in check], [c["measured_s"] * 1e3 for c in check]
    ax.plot(ms, ps, "o")
    for c, x, y in zip(check, ms, ps):
        ax.annotate(c["name"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    lo, hi = min(ms + ps) * 0.9, max(ms + ps) * 1.1
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1)
    ax.fill_between([lo, hi], [lo * 0.85, hi * 0.85], [lo * 1.15, hi * 1.15], color="grey", alpha=0.15, label="±15%")
    ax.set_xlabel("measured (ms)")
    ax.set_ylabel("predicted from the table (ms)")
    ax.set_title("whole-model latency, ONNX Runtime")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _fmt(v, kind: str = "") -> str:
    if v is None:
        return "–"
    if kind == "bytes":
        return f"{v / 1e6:.4f} MB" if v >= 1e5 else f"{v / 1e3:.1f} kB"
    if kind == "s":
        return f"{v * 1e3:.3f} ms" if v >= 1e-4 else f"{v * 1e6:.1f} µs"
    if kind == "pj":
        return f"{v / 1e6:.3f} µJ"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def render(data: dict) -> str:
    """The page (a string) for ``data`` (see the module docstring)."""
    e = html.escape
    s = data.get("summary", {})
    parts = [f"<h1>{e(data.get('title', 'fewbits report'))}</h1>"]
    if data.get("model"):
        parts.append(f"<p class=note>{e(str(data['model']))}</p>")
    rows = [("metric", s.get("metric"), None, None),
            ("value", s.get("fp32"), s.get("quantized"), ""),
            ("size", s.get("bytes_fp32"), s.get("bytes"), "bytes"),
            ("deployed latency", s.get("latency_fp32_s"), s.get("latency_s"), "s"),
            ("predicted latency", None, s.get("latency_predicted_s"), "s"),
            ("energy estimate (per sample)", s.get("energy_fp32_pj"), s.get("energy_pj"), "pj"),
            ("weight GEMMs on integer kernels", None, s.get("onnx_integer_gemms"), "")]
    table = ["<table class=summary><tr><th></th><th>fp32</th><th>quantized</th></tr>"]
    for label, a, b, kind in rows:
        if kind is None:
            table.append(f"<tr><th>{label}</th><td colspan=2>{_fmt(a)}</td></tr>")
        elif a is not None or b is not None:
            table.append(f"<tr><th>{label}</th><td>{_fmt(a, kind)}</td><td>{_fmt(b, kind)}</td></tr>")
    table.append("</table>")
    parts.append("<h2>Summary</h2>" + "".join(table))
    for note in data.get("notes", []):
        parts.append(f"<p class=note>{e(note)}</p>")
    plots = [("Pareto front", _front_plot), ("Per-layer sensitivity", _sensitivity_plot),
             ("Activation histograms", _histogram_plot), ("Simulated against deployed", _parity_plot),
             ("Predicted against measured latency", _latency_plot)]
    for title, make in plots:
        fig = make(data)
        if fig is not None:
            parts.append(f"<h2>{title}</h2><img class=plot alt='{e(title)}' src='data:image/png;base64,{_png(fig)}'>")
    layers = data.get("layers", [])
    if layers:
        formats = [f for f in next((r["sensitivity"] for r in layers if r.get("sensitivity")), {}) if f != "float"]
        head = "".join(f"<th>{e(f)}</th>" for f in formats)
        body = ["<table class=layers><tr><th>layer</th><th>type</th><th>format</th><th>isolated SQNR dB</th>"
                f"<th>bytes</th><th>latency</th>{head}<th>why float</th></tr>"]
        if formats:
            parts.append("<p class=note>Sensitivity columns: the damage with only that layer in that format.</p>")
        for r in layers:
            sens = "".join(f"<td>{_fmt((r.get('sensitivity') or {}).get(f))}</td>" for f in formats)
            body.append(f"<tr><td>{e(r['name'])}</td><td>{e(str(r.get('type', '')))}</td>"
                        f"<td class=fmt>{e(str(r.get('format', '')))}</td><td>{_fmt(r.get('sqnr_db'))}</td>"
                        f"<td>{_fmt(r.get('bytes'), 'bytes')}</td><td>{_fmt(r.get('latency_s'), 's')}</td>{sens}"
                        f"<td>{e(r.get('why_float') or '')}</td></tr>")
        body.append("</table>")
        parts.append(f"<h2>Layers ({len(layers)})</h2>" + "".join(body))
    style = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right}"
             "th:first-child,td:first-child{text-align:left}.fmt{font-weight:bold}.note{color:#555}"
             "img.plot{max-width:100%;display:block;margin:1em 0}")
    # after load: how many plots decoded (a browser test reads it back from the DOM)
    script = ("window.addEventListener('load',function(){var n=0;document.querySelectorAll('img.plot')"
              ".forEach(function(i){if(i.complete&&i.naturalWidth>0)n++;});document.body.dataset.plots=n;});")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>" + e(data.get("title", "fewbits report"))
            + f"</title><style>{style}</style></head><body>" + "".join(parts)
            + f"<script>{script}</script></body></html>")


def write_report(data: dict, path) -> Path:
    """``path`` (the HTML page) from ``data``, written atomically."""
    path = Path(path)
    write_atomic(path, render(data).encode())
    return path
