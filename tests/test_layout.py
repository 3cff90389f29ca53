"""The package's shape (fewbits.devtools.layout): no import cycle, no file over 600 lines, and one
definition each for the rules that must not be written twice."""
from pathlib import Path

from fewbits.devtools import layout

ROOT = Path(layout.__file__).resolve().parents[1]


def test_no_import_cycles_and_no_long_files():
    assert layout.cycles(layout.import_graph(ROOT)) == []
    assert layout.long_files(ROOT) == []


def test_the_deployability_rule_integer_weight_and_bias_are_defined_once():
    defs = layout.definitions(ROOT)
    assert {n: len(w) for n, w in defs.items()} == {n: 1 for n in layout.SINGLE_DEFINITIONS}, defs


def test_the_cycle_finder_finds_a_cycle():
    # the check itself can fail: a two-module loop and a three-module loop are found, a chain is not
    edges = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert sorted(layout.cycles(edges)) == [["a", "b"], ["c", "d", "e"]]
