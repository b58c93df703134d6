"""The attribution benchmark runs end to end (a smoke run; no timing or quality assertions)."""

from pathlib import Path

import pytest

from benchmark_helpers import quick_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_attribution_benchmark_quick_run_prints_its_figures():
  stdout = quick_run("attribution.py")
  for start in ("cost (MLP", "mislabel (digits", "canaries (tiny LM", "attribution:"):
    assert any(line.startswith(start) for line in stdout.splitlines()), stdout
