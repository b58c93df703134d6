"""Governed runs over several JAX processes on this machine (loopback, CPU devices).

    python benchmarks/multiprocess.py [--quick] [--steps 12] [--batch 16] [--processes 1 2 4]

Runs the same governed run (`aqgov.examples.tiny_lm`, the test configuration, demo authorities)
with 1, 2 and 4 processes over the same 4 CPU devices in all (4 // processes per process) and
prints per configuration: the median step time after the first step (which compiles) as a
ratio to the single process, the part of it spent gathering the summary, building the record and
agreeing on its digest (on every process, on the training thread), the bytes each process receives per step from the step gathers
(summary arrays, ids and content hashes, counts, record digests; an upper bound on what crosses
hosts, as it includes the process's own shard), and the lineage bytes per step record.

On one machine the processes share its cores and talk over loopback, so the ratios show the cost
of the per-step gathers and agreement rather than any speed-up; on a cluster each process has its
own host and accelerators.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multiprocess_worker.py"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run(processes: int, tmp: Path, authorities: Path, steps: int, batch: int) -> dict:
  run, port = tmp / f"run-{processes}", _free_port()
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
  cfg = {
    "processes": processes,
    "port": port,
    "devices": max(4 // processes, 1),
    "run": str(run),
    "authorities": str(authorities),
    "key_dir": str(tmp / f"key-{processes}"),
    "steps": steps,
    "batch": batch,
    "checkpoint_every": 10**6,
  }
  procs = [
    subprocess.Popen(
      [sys.executable, str(WORKER), json.dumps({**cfg, "process": i, "out": str(run) + f".{i}"})],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(processes)
  ]
  for i, p in enumerate(procs):
    text, _ = p.communicate(timeout=1200)
    if p.returncode != 0:
      raise SystemExit(f"{processes} processes: process {i} exited {p.returncode}\n{text[-3000:]}")
  outs = [json.loads(Path(str(run) + f".{i}").read_text()) for i in range(processes)]
  sys.path.insert(0, str(ROOT))
  from aqgov.lineage import LogReader
  from aqgov.lineage import _record as rec

  sizes = [
    len(rec.encode_step_body(r.body)) for r in LogReader(run / "lineage") if r.kind == rec.STEP
  ]
  # a step lasts as long as its slowest process
  per_step = [max(o["step_s"][k] for o in outs) for k in range(1, steps)]
  return {
    "step_ms": 1e3 * statistics.median(per_step),
    "gathered": statistics.mean(o["gathered_bytes_per_step"] for o in outs),
    "record": statistics.mean(sizes),
    "record_ms": 1e3 * max(o["record_s_per_step"] for o in outs),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="few steps, 1 and 2 processes")
  parser.add_argument("--steps", type=int, default=12)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
  args = parser.parse_args()
  steps, counts = (4, [1, 2]) if args.quick else (args.steps, args.processes)
  sys.path.insert(0, str(ROOT))
  from aqgov.examples.demo import create_authorities

  with tempfile.TemporaryDirectory() as d:
    tmp = Path(d)
    authorities = create_authorities(tmp / "authorities").root
    results = {n: _run(n, tmp, authorities, steps, args.batch) for n in counts}
  base = results[counts[0]]["step_ms"]
  print(f"governed tiny_lm run, global batch {args.batch}, {steps} steps, 4 CPU devices in all")
  print(
    "| processes | step (ms, median) | vs 1 process | gather + agree (ms) "
    "| gathered B/step/process | record B/step |"
  )
  print("|---|---|---|---|---|---|")
  for n, r in results.items():
    print(
      f"| {n} | {r['step_ms']:.1f} | {r['step_ms'] / base:.2f}x | {r['record_ms']:.2f} "
      f"| {r['gathered']:.0f} "
      f"| {r['record']:.0f} |"
    )


if __name__ == "__main__":
  main()
