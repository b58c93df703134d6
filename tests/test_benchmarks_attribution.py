"""The attribution benchmark runs end to end (a smoke run; no timing or quality assertions)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_attribution_benchmark_quick_run_prints_its_figures():
  result = subprocess.run(
    [sys.executable, str(ROOT / "benchmarks" / "attribution.py"), "--quick"],
    capture_output=True,
    text=True,
    timeout=900,
    cwd=ROOT,
  )
  assert result.returncode == 0, result.stderr
  for start in ("cost (MLP", "mislabel (digits", "canaries (tiny LM", "attribution:"):
    assert any(line.startswith(start) for line in result.stdout.splitlines()), result.stdout
