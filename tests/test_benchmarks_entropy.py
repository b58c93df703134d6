"""The entropy benchmark runs end to end (a smoke run; no timing assertions)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_entropy_benchmark_quick_run_prints_its_table():
  result = subprocess.run(
    [sys.executable, str(ROOT / "benchmarks" / "entropy.py"), "--quick"],
    capture_output=True,
    text=True,
    timeout=600,
    cwd=ROOT,
  )
  assert result.returncode == 0, result.stderr
  assert "| step | median wall | wall / plain | median CPU | CPU / plain |" in result.stdout
  for row in (
    "| plain |",
    "| + attention entropy |",
    "| + renyi2 + effective rank |",
    "| + gradient entropy |",
    "| all metrics |",
    "| all metrics + enforce |",
  ):
    assert row in result.stdout
