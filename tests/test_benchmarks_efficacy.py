"""The efficacy benchmark runs end to end and prints its two tables (a smoke run; no timing assertions)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_efficacy_benchmark_quick_run_prints_its_tables():
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
  result = subprocess.run(
    [sys.executable, str(ROOT / "benchmarks" / "efficacy.py"), "--quick"],
    capture_output=True,
    text=True,
    timeout=900,
    cwd=ROOT,
    env=env,
  )
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  header = next(
    line for line in lines if line.startswith("| variant | exposure (trained) | exposure (fit)")
  )
  for column in (
    "exposure (never-seen)",
    "held-out loss",
    "tax vs filtered",
    "relearned exposure",
    "step time vs control",
  ):
    assert f"| {column} |" in header
  rows = {
    line.split("|")[1].strip()
    for line in lines
    if line.startswith("| ") and not line.startswith("| variant")
  }
  assert {
    "control",
    "control, ablated",
    "filtered",
    "routing, ablated",
    "visibility, ablated",
    "visibility-last, ablated",
  } <= rows
  assert any(
    line.startswith("| variant | exposure (trained) | held-out loss | probe embed")
    for line in lines
  )
