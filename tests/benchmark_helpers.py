"""Running a benchmark script end to end, as a smoke test (never a timing assertion)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_run(script: str, *, timeout: int = 900, env: Mapping[str, str] | None = None) -> str:
  """`python benchmarks/<script> --quick` from the repository root; its stdout, once it exited 0."""
  result = subprocess.run(
    [sys.executable, str(ROOT / "benchmarks" / script), "--quick"],
    capture_output=True,
    text=True,
    timeout=timeout,
    cwd=ROOT,
    env=None if env is None else dict(env),
  )
  assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
  return result.stdout
