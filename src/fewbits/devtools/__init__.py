"""Checks on fewbits' own source (run by the test suite and before a change lands)."""
