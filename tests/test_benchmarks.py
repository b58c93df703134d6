"""The routing benchmark runs end to end (a smoke run; no timing assertions)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmark_helpers import quick_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_routing_benchmark_quick_run_prints_its_table():
  stdout = quick_run("routing.py")
  lines = stdout.splitlines()
  header = next(line for line in lines if line.startswith("| model |"))
  for column in (
    "plain step",
    "per_example time",
    "cotangent time",
    "cotangent+norms time",
    "cotangent+sketch time",
    "cotangent+visibility time",
    "per_example mem",
    "cotangent mem",
    "cotangent+norms mem",
    "cotangent+visibility mem",
  ):
    assert f"| {column} |" in header
  rows = [line for line in lines if line.startswith(("| MLP", "| CNN", "| LM", "| scan", "| RNN"))]
  assert len(rows) == 5
  for row in rows:
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == header.count("|") - 1
    for cell in cells[3:]:  # visibility inside a scan is not covered: those cells say n/a
      assert re.fullmatch(r"\d+\.\d\dx( \(\d+\.\d\dx\))?|n/a", cell), cell


@pytest.mark.slow
def test_own_loop_benchmark_quick_run_prints_its_table():
  stdout = quick_run("own_loop.py")
  rows = [line.split("|")[1].strip() for line in stdout.splitlines() if line.startswith("| ")]
  assert rows[:5] == ["loop", "plain", "summary", "record", "emit"]


@pytest.mark.slow
def test_slices_benchmark_quick_run_prints_ratios_for_heads_and_experts():
  stdout = quick_run("slices.py")
  lines = stdout.splitlines()
  header = next(line for line in lines if line.startswith("| model |"))
  for column in ("plain step", "per_example time", "cotangent time", "cotangent+norms time"):
    assert f"| {column} |" in header
  rows = [line for line in lines if line.startswith(("| attention LM", "| MoE"))]
  assert len(rows) == 2 and all(re.search(r"\d\.\d\dx", row) for row in rows)
