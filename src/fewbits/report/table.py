"""Plain Markdown tables: they read well in a terminal and paste into docs unchanged."""
from __future__ import annotations


def format_table(rows: list[dict], title: str = "") -> str:
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = [f"\n{title}\n"] if title else []
    lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        # callers round to the precision that matters (a cosine of 0.9981 vs 0.995 needs four
        # places); the table only drops trailing zeros
        return f"{v:.3g}" if abs(v) < 0.01 and v != 0 else f"{v:,.4f}".rstrip("0").rstrip(".")
    return "" if v is None else str(v)
