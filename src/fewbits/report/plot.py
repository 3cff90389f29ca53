"""Plots people would rather see than read (matplotlib is imported only here)."""
from __future__ import annotations

from pathlib import Path


def plot_layer_sqnr(reports: dict, path: Path, title: str = "") -> Path:
    """Per-layer output SQNR (solid) and weight SQNR (dotted) of several reports, one panel each."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plots need matplotlib: pip install matplotlib (or the 'tasks' extra)") from None
    groups: dict[str, dict] = {}
    for label, report in reports.items():
        task = label.split(" | ")[0]
        groups.setdefault(task, {})[label] = report
    fig, axes = plt.subplots(len(groups), 1, figsize=(11, 3.6 * len(groups)), squeeze=False)
    for ax, (task, members) in zip(axes[:, 0], groups.items()):
        for label, report in members.items():
            xs = range(len(report.layers))
            line, = ax.plot(xs, [r.output_sqnr_db for r in report.layers], marker="o", ms=3, label=label.split(" | ", 1)[-1])
            ax.plot(xs, [r.weight_sqnr_db for r in report.layers], ls=":", color=line.get_color())
        ax.set_title(f"{task}: per-layer SQNR (solid: layer output, dotted: weight)")
        ax.set_xlabel("quantized layer (network order)")
        ax.set_ylabel("dB")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
