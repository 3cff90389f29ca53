"""WordNet 3.0 glosses from Debian's ``wordnet-base`` (``/usr/share/wordnet/data.*``)."""
from __future__ import annotations

from pathlib import Path

WORDNET_DIR = Path("/usr/share/wordnet")


def read_glosses(part_of_speech: str = "noun", limit: int | None = None) -> list[tuple[str, list[str]]]:
    """``(definition, example sentences)`` per synset, in file order."""
    path = WORDNET_DIR / f"data.{part_of_speech}"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: install Debian's 'wordnet-base' (apt-get install wordnet-base)")
    out: list[tuple[str, list[str]]] = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  ") or " | " not in line:  # licence header
                continue
            gloss = line.split(" | ", 1)[1].strip()
            parts = [p.strip() for p in gloss.split(";")]
            definition = parts[0]
            examples = [p.strip('"') for p in parts[1:] if p.startswith('"')]
            out.append((definition, examples))
            if limit is not None and len(out) >= limit:
                break
    return out
