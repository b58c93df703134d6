"""Forensic replay: recorded steps re-executed on recorded examples reproduce fingerprints and hashes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest
from click.testing import CliRunner

from aqgov.cli import main
from aqgov.errors import CheckpointError, LineageError, ReplayDivergence
from aqgov.examples.task import MLPTask
from aqgov.lineage import _history as hist
from aqgov.lineage import _record as rec
from aqgov.lineage import _segments as segments
from aqgov.lineage._checkpoint import Checkpoints
from aqgov.lineage._replay import replay
from aqgov.lineage._summary import params_sha256
from aqgov.lineage._task import TrainState

import lineage_helpers as lh


@pytest.fixture(scope="module")
def data_path(tmp_path_factory) -> Path:
  path = tmp_path_factory.mktemp("data") / "examples.jsonl"
  lh.examples_file(path)
  return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_path) -> Path:
  d = tmp_path_factory.mktemp("runs") / "run"
  lh.make_run(
    d, [json.loads(line) for line in data_path.read_text().splitlines()], 9, checkpoint_every=4
  )
  return d


def _checkpoint_sha(run_dir: Path, step: int) -> str:
  _, history = hist.load(run_dir / "lineage")
  return history.checkpoint_at(step).params_sha256


def test_replay_rebuilds_the_params_of_a_recorded_checkpoint_bit_for_bit(run_dir, data_path):
  result = replay(
    run_dir, step=8, examples=data_path, from_checkpoint=0, trust=lh.trust_of(run_dir), task=lh.TASK
  )
  assert (
    result.from_checkpoint == 0
    and result.steps_replayed == 8
    and result.hashes_checked == (0, 4, 8)
  )
  assert params_sha256(result.state.params) == _checkpoint_sha(run_dir, 8)


def test_replay_starts_from_the_nearest_checkpoint_and_reaches_steps_between_checkpoints(
  run_dir, data_path
):
  result = replay(run_dir, step=6, examples=data_path, trust=lh.trust_of(run_dir), task=lh.TASK)
  assert result.from_checkpoint == 4 and result.steps_replayed == 2 and int(result.state.step) == 6


def test_an_example_whose_bytes_changed_is_named(run_dir, data_path, tmp_path):
  view = next(
    rec.view_step(b)
    for _, _, b in segments.records(run_dir / "lineage", kinds=(rec.STEP,))
    if b["step"] == 6
  )
  victim = view.example_ids[3]
  records = [json.loads(line) for line in data_path.read_text().splitlines()]
  for r in records:
    if r["id"] == victim:
      r["content"] = r["content"].replace("]", ", 0.0]", 1)
  with pytest.raises(ReplayDivergence, match="not the bytes") as info:
    replay(run_dir, step=6, examples=records, trust=lh.trust_of(run_dir), task=lh.TASK)
  assert info.value.example_id == victim and info.value.step == 6


def test_a_missing_example_is_named(run_dir, data_path):
  view = next(
    rec.view_step(b)
    for _, _, b in segments.records(run_dir / "lineage", kinds=(rec.STEP,))
    if b["step"] == 5
  )
  records = [
    json.loads(line)
    for line in data_path.read_text().splitlines()
    if view.example_ids[0] not in line
  ]
  with pytest.raises(ReplayDivergence, match="not in the examples") as info:
    replay(run_dir, step=5, examples=records, trust=lh.trust_of(run_dir), task=lh.TASK)
  assert info.value.step == 5 and info.value.example_id == view.example_ids[0]


def test_a_different_step_function_is_named_at_the_first_step_and_group_that_diverge(
  run_dir, data_path
):
  # route 2 trained only "hidden"; giving it half a weight in "head" first changes "head", at the
  # first replayed step that has a route-2 example
  task = MLPTask({"routes": [[1.0, 1.0], [0.0, 1.0], [1.0, 0.5]]})
  views = [rec.view_step(b) for _, _, b in segments.records(run_dir / "lineage", kinds=(rec.STEP,))]
  first = next(v.step for v in views if v.step > 4 and (v.route_class == 2).any())
  with pytest.raises(ReplayDivergence, match="diverge") as info:
    replay(run_dir, step=9, examples=data_path, task=task, from_checkpoint=4)
  assert (info.value.step, info.value.group) == (first, "head")


class _MisreportingTask(MLPTask):
  """The example task, training exactly as recorded but reporting one summary field differently."""

  def __init__(self, field: str, change):
    super().__init__({})
    honest = self.step

    def step(state, batch, labels):
      state, summary = honest(state, batch, labels)
      return state, summary._replace(**{field: change(getattr(summary, field))})

    self.step = step


@pytest.mark.parametrize(
  "field, change",
  [
    ("route_class", lambda rc: (rc + 1) % 3),
    ("weights", lambda w: w * 0.5),
    ("contribution_norms", lambda n: n * 1.0001),
    ("events", lambda e: {"paused": jnp.ones((2,), jnp.int32)}),
  ],
)
def test_replay_compares_route_classes_weights_norms_and_events_with_the_record(
  run_dir, data_path, field, change
):
  # the params (and so every fingerprint) replay exactly; only the reported field differs
  with pytest.raises(ReplayDivergence, match=f"replayed {field}.* diverge from the record") as info:
    replay(run_dir, step=6, examples=data_path, task=_MisreportingTask(field, change))
  assert info.value.field.startswith(field) and info.value.step == 5


def test_a_checkpoint_whose_params_were_replaced_is_named_and_replay_re_derives_the_true_ones(
  run_dir, data_path, tmp_path
):
  d = tmp_path / "run"
  shutil.copytree(run_dir, d)
  store = Checkpoints(d / "checkpoints")
  restored = store.restore(4, MLPTask({}).init())
  store.close()
  forged = restored.state._replace(params=jax.tree.map(lambda x: x * 1.001, restored.state.params))
  shutil.rmtree(d / "checkpoints" / "4")
  manager = ocp.CheckpointManager(
    (d / "checkpoints").absolute(),
    item_names=("state", "lineage"),
    options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False),
  )
  manager.save(
    4,
    force=True,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(forged),
      lineage=ocp.args.JsonSave({"run_id": "x", "step": 4, **restored.head.to_wire()}),
    ),
  )
  manager.close()
  with pytest.raises(CheckpointError, match="step 4.*altered"):
    replay(d, step=6, examples=data_path, trust=lh.trust_of(d), task=lh.TASK)
  result = replay(
    d, step=4, examples=data_path, from_checkpoint=0, trust=lh.trust_of(d), task=lh.TASK
  )
  assert params_sha256(result.state.params) == _checkpoint_sha(d, 4) != params_sha256(forged.params)


def _rewrite_record(run_dir: Path, index: int, change) -> None:
  """Change one record's body and recompute the chain after it (what anyone can do without the key)."""
  seg = lh.segment_path(run_dir / "lineage")
  header, frames = lh.split_frames(seg.read_bytes())
  out, prev = frames[:index], rec.record_hash(lh.payload(frames[index - 1]))
  for i in range(index, len(frames)):
    r = rec.decode_record(lh.payload(frames[i]), i)
    body = rec.decode_body(r.body_bytes)
    if i == index:
      change(body)
    data = rec.encode_record(i, r.kind, prev, body)
    out.append(segments.frame(data))
    prev = rec.record_hash(data)
  seg.write_bytes(header + b"".join(out))


