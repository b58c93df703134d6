"""One process of a governed run over several JAX processes on this machine (loopback).

`python tests/multiprocess_worker.py '<json>'` with keys: processes, process, port, devices (per
process), run, authorities, key_dir, mode ("start" | "resume"), steps, batch (global rows per
step), checkpoint_every, mesh ("auto" | "explicit"), kill ([process, step]: exit before that
step), diverge (perturb this process's replica of the parameters), profile (false: no entropy
profile), refuse ([process, step]: feed one uncredentialed example), cache (a compilation cache
directory), out (where to write the step times). One process with `processes` 1 runs the same global batches alone, on a mesh of its own
devices. Used by tests/test_multiprocess.py and benchmarks/multiprocess.py.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

TASK = "aqgov.examples.tiny_lm:make_task"
SMALL = {"seq_len": 16, "d_model": 16, "num_heads": 4, "num_blocks": 1, "adapter_dim": 4, "seed": 0}


def documents(root: Path) -> dict:
  """The signed documents and public keys `aqgov.examples.demo.create_authorities` wrote."""
  return {
    "policies": sorted((root / "policies").glob("*.signed")),
    "profiles": sorted((root / "profiles").glob("*.signed")),
    "manifests": sorted((root / "manifests").glob("*.manifest")),
    "trust": sorted((root / "keys").glob("*.pub")),
  }


def main(cfg: dict) -> None:
  import jax

  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", int(cfg.get("devices", 2)))
  if cfg.get("cache"):  # compiled steps shared by the runs of one test session
    jax.config.update("jax_compilation_cache_dir", cfg["cache"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  n_proc = int(cfg.get("processes", 1))
  if n_proc > 1:
    jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{cfg['port']}",
      num_processes=n_proc,
      process_id=int(cfg["process"]),
      initialization_timeout=120,
      heartbeat_timeout_seconds=int(cfg.get("heartbeat_s", 10)),
      shutdown_timeout_seconds=20,
    )
  import numpy as np
  from jax.sharding import AxisType, Mesh

  from aqgov.examples import sample
  from aqgov.lineage import GovernedRun

  explicit = cfg.get("mesh", "auto") == "explicit"
  mesh = Mesh(
    np.asarray(jax.devices()),
    ("data",),
    axis_types=(AxisType.Explicit if explicit else AxisType.Auto,),
  )
  me = jax.process_index()
  docs = documents(Path(cfg["authorities"]))
  if not cfg.get("profile", True):
    docs["profiles"] = []
  key_dir = cfg["key_dir"] if me == 0 else None  # only process 0 holds the run key
  if cfg.get("mode", "start") == "start":
    run = GovernedRun.start(
      cfg["run"],
      task=TASK,
      task_config=SMALL,
      **docs,
      checkpoint_every=int(cfg.get("checkpoint_every", 2)),
      run_id=cfg.get("run_id", "multiprocess"),
      key_dir=key_dir,
      mesh=mesh,
    )
  else:
    run = GovernedRun.resume(cfg["run"], trust=docs["trust"], key_dir=key_dir, mesh=mesh)
  if cfg.get("diverge"):  # this process's replica of the parameters differs from the others'
    local = jax.tree.map(lambda x: np.asarray(x) * (1.0 + 1e-3 * me), run.state.params)
    run.state = run.state._replace(params=run.distributed.place_state(local))
  examples = sample.examples()
  rows = int(cfg.get("batch", 8))
  mine = rows // n_proc
  times = []
  while run.next_step <= int(cfg["steps"]):
    s = run.next_step
    if cfg.get("kill") == [me, s]:
      os._exit(17)  # as a host that dies: no cleanup, no flush
    start = (s - 1) * rows % (len(examples) - rows)
    batch = examples[start : start + rows][me * mine : (me + 1) * mine]
    if cfg.get("refuse") == [me, s]:  # an example no manifest vouches for
      batch = [batch[0]._replace(id="uncredentialed", content=b"scraped text"), *batch[1:]]
    t = time.perf_counter()
    run.step(batch)
    times.append(time.perf_counter() - t)
  run.close()
  if cfg.get("out"):
    steps = max(len(times), 1)
    Path(cfg["out"]).write_text(
      json.dumps(
        {
          "process": me,
          "step_s": times,
          "gathered_bytes_per_step": run.distributed.gathered_bytes / steps,
          "record_s_per_step": run.distributed.record_seconds / steps,
        }
      )
    )


if __name__ == "__main__":
  main(json.loads(sys.argv[1]))
