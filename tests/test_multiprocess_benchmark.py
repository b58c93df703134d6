"""The multi-process benchmark runs end to end (no timing assertions: this is a smoke test)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "multiprocess.py"


@pytest.mark.slow
def test_the_quick_multiprocess_benchmark_prints_its_table():
  out = subprocess.run(
    [sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=900
  )
  assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
  assert "| processes | step (ms, median) |" in out.stdout
  rows = [line for line in out.stdout.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
  assert len(rows) == 2