def test_a_rewritten_checkpoint_record_is_not_read_and_fails_verification(
  run_dir, data_path, tmp_path
):
  d = tmp_path / "run"
  shutil.copytree(run_dir, d)
  ref = hist.load(d / "lineage")[1].checkpoint_at(8)
  _rewrite_record(d, ref.index, lambda body: body.update(params_sha256="0" * 64))
  shutil.rmtree(d / "checkpoints" / "8")
  # no signed head covers the rewritten chain any more: replay reads only up to the last one that does,
  # so the forged hash is never compared with (nor taken for) the params of step 8
  assert hist.load(d / "lineage")[1].size <= ref.index
  result = replay(
    d, step=8, examples=data_path, task=MLPTask({})
  )  # code the caller chose: no verification first
  assert 8 not in result.hashes_checked and params_sha256(result.state.params) == _checkpoint_sha(
    run_dir, 8
  )
  with pytest.raises(LineageError):
    replay(d, step=8, examples=data_path, trust=lh.trust_of(d), task=lh.TASK)


def test_the_cli_replays_and_names_a_divergence(run_dir, data_path, tmp_path):
  ok = CliRunner().invoke(
    main,
    [
      "lineage",
      "replay",
      str(run_dir),
      "--step",
      "9",
      "--data",
      str(data_path),
      "--from",
      "5",
      "--run-key",
      str(run_dir / "keys" / "run.pub"),
      "--task",
      lh.TASK,
    ],
  )
  assert ok.exit_code == 0, ok.output
  assert (
    "steps 5..9" in ok.output
    and "every fingerprint matches" in ok.output
    and "step(s) 4, 8, 9" in ok.output
  )
  bad = tmp_path / "bad.jsonl"
  lines = data_path.read_text().splitlines()
  bad.write_text("\n".join(lines[1:]) + "\n")
  out = CliRunner().invoke(
    main,
    [
      "lineage",
      "replay",
      str(run_dir),
      "--step",
      "9",
      "--data",
      str(bad),
      "--from",
      "0",
      "--run-key",
      str(run_dir / "keys" / "run.pub"),
      "--task",
      lh.TASK,
    ],
  )
  assert out.exit_code == 1 and "ReplayDivergence" in out.output


