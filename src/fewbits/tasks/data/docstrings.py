"""Python standard-library docstrings: a second text corpus for language models, read from the
running interpreter (no download; fixed for a given Python version)."""
from __future__ import annotations

import importlib
import inspect

MODULES = ("collections", "json", "textwrap", "pathlib", "functools", "itertools", "statistics", "heapq",
           "calendar", "difflib", "shutil", "argparse", "csv", "random", "re", "string", "fractions", "decimal")
# other modules than MODULES: calibration text of the same kind that evaluation never scores
CALIBRATION_MODULES = ("os", "typing", "logging", "unittest", "email.message", "http.client", "urllib.parse",
                       "subprocess", "tarfile", "zipfile", "configparser", "dataclasses", "enum", "inspect",
                       "threading", "socket")


def stdlib_docstrings(modules=MODULES) -> list[str]:
    """The docstrings of the public classes and functions each module defines, in name order."""
    out: list[str] = []
    for name in modules:
        module = importlib.import_module(name)
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            doc = inspect.getdoc(obj)
            if doc:
                out.append(doc)
    return out
