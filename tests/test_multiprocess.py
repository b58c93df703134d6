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
import multiprocess_worker as worker
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh

from aqgov.documents._keys import TrustStore
from aqgov.errors import LineageError
from aqgov.examples import sample
from aqgov.examples.demo import create_authorities
from aqgov.lineage import GovernedRun, LogReader, process_index, verify_lineage
from aqgov.lineage import _record as rec

WORKER = Path(__file__).with_name("multiprocess_worker.py")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def authorities(tmp_path_factory):
  return create_authorities(tmp_path_factory.mktemp("authorities"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """A compilation cache the workers of this module share (runs of one layout compile once)."""
  return str(tmp_path_factory.mktemp("jax-cache"))


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
      [sys.executable, "-u", str(WORKER), json.dumps({**base, "process": i})],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(processes)
  ]


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
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
# fields a step computes per example, without summing over the batch: the same bits whatever the
# device layout; the others (loss, fingerprint, measurements, events) sum over the batch across
# devices, and a cross-process all-reduce may add its terms in another order than one process
PER_EXAMPLE = ("example_ids", "example_sha256", "route_class", "weights", "rows", "hidden")


def assert_same_record(multi: dict, single: dict, bitwise: bool) -> None:
  assert sorted(multi) == sorted(single)
  for step in multi:
    if bitwise:
      assert multi[step] == single[step], f"step {step}"
      continue
    for field in set(multi[step]) | set(single[step]):
      a, b = multi[step].get(field), single[step].get(field)
      if field in PER_EXAMPLE or step == 1 and field == "contribution_norms":
        assert a == b, f"step {step}: {field}"
      else:
        np.testing.assert_allclose(numbers(a), numbers(b), rtol=2e-5, atol=1e-6, err_msg=field)


def numbers(value) -> np.ndarray:
  """Every number in a decoded body field, flattened in key order (wire arrays decoded)."""
  if isinstance(value, dict) and {"data", "dtype", "shape"} <= set(value):
    return np.frombuffer(value["data"], value["dtype"]).astype(np.float64).ravel()
  if isinstance(value, dict):
    parts = [numbers(value[k]) for k in sorted(value)]
    return np.concatenate(parts) if parts else np.zeros(0)
  return np.asarray([value], np.float64)


@pytest.mark.slow
@pytest.mark.parametrize(("processes", "mesh"), [(2, "explicit"), (4, "auto")])
def test_a_run_over_processes_records_the_lineage_of_one_process(
  tmp_path, authorities, cache, processes, mesh
):
  """One device per process; the reference runs alone on as many devices. With two processes the
  records are bitwise equal (an all-reduce of two terms has one order); with four, the
  per-example fields are, and the batch sums agree to float32 rounding."""
  common = {"steps": STEPS, "batch": 8, "checkpoint_every": 2, "devices": 1, "cache": cache}
  if processes == 4:  # four processes compiling at once on a small machine: keep the step small
    common.update(steps=2, profile=False)
  run_all(processes, tmp_path / "multi", authorities, mesh=mesh, **common)
  run_all(1, tmp_path / "single", authorities, **{**common, "devices": processes})
  multi, single = steps_of(tmp_path / "multi"), steps_of(tmp_path / "single")
  assert sorted(multi) == list(range(1, common["steps"] + 1))
  # ids in global batch order: process 0's shard first, then process 1's, ...
  first = [e.id for e in sample.examples()[:8]]
  assert multi[1]["example_ids"] == "\x00".join(first).encode()
  assert_same_record(multi, single, bitwise=processes == 2)
  if processes == 2:
    assert params_at(tmp_path / "multi") == params_at(tmp_path / "single")
  assert verify_lineage(tmp_path / "multi", trust_of(tmp_path / "multi")).closed


@pytest.mark.slow
def test_a_killed_process_stops_the_others_and_all_resume_to_the_same_lineage(
  tmp_path, authorities, cache
):
  common = {"steps": 4, "batch": 8, "checkpoint_every": 2, "devices": 1, "heartbeat_s": 5}
  common["cache"] = cache
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
def test_processes_whose_replicas_diverge_stop_before_anything_is_recorded(
  tmp_path, authorities, cache
):
  results = finish(
    launch(2, tmp_path / "run", authorities, steps=2, batch=8, devices=1, diverge=True, cache=cache)
  )
  for rc, text in results:
    assert rc != 0
    assert "step 1: process(es) 1 computed a different record than process 0" in text
  assert steps_of(tmp_path / "run") == {}


@pytest.mark.slow
def test_a_refusal_on_one_process_stops_every_process_naming_the_counts(
  tmp_path, authorities, cache
):
  results = finish(
    launch(2, tmp_path / "run", authorities, steps=2, devices=1, refuse=[1, 2], cache=cache)
  )
  for rc, text in results:
    assert rc != 0
    assert "the processes admitted [4, 3] examples this step" in text
  assert sorted(steps_of(tmp_path / "run")) == [1]


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


@pytest.mark.slow
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


def test_the_summary_gather_moves_every_bit_of_each_sharded_array():
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from aqgov.lineage._distributed import _pack, _unpack

  rows = NamedSharding(Mesh(np.asarray(jax.devices()[:4]), ("data",)), P("data"))
  rng = np.random.default_rng(0)
  parts = [
    rng.standard_normal((8, 3)).astype(np.float32),
    np.asarray([np.nan, -0.0, np.inf, 1e-45] * 2, np.float32),
    rng.integers(-5, 5, 8).astype(np.int32),
    rng.random((8, 2, 2)) > 0.5,
    rng.standard_normal((8,)).astype(jax.numpy.bfloat16),
  ]
  on_devices = [jax.device_put(p, rows) for p in parts]
  for sent, got in zip(parts, _unpack(np.asarray(_pack(on_devices)), on_devices), strict=True):
    assert (got.dtype, got.shape, got.tobytes()) == (sent.dtype, sent.shape, sent.tobytes())