_KILLED_SAVER = """
import sys
import jax.numpy as jnp
from aqgov.lineage._checkpoint import Checkpoints
from aqgov.lineage._heads import LogHead
from aqgov.lineage._task import TrainState
store = Checkpoints(sys.argv[1], max_to_keep=2)
for step in range(1000):
  state = TrainState(jnp.int32(step), {"w": jnp.full((2048, 2048), 1.0 + step, jnp.float32)}, (), ())
  store.save(state, LogHead(step, bytes(32), bytes(32)), "r")
  print(step, flush=True)
"""


@pytest.mark.slow
def test_a_checkpoint_interrupted_mid_write_is_never_listed(tmp_path):
  directory = tmp_path / "checkpoints"
  proc = subprocess.Popen(
    [sys.executable, "-c", _KILLED_SAVER, str(directory)], stdout=subprocess.PIPE, text=True
  )
  try:
    assert int(proc.stdout.readline()) == 0
    deadline = time.time() + 60
    while time.time() < deadline and not any("tmp" in p.name for p in directory.iterdir()):
      time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    assert time.time() < deadline, "never saw a checkpoint being written"
  finally:
    proc.wait()
  printed = [int(line) for line in proc.stdout.read().split()]
  last = printed[-1] if printed else 0
  store = Checkpoints(directory)
  steps = store.steps()
  assert steps and max(steps) in (last, last + 1)  # the save being killed is not listed
  assert not any("tmp" in p.name for p in directory.iterdir())
  template = TrainState(jnp.int32(0), {"w": jnp.zeros((2048, 2048), jnp.float32)}, (), ())
  restored = store.restore(max(steps), template)
  assert float(restored.state.params["w"][0, 0]) == 1.0 + max(steps)
  store.close()


def test_replay_and_verify_report_their_progress_to_the_end(run_dir, data_path):
  from aqgov.lineage import verify_lineage

  replayed, verified = [], []
  replay(
    run_dir,
    step=7,
    examples=data_path,
    trust=lh.trust_of(run_dir),
    task=lh.TASK,
    progress=lambda done, total: replayed.append((done, total)),
  )
  report = verify_lineage(
    run_dir, lh.trust_of(run_dir), progress=lambda done, total: verified.append((done, total))
  )
  assert replayed == [(0, 3), (1, 3), (2, 3), (3, 3)]
  assert verified[-1] == (report.size, report.signed_size)


def test_a_progress_bar_draws_on_a_terminal_and_stays_silent_elsewhere():
  import io

  from rich.console import Console

  from aqgov.lineage import progress_bar

  drawn, silent = io.StringIO(), io.StringIO()
  for out, terminal in ((drawn, True), (silent, False)):
    with progress_bar("replaying steps", Console(file=out, force_terminal=terminal)) as progress:
      for done in range(4):
        progress(done, 3)
  assert "replaying steps" in drawn.getvalue() and silent.getvalue() == ""
