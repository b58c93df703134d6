"""The lineage benchmark runs end to end (no timing assertions: this is a smoke test)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "lineage.py"


def test_the_quick_lineage_benchmark_prints_its_table():
  out = subprocess.run(
    [sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=600
  )
  assert out.returncode == 0, out.stderr[-2000:]
  for metric in ("| write |", "| verify |", "raw SHA-256", "async writer on the training loop"):
    assert metric in out.stdout
