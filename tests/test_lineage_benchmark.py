"""The lineage benchmark runs end to end (no timing assertions: this is a smoke test)."""

from __future__ import annotations

from benchmark_helpers import quick_run


def test_the_quick_lineage_benchmark_prints_its_table():
  stdout = quick_run("lineage.py", timeout=600)
  for metric in ("| write |", "| verify |", "raw SHA-256", "async writer on the training loop"):
    assert metric in stdout
