"""A loop its user owns, recorded: a Flax NNX model, an optax chain with strict routing, a hand-written
jitted step, and `GovernedRun.open` / `record` / `emit` leaving a signed lineage that verifies; and
admission inside a run, where a refused example is left out of its step and listed in the record."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from click.testing import CliRunner
from flax import nnx

import aqgov
from aqgov.cli import main
from aqgov.credentials._manifest import MANIFEST, Manifest, issue_manifest
from aqgov.documents import _canonical as canonical
from aqgov.documents import _keys as keylib
from aqgov.documents._document_type import read, sign, write
from aqgov.documents._keys import TrustStore
from aqgov.errors import (
  AdmissionError,
  LineageError,
  PolicyError,
  ProfileError,
  ReplayUnavailable,
)
from aqgov.examples import sample
from aqgov.governed import GovernedTask
from aqgov.lineage import (
  GovernedRun,
  export_intoto,
  refusals,
  routed_summary,
  verify_envelope,
  verify_lineage,
)
from aqgov.lineage import _record as rec
from aqgov.lineage import _segments as segments
from aqgov.lineage._query import membership
from aqgov.policy._policy import POLICY, Policy
from aqgov.report import write_report
from tests import lineage_helpers as lh

POLICY_TOML = """
name = "own-loop"
authority = "acme-data"
[groups]
body = ["body/**"]
head = ["head/**"]
[[rules]]
when = "sensitivity_tier >= 2"
route = { head = 1.0 }
[default]
route = { body = 1.0, head = 1.0 }
"""
OTHER_TOML = POLICY_TOML.replace('name = "own-loop"', 'name = "other"')


class Net(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.body = nnx.Linear(8, 8, rngs=rngs)
    self.head = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.tanh(self.body(x)))


def features(ex) -> dict:
  """An example's first 8 bytes as features, and its length mod 4 as the class."""
  raw = np.frombuffer(ex.content[:8].ljust(8), np.uint8).astype(np.float32) / 255.0
  return {"x": raw, "y": np.int32(len(ex.content) % 4)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """One authority, its manifest over 24 sample examples and its signed policy, as files."""
  root = tmp_path_factory.mktemp("authority")
  key = keylib.generate("acme-data")
  keylib.write_keypair(key, root / "keys")
  examples = sample.examples()[:24]
  manifest = issue_manifest(key, sample.taxonomies()["acme-data"], examples)
  write(MANIFEST, manifest.document, root / "acme.manifest")
  write(POLICY, sign(POLICY, Policy.from_toml(POLICY_TOML), key), root / "policy.signed")
  write(POLICY, sign(POLICY, Policy.from_toml(OTHER_TOML), key), root / "other.signed")
  return {
    "root": root,
    "key": key,
    "pub": root / "keys" / "acme-data.pub",
    "examples": examples,
    "manifest": root / "acme.manifest",
    "policy": root / "policy.signed",
    "other": root / "other.signed",
  }


def open_run(world, run_dir: Path, **kw) -> GovernedRun:
  graphdef, params = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
  kw.setdefault("params", params)
  return GovernedRun.open(
    run_dir,
    policies=[world["policy"]],
    manifests=[world["manifest"]],
    trust=[world["pub"]],
    key_dir=run_dir.parent / f"{run_dir.name}-keys",
    **kw,
  )


def own_loop(compiled, emit=None):
  """The user's model, optax chain and jitted step; with `emit`, the step emits its summary."""
  graphdef, params = nnx.split(Net(nnx.Rngs(0)), nnx.Param)

  def example_loss(p, ex):
    logits = nnx.merge(graphdef, p)(ex["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, ex["y"])

  grad_fn = aqgov.routed_value_and_grad(example_loss, compiled, with_norms=True)
  tx = optax.chain(optax.adamw(1e-2), aqgov.strict(compiled))

  @jax.jit
  def train_step(step, params, opt_state, inputs, labels):
    loss, grads, norms = grad_fn(params, inputs, labels)
    updates, opt_state = tx.update(grads, opt_state, params, labels=labels)
    params = optax.apply_updates(params, updates)
    summary = routed_summary(
      compiled, labels, step=step, loss=loss, contribution_norms=norms, params=params
    )
    if emit is not None:
      emit(summary)
      return params, opt_state, loss
    return params, opt_state, summary

  return params, tx.init(params), train_step


def batches(world, tampered: int | None = None, size: int = 6):
  exs = list(world["examples"])
  if tampered is not None:
    exs[tampered] = exs[tampered]._replace(content=exs[tampered].content + b" (altered)")
  return [exs[i : i + size] for i in range(0, len(exs), size)]


def run_pub(run_dir: Path) -> Path:
  """The run key's public half where the operator keeps it: outside the run directory."""
  return run_dir.parent / f"{run_dir.name}-keys" / "run.pub"


def run_key(run_dir: Path):
  return keylib.load_signing_key(run_dir.parent / f"{run_dir.name}-keys" / "run.key")


def trust_of(world, run_dir: Path) -> TrustStore:
  """The authority's key and the run key, as an auditor gets them: from outside the run directory."""
  return TrustStore.from_paths([world["pub"], run_pub(run_dir)])


def step_bodies(run_dir: Path) -> list[dict]:
  return [
    {k: v for k, v in body.items() if k != "time"}
    for _, _, body in segments.records(run_dir / "lineage", kinds=(rec.STEP,))
  ]


def test_an_nnx_model_in_its_own_jitted_loop_leaves_a_lineage_that_verifies_and_answers_queries(
  tmp_path, world
):
  run = open_run(world, tmp_path / "run")
  params, opt_state, train_step = own_loop(run.compiled)
  for step, examples in enumerate(batches(world, tampered=7), start=1):
    batch = run.admit(examples, transform=features)
    params, opt_state, summary = train_step(step, params, opt_state, batch.inputs, batch.labels)
    assert run.record(summary, batch) == step
  run.close(params, opt_state=opt_state)

  trust = trust_of(world, tmp_path / "run")
  report = verify_lineage(tmp_path / "run", trust)
  assert report.closed and "checkpoint at step 4" in " ".join(report.checked)
  start = next(iter(segments.LogReader(tmp_path / "run" / "lineage"))).body
  assert start["config"]["task"] is None
  assert start["groups"] == ["body", "head"]
  assert start["classes"] == list(run.compiled.class_names)
  # the altered example never trained: it is refused, with the reason, in step 2's record
  assert [(f.step, f.example_id, f.reason) for f in refusals(tmp_path / "run")] == [
    (2, "ex-0007", "content-hash-mismatch")
  ]
  envelope = export_intoto(tmp_path / "run", run_key(tmp_path / "run"), trust=trust)
  subjects = verify_envelope(envelope, trust)["subject"]
  assert [s["name"].split("/", 1)[1] for s in subjects] == ["checkpoints/4/params"]
  reached = {m.example_id for m in membership(tmp_path / "run", "body")}
  tier = {e.id: e.labels["acme-data"]["sensitivity_tier"] for e in world["examples"]}
  assert reached == {i for i, t in tier.items() if t < 2 and i != "ex-0007"}


def test_summaries_emitted_through_an_ordered_callback_record_the_same_steps_as_record(
  tmp_path, world
):
  recorded = open_run(world, tmp_path / "a")
  params, opt_state, train_step = own_loop(recorded.compiled)
  for step, examples in enumerate(batches(world, tampered=7)[:2], start=1):
    batch = recorded.admit(examples, transform=features)
    params, opt_state, summary = train_step(step, params, opt_state, batch.inputs, batch.labels)
    recorded.record(summary, batch)
  recorded.close(params, opt_state=opt_state)

  emitting = open_run(world, tmp_path / "b")
  params, opt_state, train_step = own_loop(emitting.compiled, emit=emitting.emit)
  for step, examples in enumerate(batches(world, tampered=7)[:2], start=1):
    batch = emitting.admit(examples, transform=features)
    emitting.stage(batch)
    params, opt_state, _ = train_step(step, params, opt_state, batch.inputs, batch.labels)
  emitting.close(params, opt_state=opt_state)

  assert verify_lineage(tmp_path / "b", trust_of(world, tmp_path / "b")).closed
  assert step_bodies(tmp_path / "b") == step_bodies(tmp_path / "a")
  assert [f.example_id for f in refusals(tmp_path / "b")] == ["ex-0007"]


def test_an_emitted_summary_without_a_staged_batch_is_refused_at_the_next_call(tmp_path, world):
  run = open_run(world, tmp_path / "run")
  params, opt_state, train_step = own_loop(run.compiled, emit=run.emit)
  batch = run.admit(world["examples"][:6], transform=features)
  train_step(1, params, opt_state, batch.inputs, batch.labels)
  with pytest.raises(LineageError, match="no batch was staged"):
    run.head()
  run.abandon()


def test_a_step_number_that_skips_or_goes_back_is_refused(tmp_path, world):
  run = open_run(world, tmp_path / "run")
  params, opt_state, train_step = own_loop(run.compiled)
  batch = run.admit(world["examples"][:6], transform=features)
  _, _, first = train_step(1, params, opt_state, batch.inputs, batch.labels)
  _, _, third = train_step(3, params, opt_state, batch.inputs, batch.labels)
  with pytest.raises(LineageError, match=r"step\(s\) 1..2 were not recorded"):
    run.record(third, batch)
  run.record(first, batch)
  with pytest.raises(LineageError, match="never goes back"):
    run.record(first, batch)
  run.close(params, opt_state=opt_state)
  assert [b["step"] for b in step_bodies(tmp_path / "run")] == [1]
  assert verify_lineage(tmp_path / "run", trust_of(world, tmp_path / "run")).closed


def test_a_tampered_record_of_an_own_loop_fails_verification(tmp_path, world):
  run = open_run(world, tmp_path / "run")
  params, opt_state, train_step = own_loop(run.compiled)
  for step, examples in enumerate(batches(world, tampered=7), start=1):
    batch = run.admit(examples, transform=features)
    params, opt_state, summary = train_step(step, params, opt_state, batch.inputs, batch.labels)
    run.record(summary, batch)
  run.close(params, opt_state=opt_state)
  seg = lh.segment_path(tmp_path / "run" / "lineage")
  header, frames = lh.split_frames(seg.read_bytes())
  # rewrite the refused id of step 2 (record 2) and fix the frame digest: only the chain and heads know
  forged = lh.payload(frames[2]).replace(b"ex-0007", b"ex-0008")
  assert forged != lh.payload(frames[2])
  frames[2] = segments.frame(forged)
  seg.write_bytes(header + b"".join(frames))
  with pytest.raises(LineageError) as info:
    verify_lineage(tmp_path / "run", trust_of(world, tmp_path / "run"))
  assert info.value.index is not None and info.value.index <= 3


def test_a_batch_refused_whole_takes_no_step_and_is_recorded(tmp_path, world):
  run = open_run(world, tmp_path / "run")
  params, opt_state, train_step = own_loop(run.compiled)
  altered = [e._replace(content=e.content + b"!") for e in world["examples"][:3]]
  refused = run.admit(altered, transform=features)
  assert refused.ids == ()
  run.record_refused(refused.rejected)
  batch = run.admit(world["examples"][3:9], transform=features)
  params, opt_state, summary = train_step(1, params, opt_state, batch.inputs, batch.labels)
  run.record(summary, batch)
  run.close(params, opt_state=opt_state)
  assert verify_lineage(tmp_path / "run", trust_of(world, tmp_path / "run")).closed
  got = refusals(tmp_path / "run")
  assert [(f.step, f.taken, f.example_id) for f in got] == [
    (0, False, "ex-0000"),
    (0, False, "ex-0001"),
    (0, False, "ex-0002"),
  ]
  assert [b["step"] for b in step_bodies(tmp_path / "run")] == [1]


def test_on_reject_raise_refuses_the_batch_at_admission(tmp_path, world):
  run = open_run(world, tmp_path / "run", on_reject="raise")
  altered = world["examples"][0]._replace(content=b"altered")
  with pytest.raises(AdmissionError, match="content-hash-mismatch|altered"):
    run.admit([altered, *world["examples"][1:4]], transform=features)
  run.abandon()


def test_replay_of_a_run_that_records_no_task_says_why_it_cannot(tmp_path, world):
  run = open_run(world, tmp_path / "run")
  params, opt_state, train_step = own_loop(run.compiled)
  batch = run.admit(world["examples"][:6], transform=features)
  params, opt_state, summary = train_step(1, params, opt_state, batch.inputs, batch.labels)
  run.record(summary, batch)
  run.close(params, opt_state=opt_state)
  trust = trust_of(world, tmp_path / "run")
  with pytest.raises(ReplayUnavailable, match="records no task"):
    aqgov.replay(tmp_path / "run", step=1, examples=world["examples"], trust=trust)
  result = CliRunner().invoke(
    main,
    ["lineage", "replay", str(tmp_path / "run"), "--step", "1"]
    + ["--data", str(sample.examples_path()), "--run-key", str(run_pub(tmp_path / "run"))]
    + ["--trust", str(world["pub"])],
  )
  assert result.exit_code != 0 and "records no task" in result.output
  assert "Traceback" not in result.output
  with pytest.raises(LineageError, match="records a loop its user owns"):
    GovernedRun.resume(tmp_path / "run", trust=[world["pub"]])


def test_open_refuses_a_compiled_policy_other_than_the_signed_ones(tmp_path, world):
  graphdef, params = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
  other = aqgov.compile_policy(
    Policy.from_toml(OTHER_TOML), params, sample.taxonomies()["acme-data"]
  )
  with pytest.raises(PolicyError, match="compiled from exactly the signed policies"):
    open_run(world, tmp_path / "run", params=None, compiled=other)
  assert not (tmp_path / "run").exists()


def test_an_unsigned_policy_or_profile_object_is_refused_before_anything_is_written(
  tmp_path, world
):
  unsigned = Policy.from_toml(POLICY_TOML)
  with pytest.raises(PolicyError, match="Policy object is not a signed routing policy"):
    GovernedRun.open(
      tmp_path / "a",
      policies=[unsigned],
      params=nnx.split(Net(nnx.Rngs(0)), nnx.Param)[1],
      trust=[world["pub"]],
    )
  profile = aqgov.EntropyProfile.read(sample.profile_path())
  with pytest.raises(ProfileError, match="EntropyProfile object is not a signed"):
    GovernedRun.start(tmp_path / "b", task=lh.TASK, policies=[world["policy"]], profiles=[profile])
  with pytest.raises(PolicyError, match="policies= takes signed routing policy documents"):
    GovernedRun.start(tmp_path / "c", task=lh.TASK, policies=[world["manifest"]])
  assert not any((tmp_path / d).exists() for d in "abc")


def test_start_with_document_objects_or_their_files_records_the_same_digests(tmp_path, world):
  data = lh.examples_file(tmp_path / "data.jsonl")
  as_files = {"policies": [world["policy"]], "manifests": [world["manifest"]]}
  as_objects = {
    "policies": [read(POLICY, world["policy"])],
    "manifests": [Manifest(read(MANIFEST, world["manifest"]))],
  }
  starts = []
  for name, docs in (("files", as_files), ("objects", as_objects)):
    lh.make_run(tmp_path / name, data, 1, trust=[world["pub"]], **docs)
    starts.append(next(iter(segments.LogReader(tmp_path / name / "lineage"))).body)
  for field in ("policies", "manifests"):
    assert starts[0][field] == starts[1][field]
  assert starts[0]["policies"][0]["sha256"] == rec.record_hash(world["policy"].read_bytes()).hex()


def test_logs_written_at_record_version_1_still_verify_and_read(tmp_path, monkeypatch):
  key = keylib.generate("run", roles=(keylib.RUN,))
  monkeypatch.setattr(rec, "VERSION", 1)
  lh.write_log(tmp_path / "lineage", key, 3)
  monkeypatch.undo()
  assert rec.VERSION == 2
  envelopes = [
    rec.decode_record(lh.payload(f), i)
    for i, f in enumerate(lh.split_frames(lh.segment_path(tmp_path / "lineage").read_bytes())[1])
  ]
  assert len(envelopes) == 5
  raw = lh.payload(lh.split_frames(lh.segment_path(tmp_path / "lineage").read_bytes())[1][1])
  assert canonical.decode(raw)["v"] == 1
  lh.publish_key(tmp_path, key)
  report = verify_lineage(tmp_path, TrustStore.of([key.public]))
  assert report.closed and report.size == 5
  assert [m.step for m in membership(tmp_path, "head")][:1] == [1]


def test_verify_checks_the_shape_of_a_recorded_refusal(tmp_path):
  key = keylib.generate("run", roles=(keylib.RUN,))
  lh.write_log(tmp_path / "lineage", key, 2, close=False)
  body = rec.step_body(lh.summary(3), lh.ids(3), lh.digests(3))
  body = dict(sorted({**body, "rejected": [{"id": "ex-9", "reason": ""}]}.items()))
  seg = lh.segment_path(tmp_path / "lineage")
  _, frames = lh.split_frames(seg.read_bytes())
  prev = rec.record_hash(lh.payload(frames[-1]))
  with seg.open("ab") as f:
    f.write(segments.frame(rec.encode_record(3, rec.STEP, prev, rec.encode_step_body(body))))
  lh.sign_head(tmp_path / "lineage", key)
  lh.publish_key(tmp_path, key)
  with pytest.raises(LineageError, match="'rejected' must be a list of") as info:
    verify_lineage(tmp_path, TrustStore.of([key.public]), require_closed=False)
  assert info.value.index == 3
  with pytest.raises(LineageError, match="non-empty id and reason"):
    rec.with_rejected(body, [("ex-9", "")])


def test_verify_and_show_list_the_refused_examples(tmp_path, world):
  run = open_run(world, tmp_path / "run")
  params, opt_state, train_step = own_loop(run.compiled)
  for step, examples in enumerate(batches(world, tampered=7)[:2], start=1):
    batch = run.admit(examples, transform=features)
    params, opt_state, summary = train_step(step, params, opt_state, batch.inputs, batch.labels)
    run.record(summary, batch)
  run.close(params, opt_state=opt_state)
  keys = ["--trust", str(world["pub"]), "--run-key", str(run_pub(tmp_path / "run"))]
  verified = CliRunner().invoke(main, ["lineage", "verify", str(tmp_path / "run"), *keys])
  assert verified.exit_code == 0, verified.output
  assert "refused at admission (left out of training): 1 example(s), content-hash-mismatch 1" in (
    verified.output
  )
  shown = CliRunner().invoke(main, ["lineage", "show", str(tmp_path / "run")])
  assert "content-hash-mismatch: 1" in shown.output
  queried = CliRunner().invoke(
    main, ["lineage", "query", str(tmp_path / "run"), "--refused", "--json"]
  )
  assert '"example_id": "ex-0007", "reason": "content-hash-mismatch"' in queried.output
  write_report(tmp_path / "run", tmp_path / "report.html", trust_of(world, tmp_path / "run"))
  page = (tmp_path / "report.html").read_text()
  assert "Admission refusals (1)" in page and "content-hash-mismatch" in page


# ---- admission inside a task's run ----------------------------------------------------------------


def make_task(task_config, run_dir):
  """A `GovernedTask` over the Net and the run's documents (`tests.test_own_loop:make_task`)."""
  graphdef, _ = nnx.split(Net(nnx.Rngs(0)), nnx.Param)

  def example_loss(p, ex):
    logits = nnx.merge(graphdef, p)(ex["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, ex["y"]), {}

  return GovernedTask(
    run_dir,
    loss_fn=example_loss,
    init_params=lambda: nnx.split(Net(nnx.Rngs(0)), nnx.Param)[1],
    make_inputs=features,
    optimizer=optax.sgd(0.1),
    strict=True,
  )


TASK = "tests.test_own_loop:make_task"


def start_task_run(world, run_dir: Path, **kw) -> GovernedRun:
  return GovernedRun.start(
    run_dir,
    task=TASK,
    policies=[world["policy"]],
    manifests=[world["manifest"]],
    trust=[world["pub"]],
    key_dir=run_dir.parent / f"{run_dir.name}-keys",
    checkpoint_every=2,
    **kw,
  )


def test_a_refused_example_is_left_out_of_the_step_and_listed_in_its_record(tmp_path, world):
  run = start_task_run(world, tmp_path / "run")
  good, mixed = world["examples"][:6], list(world["examples"][6:12])
  mixed[1] = mixed[1]._replace(content=mixed[1].content + b" (altered)")
  altered = [e._replace(content=e.content + b"!") for e in world["examples"][12:14]]
  assert int(run.step(good).step) == 1
  summary = run.step(mixed)
  assert int(summary.step) == 2 and summary.weights.shape[0] == 5  # trained on the other five
  assert run.step(altered) is None  # refused whole: no update, the step number stays
  assert int(run.step(world["examples"][14:20]).step) == 3
  run.close()

  trust = trust_of(world, tmp_path / "run")
  assert verify_lineage(tmp_path / "run", trust).closed
  views = [
    rec.view_step(body) for _, _, body in segments.records(tmp_path / "run" / "lineage", ("step",))
  ]
  assert [v.step for v in views] == [1, 2, 3]
  assert "ex-0007" not in views[1].example_ids
  assert views[1].rejected == (("ex-0007", "content-hash-mismatch"),)
  assert [(f.step, f.taken, f.example_id) for f in refusals(tmp_path / "run")] == [
    (2, True, "ex-0007"),
    (2, False, "ex-0012"),
    (2, False, "ex-0013"),
  ]
  queried = CliRunner().invoke(main, ["lineage", "query", str(tmp_path / "run"), "--refused"])
  assert queried.exit_code == 0 and "ex-0007" in queried.output
  assert "after 2 (no update)" in queried.output
  # replay re-executes exactly what trained: the refused examples are not needed
  result = aqgov.replay(
    tmp_path / "run", step=3, examples=world["examples"], trust=trust, task=TASK, from_checkpoint=0
  )
  assert result.steps_replayed == 3


def test_on_reject_raise_keeps_raising_admission_errors_in_a_task_run(tmp_path, world):
  run = start_task_run(world, tmp_path / "run", on_reject="raise")
  mixed = list(world["examples"][:6])
  mixed[2] = mixed[2]._replace(content=b"altered")
  with pytest.raises(AdmissionError, match="content-hash-mismatch"):
    run.step(mixed)
  run.abandon()
  start = next(iter(segments.LogReader(tmp_path / "run" / "lineage"))).body
  assert start["config"]["lineage"]["on_reject"] == "raise"
