"""Efficacy of routing: does a quarantine adapter hold what sensitive data teaches? (see docs/efficacy.md)

    python benchmarks/efficacy.py              # 3 seeds, 800 steps, 10,000 exposure candidates
    python benchmarks/efficacy.py --quick      # 1 seed, a few steps, 500 candidates: a smoke run

A small character-level transformer with a quarantine adapter per block trains on generated text
with 20 planted canary secrets in about 7% of batch slots (`aqgov.examples.efficacy`). Every variant
sees the same data order for the same steps. Prints one markdown table (mean ± spread, the spread
being half the range over seeds) and the depth table. Exposure is in bits (Carlini et al. 2019):
log2(candidates + 1) - log2(rank of the secret); a never-seen secret scores about 1. The step-time
ratio is the median wall-clock step of a variant over the control's, measured in the same run.

OpenBLAS is pinned to one thread (as in the other benchmarks): its spinning threads would contend
with XLA's pool on a small machine.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from aqgov.examples import efficacy  # noqa: E402

ROWS = (
  "control",
  "control, ablated",
  "filtered",
  "routing",
  "routing, ablated",
  "visibility",
  "visibility, ablated",
)
DEPTH_ROWS = (
  "visibility",
  "visibility, ablated",
  "visibility-last",
  "visibility-last, ablated",
  "control",
  "filtered",
)


def fmt(values: list[float], digits: int = 2, percent: bool = False) -> str:
  """`mean ± half-range` of per-seed values (just the mean for one seed)."""
  v = np.asarray(values, np.float64) * (100 if percent else 1)
  unit = "%" if percent else ""
  if len(v) == 1:
    return f"{v[0]:.{digits}f}{unit}"
  return f"{v.mean():.{digits}f} ± {(v.max() - v.min()) / 2:.{digits}f}{unit}"


def cell(runs: list[dict], row: str, key: str, **kw) -> str:
  values = [r[row][key] for r in runs if key in r[row]]
  return fmt(values, **kw) if values else "—"


def main_table(runs: list[dict]) -> str:
  header = (
    "| variant | exposure (trained) | exposure (fit) | exposure (never-seen) | held-out loss | tax vs filtered "
    "| relearned exposure | step time vs control |"
  )
  lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
  for row in ROWS:
    lines.append(
      f"| {row} | {cell(runs, row, 'exposure')} | {cell(runs, row, 'exposure_fit', digits=1)} | "
      f"{cell(runs, row, 'never_seen')} | {cell(runs, row, 'loss', digits=3)} | "
      f"{cell(runs, row, 'tax', digits=1, percent=True)} | {cell(runs, row, 'relearned')} | "
      f"{cell(runs, row, 'step_ratio')}x |"
    )
  return "\n".join(lines)


def depth_table(runs: list[dict]) -> str:
  layers = len(runs[0]["control"]["probe"])
  names = ["embed"] + [f"block {i}" for i in range(layers - 1)]
  header = (
    "| variant | exposure (trained) | held-out loss | "
    + " | ".join(f"probe {n}" for n in names)
    + " |"
  )
  lines = [header, "|" + "---|" * (header.count(" | ") + 1)]
  for row in DEPTH_ROWS:
    probes = [fmt([r[row]["probe"][i] for r in runs]) for i in range(layers)]
    lines.append(
      f"| {row} | {cell(runs, row, 'exposure')} | {cell(runs, row, 'loss', digits=3)} | "
      + " | ".join(probes)
      + " |"
    )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=800)
  parser.add_argument(
    "--candidates", type=int, default=10_000, help="random codes each secret is ranked among"
  )
  parser.add_argument("--quick", action="store_true", help="1 seed, 60 steps, 500 candidates")
  args = parser.parse_args(argv)
  seeds, steps, candidates = (
    (1, 60, 500) if args.quick else (args.seeds, args.steps, args.candidates)
  )
  start = time.perf_counter()
  runs = []
  for seed in range(seeds):
    runs.append(efficacy.run_seed(seed, steps, candidates=candidates))
    print(
      f"seed {seed} done at {time.perf_counter() - start:.0f} s: {json.dumps(runs[-1])}",
      file=sys.stderr,
    )
  print(f"## canary exposure and tax ({seeds} seed(s), {steps} steps, {candidates:,} candidates)\n")
  print(main_table(runs))
  print(
    "\n## depth: sensitive data in every block's adapter vs the last block's only "
    "(probe: trained vs never-seen canary, per layer)\n"
  )
  print(depth_table(runs))
  print(f"\ntotal {time.perf_counter() - start:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
