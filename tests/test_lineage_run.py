"""Governed runs: run directory, checkpoints bound to the lineage, resume, escalation, references, parents."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from aqgov.documents import _keys as keys
from aqgov.documents import _signing as signing
from aqgov.documents._document_type import sign
from aqgov.documents._keys import TrustStore
from aqgov.entropy._overrides import OVERRIDE, Override
from aqgov.errors import CheckpointError, GovernanceEscalation, LineageError, SignatureError
from aqgov.examples.task import MLPTask
from aqgov.lineage import _history as hist
from aqgov.lineage import _record as rec
from aqgov.lineage import _segments as segments
from aqgov.lineage._checkpoint import Checkpoints
from aqgov.lineage._heads import LogHead
from aqgov.lineage._query import describe, membership
from aqgov.lineage._run import GovernedRun
from aqgov.lineage._summary import params_sha256
from aqgov.lineage._verify import verify_lineage

import lineage_helpers as lh

AUTHORITY = keys.generate("authority")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return lh.examples_file(tmp_path_factory.mktemp("data") / "examples.jsonl")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data) -> Path:
  d = tmp_path_factory.mktemp("runs") / "finished"
  lh.make_run(d, data, 10, checkpoint_every=4)
  return d


def _steps(run_dir: Path) -> list[tuple[int, int]]:
  return [(i, b["step"]) for i, _, b in segments.records(run_dir / "lineage", kinds=(rec.STEP,))]


def test_a_governed_run_leaves_a_closed_verifiable_run_directory(finished):
  report = verify_lineage(finished, lh.trust_of(finished))
  assert report.closed and report.unsigned == 0
  assert all(
    (finished / d).is_dir()
    for d in ("keys", "policies", "profiles", "manifests", "lineage", "checkpoints")
  )
  assert [s for _, s in _steps(finished)] == list(range(1, 11))
  d = describe(finished)
  assert (
    [c.step for c in d.checkpoints] == [0, 4, 8, 10]
    and d.status == "completed"
    and d.examples == 48
  )


def test_checkpoint_records_carry_the_full_params_hash_of_what_was_saved(finished):
  _, history = hist.load(finished / "lineage")
  store = Checkpoints(finished / "checkpoints")
  template = MLPTask({}).init()
  for ref in history.checkpoints:
    restored = store.restore(ref.step, template)
    assert restored.params_sha256 == ref.params_sha256 and restored.head.size == ref.index
    assert int(restored.state.step) == ref.step
  store.close()


def test_checkpoints_round_trip_params_optimizer_and_governance_state(tmp_path):
  task = MLPTask({})
  state = task.init()._replace(
    governance={"reroute": jnp.arange(3), "key": jax.random.key_data(jax.random.key(1))}
  )
  head = LogHead(7, bytes(range(32)), bytes(32))
  store = Checkpoints(tmp_path / "checkpoints")
  store.save(state, head, "run-x")
  restored = store.restore(0, state)
  assert restored.head == head and restored.run_id == "run-x"
  assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), restored.state, state))
  with pytest.raises(CheckpointError, match="already exists"):
    store.save(state, head, "run-x")
  store.close()


def test_queries_name_the_examples_that_reached_a_group(finished):
  rows = membership(finished, "head", step=3)
  view = next(
    rec.view_step(b)
    for _, _, b in segments.records(finished / "lineage", kinds=(rec.STEP,))
    if b["step"] == 3
  )
  expected = [view.row_ids[r] for r in range(len(view.row_ids)) if view.weights[r, 1] > 0]
  assert [m.example_id for m in rows] == expected and all(
    m.weight > 0 and m.step == 3 for m in rows
  )
  with pytest.raises(LineageError, match="not one of this run's groups"):
    membership(finished, "nonexistent")


def test_resume_after_a_crash_supersedes_lost_steps_and_continues_the_chain(tmp_path, data):
  d = tmp_path / "run"
  run = lh.make_run(d, data, 7, checkpoint_every=3, close=False)
  run.head()  # wait for the writer: step 7 is on disk
  lost = {s: i for i, s in _steps(d)}[7]
  run.abandon()  # the process stops here: step 7 was recorded, but its params were never checkpointed
  resumed = GovernedRun.resume(d)
  assert resumed.next_step == 7
  for s in range(7, 11):
    resumed.step(lh.batches(data, s))
  resumed.close()
  report = verify_lineage(d, lh.trust_of(d))
  scan, history = hist.load(d / "lineage")
  assert report.closed and history.superseded == ((lost, lost + 1),)
  effective = [s for i, s in _steps(d) if history.effective(i)]
  assert effective == list(range(1, 11))
  old, new = [
    rec.view_step(b)
    for i, _, b in segments.records(d / "lineage", kinds=(rec.STEP,))
    if b["step"] == 7
  ]
  np.testing.assert_array_equal(
    old.fingerprint, new.fingerprint
  )  # the lost step, redone, is bitwise the same
  reached = membership(d, "head", step=7)
  assert len(membership(d, "head", step=7, include_superseded=True)) == 2 * len(reached)
  assert not any(m.superseded for m in reached)


def test_resume_refuses_a_checkpoint_whose_params_were_altered(tmp_path, data):
  d = tmp_path / "run"
  lh.make_run(d, data, 5, checkpoint_every=4, close=False).abandon()
  store = Checkpoints(d / "checkpoints")
  restored = store.restore(4, MLPTask({}).init())
  store.close()
  forged = restored.state._replace(params=jax.tree.map(lambda x: x + 1e-3, restored.state.params))
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
    GovernedRun.resume(d)


class _EscalatingTask(MLPTask):
  """The example task, stopping for a human before the step named by `escalate_at`."""

  def __init__(self, config):
    super().__init__(config)
    jitted = self.step

    def step(state, batch, labels):
      if int(state.step) + 1 == int(self.config["escalate_at"]):
        raise GovernanceEscalation(
          "entropy of 'head' fell below 0.1",
          step=int(state.step) + 1,
          events={"group": "head", "value": np.float32(0.05)},
        )
      return jitted(state, batch, labels)

    self.step = step


def make_escalating_task(config, run_dir):
  return _EscalatingTask(config)


def test_an_escalation_is_checkpointed_recorded_and_resumable(tmp_path, data):
  d = tmp_path / "run"
  run = GovernedRun.start(
    d,
    task="test_lineage_run:make_escalating_task",
    task_config={"escalate_at": 3},
    checkpoint_every=10,
  )
  run.step(lh.batches(data, 1))
  run.step(lh.batches(data, 2))
  with pytest.raises(GovernanceEscalation):
    run.step(lh.batches(data, 3))
  run.abandon()  # stopped for a human, not closed: a closed run is final
  scan, _ = hist.load(d / "lineage")
  assert list(scan.kinds) == [
    rec.RUN_START,
    rec.CHECKPOINT,
    rec.STEP,
    rec.STEP,
    rec.CHECKPOINT,
    rec.ESCALATION,
  ]
  esc = next(b for i, _, b in segments.records(d / "lineage", kinds=(rec.ESCALATION,)))
  assert esc["step"] == 3 and esc["checkpoint_step"] == 2 and "entropy" in esc["message"]
  assert verify_lineage(d, lh.trust_of(d), require_closed=False).unsigned == 0
  resumed = GovernedRun.resume(d)
  assert resumed.next_step == 3
  resumed.abandon()


def _policy(name: str, key: keys.SigningKey) -> signing.SignedDocument:
  return signing.add_signature(
    signing.SignedDocument("routing-policy", {"name": name, "rules": []}), key
  )


def test_policies_and_manifests_named_at_start_are_copied_and_verified(tmp_path, data):
  d = tmp_path / "run"
  manifest = signing.add_signature(
    signing.SignedDocument("credential-manifest", {"authority": "authority", "entries": []}),
    AUTHORITY,
  )
  lh.make_run(
    d, data, 1, policies=[_policy("p", AUTHORITY)], manifests=[manifest], trust=[AUTHORITY.public]
  )
  report = verify_lineage(d, lh.trust_of(d))
  assert (
    len([c for c in report.checked if not c.startswith("checkpoint")]) == 2 and not report.unchecked
  )
  start = next(iter(segments.LogReader(d / "lineage"))).body
  assert start["manifests"][0]["id"] == manifest.id and start["trust"] == [AUTHORITY.key_id]


def test_an_altered_or_missing_referenced_document_is_reported(tmp_path, data):
  d = tmp_path / "run"
  lh.make_run(d, data, 1, policies=[_policy("p", AUTHORITY)], trust=[AUTHORITY.public])
  policy_file = next((d / "policies").iterdir())
  original = policy_file.read_bytes()
  policy_file.write_bytes(_policy("other", AUTHORITY).to_bytes())
  with pytest.raises(LineageError, match="SHA-256") as info:
    verify_lineage(d, lh.trust_of(d))
  assert info.value.index == 0
  policy_file.unlink()
  assert verify_lineage(d, lh.trust_of(d), require_references=False).unchecked
  with pytest.raises(LineageError, match="missing"):
    verify_lineage(d, lh.trust_of(d))
  policy_file.write_bytes(original)
  assert verify_lineage(d, lh.trust_of(d), require_references=True).checked


def _token(
  run_id: str, steps: str = "3", key: keys.SigningKey = AUTHORITY, **times
) -> signing.SignedDocument:
  now = dt.datetime.now(dt.UTC)
  times = {"expires": now + dt.timedelta(hours=1), **times}
  return sign(
    OVERRIDE,
    Override.create(
      run=run_id,
      steps=steps,
      groups="head",
      metrics="gradient_entropy",
      reason="head bound is a test threshold",
      **times,
    ),
    key,
  )


def test_override_tokens_are_kept_verbatim_and_must_verify(tmp_path, data):
  d = tmp_path / "run"
  run = lh.make_run(d, data, 2, close=False, trust=[AUTHORITY.public])
  token = _token(run.run_id)
  run.record_override(token)
  run.close()
  assert verify_lineage(d, lh.trust_of(d)).closed
  with pytest.raises(LineageError, match="override token") as info:
    verify_lineage(d, TrustStore.of([keys.load_public_key(d / "keys" / "run.pub")]))
  assert info.value.index == next(
    i for i, k, _ in segments.records(d / "lineage") if k == rec.OVERRIDE
  )


def test_a_child_run_names_its_parents_signed_head_and_verify_follows_the_chain(
  tmp_path, finished, data
):
  parent = tmp_path / "pretrain"
  shutil.copytree(finished, parent)
  child = tmp_path / "finetune"
  lh.make_run(child, data, 2, parent=parent)
  report = verify_lineage(child, lh.trust_of(child))
  assert report.parent is not None and report.parent.run_id == describe(parent).run_id
  assert any("parent run" in c for c in report.checked)
  moved = tmp_path / "elsewhere"
  parent.rename(moved)
  assert any(
    "parent run" in u
    for u in verify_lineage(child, lh.trust_of(child), require_references=False).unchecked
  )
  assert (
    verify_lineage(child, lh.trust_of(child), parent_dirs={report.parent.run_id: moved}).parent
    is not None
  )


def test_a_parent_directory_holding_another_run_is_refused(tmp_path, finished, data):
  parent = tmp_path / "pretrain"
  shutil.copytree(finished, parent)
  child = tmp_path / "finetune"
  lh.make_run(child, data, 1, parent=parent)
  other = tmp_path / "other"
  lh.make_run(other, data, 1)
  shutil.rmtree(parent / "lineage")
  shutil.copytree(other / "lineage", parent / "lineage")
  with pytest.raises(LineageError, match="parent run"):
    verify_lineage(child, lh.trust_of(child, other))


def test_starting_a_run_in_a_used_directory_is_refused(finished):
  with pytest.raises(LineageError, match="not empty"):
    GovernedRun.start(finished, task=lh.TASK)


def test_the_final_params_hash_matches_the_last_checkpoint_record(finished):
  _, history = hist.load(finished / "lineage")
  store = Checkpoints(finished / "checkpoints")
  last = history.checkpoints[-1]
  assert (
    params_sha256(store.restore(last.step, MLPTask({}).init()).state.params) == last.params_sha256
  )
  store.close()


def test_resume_with_no_recorded_checkpoint_on_disk_restarts_from_the_initial_state(tmp_path, data):
  d = tmp_path / "run"
  lh.make_run(d, data, 3, checkpoint_every=10, close=False).abandon()
  shutil.rmtree(d / "checkpoints" / "0")
  resumed = GovernedRun.resume(d)
  assert resumed.next_step == 1
  for s in range(1, 4):
    resumed.step(lh.batches(data, s))
  resumed.close()
  assert verify_lineage(d, lh.trust_of(d)).closed
  scan, history = hist.load(d / "lineage")
  assert history.superseded == ((1, 5),) and [c.step for c in history.checkpoints] == [0, 3]
  old, new = (
    [s for i, s in _steps(d) if not history.effective(i)],
    [s for i, s in _steps(d) if history.effective(i)],
  )
  assert old == new == [1, 2, 3]


def test_the_run_key_is_recorded_in_the_run_role_and_cannot_sign_documents(tmp_path, data):
  from aqgov.documents._document_type import verify
  from aqgov.policy._policy import POLICY, Policy

  d = tmp_path / "run"
  lh.make_run(d, data, 1, trust=[AUTHORITY.public])
  run_pub = keys.load_public_key(d / "keys" / "run.pub")
  assert run_pub.roles == ("run",)
  policy = Policy("p", {"all": ["**"]}, default={"all": 1.0})
  trust = keys.TrustStore.from_paths(sorted((d / "keys").glob("*.pub")))
  with pytest.raises(SignatureError, match="only authority or governance keys"):
    verify(
      POLICY,
      signing.add_signature(
        signing.SignedDocument("routing-policy", policy.to_dict()), lh.run_key(d)
      ),
      trust,
    )
  assert (
    verify(
      POLICY,
      signing.add_signature(signing.SignedDocument("routing-policy", policy.to_dict()), AUTHORITY),
      trust,
    )
    == policy
  )
