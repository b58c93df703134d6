"""Everything an auditor relies on is bound to the signed log: run-end, unsigned tails, checkpoints, one writer."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import orbax.checkpoint as ocp
import pytest
from click.testing import CliRunner

from aqgov.cli import main
from aqgov.documents import _keys as keys
from aqgov.errors import CheckpointError, LineageError
from aqgov.examples.task import MLPTask
from aqgov.lineage import _bodies as bodies
from aqgov.lineage import _history as hist
from aqgov.lineage import _record as rec
from aqgov.lineage import _segments as segments
from aqgov.lineage._checkpoint import Checkpoints, state_digests
from aqgov.lineage._checkpoint_files import files_sha256, read_lineage_item
from aqgov.lineage._export import export_intoto, statement
from aqgov.lineage._heads import read_heads
from aqgov.lineage._query import describe, membership
from aqgov.lineage._run import GovernedRun
from aqgov.lineage._scan import scan
from aqgov.lineage._verify import verify_lineage
from aqgov.lineage._writer import open_for_resume

import lineage_helpers as lh


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return lh.examples_file(tmp_path_factory.mktemp("data") / "examples.jsonl", n=16)


@pytest.fixture(scope="module")
def closed(tmp_path_factory, data) -> Path:
  d = tmp_path_factory.mktemp("bound") / "closed"
  lh.make_run(d, data, 6, checkpoint_every=3)
  return d


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, data) -> Path:
  """A run stopped without run-end: every record signed (abandon signs a head), resumable."""
  d = tmp_path_factory.mktemp("bound") / "stopped"
  lh.make_run(d, data, 6, checkpoint_every=3, close=False).abandon()
  return d


def _copy(src: Path, tmp_path: Path) -> Path:
  d = tmp_path / src.name
  shutil.copytree(src, d)
  return d


def _run_key(run_dir: Path) -> keys.SigningKey:
  return lh.run_key(run_dir)  # the operator's key directory: a run directory holds no private key


def _append_unsigned(run_dir: Path, kind: str, body: dict) -> int:
  """Append a well-formed record without any key (what anyone with write access can do); its seq."""
  ldir = run_dir / "lineage"
  log = scan(ldir)
  seg = sorted((ldir / "segments").glob("*.seg"))[-1]
  with seg.open("ab") as fh:
    fh.write(segments.frame(rec.encode_record(log.size, kind, log.record_hash(log.size - 1), body)))
  return log.size


def _supersede_everything(run_dir: Path) -> int:
  end = scan(run_dir / "lineage").size
  return _append_unsigned(
    run_dir,
    rec.RUN_RESUME,
    bodies.resume_body(checkpoint_step=0, checkpoint_record=None, superseded=(1, end)),
  )


def _rewrite_checkpoint(run_dir: Path, step: int, change) -> None:
  """Replace checkpoint `step` on disk with `change(state)`, keeping its lineage item (digests included)."""
  path = run_dir / "checkpoints" / str(step)
  item = read_lineage_item(path)
  store = Checkpoints(run_dir / "checkpoints")
  state = store.restore(step, MLPTask({}).init()).state
  store.close()
  shutil.rmtree(path)
  manager = ocp.CheckpointManager(
    (run_dir / "checkpoints").absolute(),
    item_names=("state", "lineage"),
    options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False),
  )
  manager.save(
    step,
    force=True,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(change(state)), lineage=ocp.args.JsonSave(item)
    ),
  )
  manager.close()


def _checkpoint_record(run_dir: Path, step: int) -> int:
  return hist.load(run_dir / "lineage")[1].checkpoint_at(step).index


# ---- 1. a signed run-end is final; an unsigned tail is never read -----------------------------------------------


def test_a_record_appended_after_a_signed_run_end_fails_verification(closed, tmp_path):
  d = _copy(closed, tmp_path)
  rows = membership(d, "head")
  forged = _supersede_everything(d)
  for require_closed in (True, False):
    with pytest.raises(LineageError, match="follows the signed run-end") as info:
      verify_lineage(d, lh.trust_of(d), require_closed=require_closed)
    assert info.value.index == forged
  assert membership(d, "head") == rows  # the forged resume supersedes nothing a query reads
  with pytest.raises(LineageError, match="follows the signed run-end"):
    export_intoto(d, _run_key(d))


def test_an_unsigned_tail_is_reported_by_verify_and_never_read_by_query_show_or_export(
  stopped, tmp_path
):
  d = _copy(stopped, tmp_path)
  key = _run_key(d)
  rows, before = membership(d, "head"), describe(d)
  subjects = statement(d, verify_lineage(d, lh.trust_of(d), require_closed=False))["subject"]
  assert len(rows) > 0 and len(subjects) == 3
  _supersede_everything(d)
  report = verify_lineage(d, lh.trust_of(d), require_closed=False)
  assert report.unsigned == 1 and report.signed_size == report.size - 1
  assert membership(d, "head") == rows and membership(d, "head", include_superseded=True) == rows
  after = describe(d)
  assert (after.steps, after.resumes, after.checkpoints, after.unsigned) == (
    before.steps,
    0,
    before.checkpoints,
    1,
  )
  attested = verify_envelope_statement(export_intoto(d, key), key)
  assert attested["subject"] == subjects and attested["predicate"]["size"] == report.signed_size


def verify_envelope_statement(envelope: dict, key: keys.SigningKey) -> dict:
  from aqgov.lineage._export import verify_envelope

  return verify_envelope(envelope, keys.TrustStore.of([key]))


def test_a_closed_run_cannot_be_resumed(closed, tmp_path):
  d = _copy(closed, tmp_path)
  with pytest.raises(LineageError, match="closed run is final"):
    GovernedRun.resume(d)
  assert verify_lineage(d, lh.trust_of(d)).closed


# ---- 2. checkpoints commit to params, optimizer and governance state -----------------------------------------


def test_checkpoint_records_and_orbax_metadata_carry_a_digest_per_state_item_and_of_the_files(
  closed,
):
  _, history = hist.load(closed / "lineage")
  store = Checkpoints(closed / "checkpoints")
  try:
    for ref in history.checkpoints:
      restored = store.restore(ref.step, MLPTask({}).init())
      assert ref.digests == state_digests(restored.state) == restored.recorded
      assert (
        set(ref.digests) == {"params", "opt_state", "governance"}
        and ref.params_sha256 == ref.digests["params"]
      )
      assert ref.files_sha256 == files_sha256(closed / ref.path)
  finally:
    store.close()
  report = verify_lineage(closed, lh.trust_of(closed))
  assert sum(c.startswith("checkpoint at step") for c in report.checked) == len(history.checkpoints)


def _scaled_optimizer(state):
  return state._replace(opt_state=jax.tree.map(lambda x: x * 1000, state.opt_state))


def test_an_altered_optimizer_state_fails_verification_and_resume(stopped, tmp_path):
  d = _copy(stopped, tmp_path)
  _rewrite_checkpoint(d, 6, _scaled_optimizer)
  with pytest.raises(LineageError, match="checkpoint at step 6 .* altered or replaced") as info:
    verify_lineage(d, lh.trust_of(d), require_closed=False)
  assert info.value.index == _checkpoint_record(d, 6)
  with pytest.raises(CheckpointError, match="step 6 .* holds opt_state .* altered"):
    GovernedRun.resume(d)


def test_export_hashes_the_checkpoints_on_disk_and_refuses_altered_params(closed, tmp_path):
  d = _copy(closed, tmp_path)
  _rewrite_checkpoint(d, 3, lambda s: s._replace(params=jax.tree.map(lambda x: x + 1e-3, s.params)))
  with pytest.raises(LineageError, match="checkpoint at step 3 .* altered or replaced"):
    verify_lineage(d, lh.trust_of(d))
  with pytest.raises(
    LineageError, match="checkpoint at step 3 .* holds params .* refusing to attest"
  ) as info:
    statement(d, verify_lineage(d, lh.trust_of(d), check_checkpoints=False))
  assert info.value.index == _checkpoint_record(d, 3)
  with pytest.raises(LineageError):
    export_intoto(d, _run_key(d))


def test_a_checkpoint_from_another_log_position_is_named(closed, tmp_path):
  d = _copy(closed, tmp_path)
  target, other = d / "checkpoints" / "3", d / "checkpoints" / "6"
  shutil.rmtree(target)
  shutil.copytree(other, target)  # a real checkpoint of this run, in the wrong place
  with pytest.raises(LineageError, match="checkpoint at step 3") as info:
    verify_lineage(d, lh.trust_of(d))
  assert info.value.index == _checkpoint_record(d, 3)


# ---- 3. the default verify is the auditor's -----------------------------------------------------------------


def _roll_back(run_dir: Path, head: int) -> int:
  """Cut the log and its heads file back to signed head `head` (no key needed); the size kept."""
  ldir = run_dir / "lineage"
  heads, _ = read_heads(ldir)
  size = int(heads[head].payload["size"])
  header, head_frames = lh.split_frames((ldir / "heads.seg").read_bytes())
  (ldir / "heads.seg").write_bytes(header + b"".join(head_frames[: head + 1]))
  seg = lh.segment_path(ldir)
  header, frames = lh.split_frames(seg.read_bytes())
  seg.write_bytes(header + b"".join(frames[:size]))
  return size


def test_a_log_rolled_back_to_an_earlier_signed_head_fails_the_default_verify(closed, tmp_path):
  d = _copy(closed, tmp_path)
  size = _roll_back(d, 2)
  with pytest.raises(LineageError, match="not closed") as info:
    verify_lineage(d, lh.trust_of(d))
  assert info.value.index == size
  live = verify_lineage(d, lh.trust_of(d), require_closed=False)
  assert live.size == size and not live.closed and live.unsigned == 0
  runner, pub = CliRunner(), str(d / "keys" / "run.pub")
  out = runner.invoke(main, ["lineage", "verify", str(d), "--trust", pub])
  assert out.exit_code == 1 and "not closed" in out.output and "--allow-open" in out.output
  out = runner.invoke(main, ["lineage", "verify", str(d), "--trust", pub, "--allow-open"])
  assert out.exit_code == 0 and "open, 0 unsigned record(s)" in out.output, out.output


def test_a_missing_checkpoint_fails_the_default_verify_and_is_listed_with_allow_missing(
  closed, tmp_path
):
  d = _copy(closed, tmp_path)
  shutil.rmtree(d / "checkpoints" / "3")
  with pytest.raises(LineageError, match="checkpoint at step 3 .* not present"):
    verify_lineage(d, lh.trust_of(d))
  report = verify_lineage(d, lh.trust_of(d), require_references=False)
  assert any("checkpoint at step 3" in u for u in report.unchecked)
  out = CliRunner().invoke(
    main, ["lineage", "verify", str(d), "--trust", str(d / "keys" / "run.pub"), "--allow-missing"]
  )
  assert out.exit_code == 0 and "not checked: checkpoint at step 3" in out.output, out.output


# ---- 4. one writer per run directory --------------------------------------------------------------------------

_HOLDER = textwrap.dedent("""
  import sys, time
  from aqgov.documents import _keys as keys
  from aqgov.lineage._writer import open_for_resume
  writer, _ = open_for_resume(sys.argv[1], keys.load_signing_key(sys.argv[2]))
  print("holding", flush=True)
  time.sleep(600)
""")


def test_a_second_writer_is_refused_in_this_process_and_from_another(stopped, tmp_path, data):
  d = _copy(stopped, tmp_path)
  run = GovernedRun.resume(d)
  with pytest.raises(LineageError, match="already open for writing"):
    GovernedRun.resume(d)
  run.step(lh.batches(data, run.next_step))
  run.abandon()  # releases the lock
  proc = subprocess.Popen(
    [sys.executable, "-c", _HOLDER, str(d / "lineage"), str(lh.run_key_path(d))],
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert proc.stdout.readline().strip() == "holding"
    with pytest.raises(LineageError, match="already open for writing"):
      open_for_resume(d / "lineage", _run_key(d))
  finally:
    proc.kill()  # a crashed writer: the lock dies with its process
    proc.wait()
  resumed = GovernedRun.resume(d)
  resumed.close()
  assert verify_lineage(d, lh.trust_of(d)).closed
