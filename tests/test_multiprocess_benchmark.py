"""The multi-process benchmark runs end to end (no timing assertions: this is a smoke test)."""

from __future__ import annotations

import pytest

from benchmark_helpers import quick_run


@pytest.mark.slow
def test_the_quick_multiprocess_benchmark_prints_its_table():
  stdout = quick_run("multiprocess.py")
  assert "| processes | step (ms, median) |" in stdout
  rows = [line for line in stdout.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
  assert len(rows) == 2
