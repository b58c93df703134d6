"""Governed runs over several JAX processes (loopback, CPU): one lineage, written by process 0,
bitwise the lineage of one process running the same global batches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh

from aqgov.documents._keys import TrustStore
from aqgov.errors import LineageError
from aqgov.examples import sample
from aqgov.examples.demo import create_authorities
from aqgov.lineage import GovernedRun, LogReader, process_index, verify_lineage
from aqgov.lineage import _record as rec

import multiprocess_worker as worker

WORKER = Path(__file__).with_name("multiprocess_worker.py")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def authorities(tmp_path_factory):
  return create_authorities(tmp_path_factory.mktemp("authorities"))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(processes: int, run: Path, authorities, **cfg) -> list[subprocess.Popen]:
  """Start `processes` workers of one run (a fresh coordinator port each time)."""
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
  base = {
    "processes": processes,
    "port": free_port(),
    "run": str(run),
    "authorities": str(authorities.root),
    "key_dir": str(run.parent / f"{run.name}-key"),
    **cfg,
  }
  return [
    subprocess.Popen(
      [sys.executable, str(WORKER), json.dumps({**base, "process": i})],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(processes)
  ]


def finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str]]:
  out = []
  for p in procs:
    try:
      text, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      p.kill()
      text, _ = p.communicate()
    out.append((p.returncode, text))
  return out


def run_all(processes: int, run: Path, authorities, **cfg) -> None:
  results = finish(launch(processes, run, authorities, **cfg))
  for i, (rc, text) in enumerate(results):
    assert rc == 0, f"process {i} exited {rc}:\n{text[-4000:]}"


def steps_of(run: Path) -> dict[int, dict]:
  """The step bodies that describe the run (the last of each number, after resumes), time left out."""
  out = {}
  for r in LogReader(run / "lineage"):
    if r.kind == rec.STEP:
      out[int(r.body["step"])] = {k: v for k, v in r.body.items() if k != "time"}
  return out


def params_at(run: Path) -> dict[int, str]:
  return {
    int(r.body["step"]): r.body["params_sha256"]
    for r in LogReader(run / "lineage")
    if r.kind == rec.CHECKPOINT
  }


def trust_of(run: Path) -> TrustStore:
  return TrustStore.from_paths(sorted((run / "keys").glob("*.pub")))


STEPS = 3


@pytest.mark.slow
@pytest.mark.parametrize(("processes", "mesh"), [(2, "explicit"), (4, "auto")])
def test_a_run_over_processes_records_bitwise_the_lineage_of_one_process(
  tmp_path, authorities, processes, mesh
):
  # 2 CPU devices per process; the reference runs alone on as many devices as all processes hold
  common = {"steps": STEPS, "batch": 8, "checkpoint_every": 2, "devices": 8 // processes}
  run_all(processes, tmp_path / "multi", authorities, mesh=mesh, **common)
  run_all(1, tmp_path / "single", authorities, **{**common, "devices": 8})
  multi, single = steps_of(tmp_path / "multi"), steps_of(tmp_path / "single")
  assert sorted(multi) == list(range(1, STEPS + 1))
  # ids in global batch order: process 0's shard first, then process 1's, ...
  first = [e.id for e in sample.examples()[:8]]
  assert multi[1]["example_ids"] == "\x00".join(first).encode()
  assert multi == single
  assert params_at(tmp_path / "multi") == params_at(tmp_path / "single")
  assert verify_lineage(tmp_path / "multi", trust_of(tmp_path / "multi")).closed


@pytest.mark.slow
def test_a_killed_process_stops_the_others_and_all_resume_to_the_same_lineage(
  tmp_path, authorities
):
  common = {"steps": 4, "batch": 8, "checkpoint_every": 2, "devices": 2, "heartbeat_s": 5}
  t = time.monotonic()
  results = finish(launch(2, tmp_path / "run", authorities, kill=[1, 3], **common))
  assert results[1][0] == 17
  assert results[0][0] != 0, "process 0 must stop when process 1 dies, not hang or close"
  assert time.monotonic() - t < 200
  # what process 0 wrote before it stopped is intact: steps 1-2 and the checkpoint at 2
  assert sorted(steps_of(tmp_path / "run")) == [1, 2]
  run_all(2, tmp_path / "run", authorities, mode="resume", **common)
  run_all(2, tmp_path / "straight", authorities, **common)
  assert steps_of(tmp_path / "run") == steps_of(tmp_path / "straight")
  report = verify_lineage(tmp_path / "run", trust_of(tmp_path / "run"))
  assert report.closed


@pytest.mark.slow
def test_processes_whose_replicas_diverge_stop_before_anything_is_recorded(tmp_path, authorities):
  results = finish(
    launch(2, tmp_path / "run", authorities, steps=2, batch=8, devices=1, diverge=True)
  )
  for rc, text in results:
    assert rc != 0
    assert "step 1: process(es) 1 computed a different record than process 0" in text
  assert steps_of(tmp_path / "run") == {}


# -- in this process --------------------------------------------------------------------------


def test_a_multi_process_run_before_jax_distributed_initialize_is_refused(tmp_path, authorities):
  docs = worker.documents(authorities.root)
  with pytest.raises(LineageError, match=r"jax.distributed.initialize\(\) has not been called"):
    GovernedRun.start(tmp_path / "run", task=worker.TASK, distributed=True, **docs)
  assert not (tmp_path / "run").exists()


def test_the_process_index_is_refused_in_a_launched_job_before_initialize(monkeypatch):
  monkeypatch.setenv("SLURM_NTASKS", "4")
  with pytest.raises(LineageError, match=r"one of 4 started by SLURM \(SLURM_NTASKS=4\)"):
    process_index()
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert process_index() == 0


def test_an_explicit_axis_mesh_records_what_an_auto_axis_mesh_records(tmp_path, authorities):
  docs = worker.documents(authorities.root)
  devices = np.asarray(jax.devices()[:4])
  bodies = {}
  for kind in (AxisType.Explicit, AxisType.Auto):
    run_dir = tmp_path / kind.name
    run = GovernedRun.start(
      run_dir,
      task=worker.TASK,
      task_config=worker.SMALL,
      run_id="same",
      key_dir=tmp_path / f"{kind.name}-key",
      mesh=Mesh(devices, ("data",), axis_types=(kind,)),
      **docs,
    )
    summary = run.step(sample.examples()[:8])
    assert isinstance(summary.weights, np.ndarray) and summary.weights.shape[0] == 8
    run.close()
    bodies[kind] = steps_of(run_dir)
  assert bodies[AxisType.Explicit] == bodies[AxisType.Auto]
  assert len(bodies[AxisType.Auto]) == 1


def test_a_manual_axis_mesh_is_refused_naming_it(tmp_path, authorities):
  mesh = Mesh(np.asarray(jax.devices()[:2]), ("data",), axis_types=(AxisType.Manual,))
  with pytest.raises(LineageError, match="Manual axes"):
    GovernedRun.start(
      tmp_path / "run", task=worker.TASK, mesh=mesh, **worker.documents(authorities.root)
    )
