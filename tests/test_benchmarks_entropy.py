"""The entropy benchmark runs end to end (a smoke run; no timing assertions)."""

from __future__ import annotations

from pathlib import Path

from benchmark_helpers import quick_run

ROOT = Path(__file__).resolve().parents[1]


def test_entropy_benchmark_quick_run_prints_its_table():
  stdout = quick_run("entropy.py", timeout=600)
  assert "| step | median wall | wall / plain | median CPU | CPU / plain |" in stdout
  for row in (
    "| plain |",
    "| + attention entropy |",
    "| + renyi2 + effective rank |",
    "| + gradient entropy |",
    "| all metrics |",
    "| all metrics + enforce |",
  ):
    assert row in stdout
