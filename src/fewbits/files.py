"""Writing files atomically: a reader sees the old file or the complete new one, never half."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_atomic(path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(path, data: dict, **dump_options) -> Path:
    return write_atomic(path, json.dumps(data, indent=1, **dump_options).encode())
