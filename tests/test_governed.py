"""A governed run: labels come from credentials, steps are routed and bounded, escalations resume by override."""

import datetime as dt
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aqgov.credentials._manifest import MANIFEST, Example, issue_manifest
from aqgov.documents._document_type import sign, write
from aqgov.documents._keys import TrustStore
from aqgov.entropy._enforce import decode_events
from aqgov.entropy._overrides import OVERRIDE, Override
from aqgov.entropy._profile import PROFILE, EntropyProfile
from aqgov.errors import AdmissionError, GovernanceEscalation, NonFiniteError
from aqgov.examples import sample as sample
from aqgov.examples import tiny_lm as tiny_lm
from aqgov.examples.demo import create_authorities
from aqgov.governed import GovernedTask
from aqgov.lineage import GovernedRun, verify_lineage
from aqgov.lineage._log import LogReader

SMALL = {"seq_len": 16, "d_model": 16, "num_heads": 4, "num_blocks": 1, "adapter_dim": 4, "seed": 0}
ESCALATING_PROFILE = """
name = "stop-on-adapter"
[[representation]]
path = "representations/adapter"
group = "adapter"
kind = "features"
[[bound]]
group = "adapter"
metric = "effective_rank"
low = 1000.0
action = "escalate"
"""


@pytest.fixture(scope="module")
def authorities(tmp_path_factory):
  return create_authorities(tmp_path_factory.mktemp("authorities"))


def start(tmp_path, authorities, profile=None):
  profiles = [profile] if profile is not None else [authorities.profile]
  return GovernedRun.start(
    tmp_path / "run",
    task="aqgov.examples.tiny_lm:make_task",
    task_config=SMALL,
    policies=authorities.policies,
    profiles=profiles,
    manifests=authorities.manifests,
    trust=authorities.public_keys,
    checkpoint_every=100,
  )


def test_labels_come_from_credentials_and_altered_bytes_are_refused_at_the_step(
  tmp_path, authorities
):
  run = start(tmp_path, authorities)
  examples = sample.examples()[:4]
  altered = examples[0]._replace(content=examples[0].content + b"!")
  with pytest.raises(AdmissionError, match="content-hash-mismatch|altered"):
    run.task.make_batch([altered, *examples[1:]])
  run.abandon()


def test_each_step_reports_the_policy_weights_and_is_numbered_from_one(tmp_path, authorities):
  run = start(tmp_path, authorities)
  examples = sample.examples()[:8]
  _, labels = run.task.make_batch(examples)
  summaries = [jax.device_get(run.step(examples)) for _ in range(2)]
  assert [int(s.step) for s in summaries] == [1, 2]
  np.testing.assert_array_equal(
    summaries[0].weights, np.asarray(run.task.compiled.group_weights(labels))
  )
  assert not np.array_equal(summaries[0].fingerprint, summaries[1].fingerprint)
  run.close()
  report = verify_lineage(
    tmp_path / "run", TrustStore.from_paths(sorted((tmp_path / "run" / "keys").glob("*.pub")))
  )
  assert report.closed


def test_an_escalation_stops_before_the_update_and_an_override_in_the_run_directory_resumes(
  tmp_path, authorities
):
  acme = authorities.keys["acme-data"]
  profile = write(
    PROFILE,
    sign(PROFILE, EntropyProfile.from_toml(ESCALATING_PROFILE), acme),
    tmp_path / "stop.signed",
  )
  run = start(tmp_path, authorities, profile)
  run_id, before = run.run_id, jax.device_get(run.state.params)
  examples = sample.examples()[:8]
  with pytest.raises(GovernanceEscalation, match="RUN/overrides") as stopped:
    run.step(examples)
  assert stopped.value.step == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(stopped.value.state.params), before)
  run.abandon()

  expires = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
  token = sign(
    OVERRIDE,
    Override.create(
      run=run_id,
      steps="1",
      groups="adapter",
      metrics="effective_rank",
      reason="adapter rank bound is a test threshold",
      expires=expires,
    ),
    acme,
  )
  write(OVERRIDE, token, tmp_path / "run" / "overrides" / "step1.override")
  resumed = GovernedRun.resume(tmp_path / "run", trust=authorities.public_keys)
  resumed.record_override(token, step=1)
  assert int(jax.device_get(resumed.step(examples).step)) == 1
  with pytest.raises(GovernanceEscalation):
    resumed.step(examples)  # the token names step 1 only
  resumed.abandon()
  verify_lineage(
    tmp_path / "run",
    TrustStore.from_paths(sorted((tmp_path / "run" / "keys").glob("*.pub"))),
    require_closed=False,
  )


def poisoned_loss(params, tokens):
  """The sample model's loss, with a NaN head gradient for examples starting with '!'."""
  loss, aux = tiny_lm.example_loss(params, tokens, tiny_lm.Config(**CONFIG), with_aux=True)
  bias = params["head"]["bias"][0]
  # d/db sqrt(0 * b) is NaN while the value stays 0: a finite loss with a NaN head gradient
  return loss + jnp.sqrt(jnp.where(tokens[0] == ord("!"), 0.0 * bias, 1.0)), aux


CONFIG = {k: v for k, v in SMALL.items() if k != "seed"}


def test_a_nan_gradient_is_never_applied_and_the_step_says_which_groups(tmp_path, authorities):
  acme, eu = authorities.keys["acme-data"], authorities.keys["eu-office"]
  examples = [
    Example("ok-0", b"Plain text that trains.", None),
    Example("bad-0", b"!Text that poisons.", None),
  ]
  labels = {
    "license_class": "public-domain",
    "sensitivity_tier": 0,
    "jurisdictions": ["US"],
    "source": "web",
  }
  run_dir = tmp_path / "run"
  write(
    MANIFEST,
    issue_manifest(
      acme, sample.taxonomies()["acme-data"], [e._replace(labels=labels) for e in examples]
    ).document,
    run_dir / "manifests" / "acme.signed",
  )
  (run_dir / "policies").mkdir()
  shutil.copy(
    authorities.policies[0], run_dir / "policies"
  )  # acme-routing: acme-data's fields only
  task = GovernedTask(
    run_dir,
    loss_fn=poisoned_loss,
    init_params=lambda: tiny_lm.init(jax.random.PRNGKey(0), tiny_lm.Config(**CONFIG)),
    make_inputs=lambda ex: tiny_lm.encode_text(ex.content, tiny_lm.Config(**CONFIG)),
    optimizer=optax.adam(1e-2),
    trust=TrustStore.of([acme, eu]),
  )
  state = task.init()
  state, _ = task.step(state, *task.make_batch(examples[:1]))
  assert int(state.step) == 1
  with pytest.raises(NonFiniteError, match=r"group\(s\) head is NaN") as failed:
    task.step(state, *task.make_batch(examples))
  assert "not applied" in str(failed.value)
  assert "bad-0 (non-finite gradient)" in str(failed.value) and "ok-0" not in str(failed.value)
  held, _ = task.step_without_checks(state, *task.make_batch(examples))
  assert int(held.step) == 1
  jax.tree.map(np.testing.assert_array_equal, held.params, state.params)
  jax.tree.map(np.testing.assert_array_equal, held.opt_state, state.opt_state)


def test_a_non_finite_update_is_never_applied_even_when_the_gradients_are_finite(
  tmp_path, authorities
):
  acme = authorities.keys["acme-data"]
  examples = [
    Example("ok-0", b"Plain text that trains.", None),
    Example("ok-1", b"More plain text.", None),
  ]
  labels = {
    "license_class": "public-domain",
    "sensitivity_tier": 0,
    "jurisdictions": ["US"],
    "source": "web",
  }
  run_dir = tmp_path / "run"
  write(
    MANIFEST,
    issue_manifest(
      acme, sample.taxonomies()["acme-data"], [e._replace(labels=labels) for e in examples]
    ).document,
    run_dir / "manifests" / "acme.signed",
  )
  (run_dir / "policies").mkdir()
  shutil.copy(authorities.policies[0], run_dir / "policies")
  task = GovernedTask(
    run_dir,
    loss_fn=lambda p, t: tiny_lm.example_loss(p, t, tiny_lm.Config(**CONFIG), with_aux=True),
    init_params=lambda: tiny_lm.init(jax.random.PRNGKey(0), tiny_lm.Config(**CONFIG)),
    make_inputs=lambda ex: tiny_lm.encode_text(ex.content, tiny_lm.Config(**CONFIG)),
    optimizer=optax.sgd(float("nan")),
    trust=TrustStore.of([acme]),
  )
  state = task.init()
  with pytest.raises(
    NonFiniteError, match=r"update or updated parameters of group\(s\) .*NaN"
  ) as failed:
    task.step(state, *task.make_batch(examples))
  assert "not applied" in str(failed.value)
  held, summary = task.step_without_checks(state, *task.make_batch(examples))
  assert int(held.step) == 0 and np.isfinite(float(summary.loss))
  jax.tree.map(np.testing.assert_array_equal, held.params, state.params)
  jax.tree.map(np.testing.assert_array_equal, held.opt_state, state.opt_state)
  assert bool(np.asarray(held.governance.nonfinite).all())


@pytest.mark.parametrize(
  "norms,recorded",
  [
    ({}, {"kind": "exact"}),
    (
      {"norms": "sketch", "norms_sketch_dim": 16, "norms_sketch_seed": 3},
      {"kind": "sketch", "sketch_dim": 16, "sketch_seed": 3},
    ),
  ],
)
def test_the_run_start_record_says_which_contribution_norms_the_steps_record(
  tmp_path, authorities, norms, recorded
):
  run = GovernedRun.start(
    tmp_path / "run",
    task="aqgov.examples.tiny_lm:make_task",
    task_config={**SMALL, **norms},
    policies=authorities.policies,
    profiles=[authorities.profile],
    manifests=authorities.manifests,
    trust=authorities.public_keys,
  )
  summary = jax.device_get(run.step(sample.examples()[:4]))
  assert np.all(np.isfinite(summary.contribution_norms))
  run.close()
  start_record = next(iter(LogReader(tmp_path / "run" / "lineage", bodies=("run-start",))))
  assert start_record.body["config"]["norms"] == recorded


GOVERNED_WINDOWS = """
name = "freeze-pause-route"
# step 3: freeze the core for steps 3-5
[[bound]]
group = "core"
metric = "gradient_entropy"
low = 1e9
steps = [3, 4]
action = "reroute"
fallback = 0.0
duration = 3
# step 7: skip the step
[[bound]]
group = "embed"
metric = "gradient_entropy"
low = 1e9
steps = [7, 8]
action = "pause"
# step 9: send the default class to the head only, for steps 10-11
[[bound]]
group = "head"
metric = "gradient_entropy"
low = 1e9
steps = [9, 10]
action = "route"
classes = ["acme-routing:default|*"]
to = ["head"]
duration = 2
"""
WINDOW_STEPS = 12


@pytest.fixture(scope="module")
def windowed_run(tmp_path_factory, authorities):
  """A governed run (adamw with weight decay) under GOVERNED_WINDOWS: params after each step,
  the step summaries and the step records."""
  from aqgov.lineage import _record as rec
  from aqgov.lineage import _segments as segments

  tmp = tmp_path_factory.mktemp("windows")
  profile = write(
    PROFILE,
    sign(PROFILE, EntropyProfile.from_toml(GOVERNED_WINDOWS), authorities.keys["acme-data"]),
    tmp / "windows.signed",
  )
  run = start(tmp, authorities, profile)
  examples = sample.examples()[48:56]  # three of them reach the core
  params, summaries = [jax.device_get(run.state.params)], []
  for _ in range(WINDOW_STEPS):
    summaries.append(jax.device_get(run.step(examples)))
    params.append(jax.device_get(run.state.params))
  task = run.task
  run.close()
  ldir = tmp / "run" / "lineage"
  views = [rec.view_step(b, i) for i, _, b in segments.records(ldir, kinds=(rec.STEP,))]
  return task, params, summaries, views, tmp / "run"


def _group_leaves(task, params, group):
  g = task.compiled.group_names.index(group)
  return [x for x, lg in zip(jax.tree.leaves(params), task.compiled.leaf_group) if lg == g]


def _bitwise_equal(a, b) -> bool:
  return all(np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(a, b, strict=True))


def test_a_paused_group_gets_no_update_not_even_momentum_or_weight_decay(windowed_run):
  from aqgov.lineage import membership

  task, params, _, views, run_dir = windowed_run
  core = task.compiled.group_names.index("core")
  assert [v.step for v in views] == list(range(1, WINDOW_STEPS + 1))
  leaves = [_group_leaves(task, p, "core") for p in params]  # params[t]: after step t
  # momentum and weight decay built up over steps 1-2; the core is frozen for steps 3-5
  assert not _bitwise_equal(leaves[1], leaves[2])
  assert all(_bitwise_equal(leaves[2], leaves[t]) for t in (3, 4, 5))
  assert not _bitwise_equal(leaves[5], leaves[6])  # and trains again at step 6
  assert not _bitwise_equal(
    _group_leaves(task, params[2], "head"), _group_leaves(task, params[5], "head")
  )
  # the pause at step 7 holds every group
  assert _bitwise_equal(jax.tree.leaves(params[6]), jax.tree.leaves(params[7]))
  # the record says so: constant core fingerprint, effective weight 0, no applied contribution
  fp = [v.fingerprint[core] for v in views]
  assert all(np.array_equal(fp[1], fp[t]) for t in (2, 3, 4)) and not np.array_equal(fp[4], fp[5])
  for v in views:
    # frozen at 3-5, paused at 7; at 10-11 a fallback route sends the core's examples elsewhere
    frozen = v.step in (3, 4, 5, 7, 10, 11)
    assert (v.applied_weights[:, core] == 0).all() == frozen
    assert (v.weights[:, core] > 0).any()
    assert (v.applied_norms[:, core] == 0).all() == frozen
  assert (views[6].applied_weights == 0).all()
  reached = {m.step for m in membership(run_dir, "core")}
  assert reached == set(range(1, WINDOW_STEPS + 1)) - {3, 4, 5, 7, 10, 11}
  assert {m.step for m in membership(run_dir, "core", policy=True)} == set(range(1, 13))


def test_a_fallback_route_sends_a_class_to_its_target_groups_for_exactly_k_steps(windowed_run):
  task, _, summaries, views, _ = windowed_run
  names = task.compiled.class_names
  head = task.compiled.group_names.index("head")
  events = [e for s in summaries for e in decode_events(s.events, task.profile, task.compiled)]
  routes = [e for e in events if e.action == "route"]
  assert [(e.step, e.window) for e in routes] == [(9, (10, 11))]  # numbered like lineage steps
  assert routes[0].route == (("acme-routing:default|*",), ("head",))
  assert "route classes ['acme-routing:default|*'] to groups ['head'] for steps 10-11" in (
    routes[0].describe()
  )
  assert [(e.step, e.action, e.window) for e in events if e.action != "route"] == [
    (3, "reroute", (3, 5)),
    (7, "pause", None),
  ]
  for v in views:
    routed = np.asarray([names[c].startswith("acme-routing:default|") for c in v.route_class])
    assert routed.any()
    others = [g for g in range(len(task.compiled.group_names)) if g != head]
    away = (v.applied_weights[routed][:, others] == 0).all()
    assert away == (v.step in (10, 11) or v.step == 7 or (v.weights[routed][:, others] == 0).all())
    if v.step in (10, 11):
      np.testing.assert_array_equal(v.applied_weights[routed][:, head], v.weights[routed][:, head])
      np.testing.assert_array_equal(v.contribution_norms[routed][:, others], 0)
    if v.step in (1, 2, 6, 8, 9, 12):
      np.testing.assert_array_equal(v.applied_weights, v.weights)


def _inf_task(tmp_path, authorities, on_nonfinite):
  """A task over the sample model whose inputs carry a scale: inf for examples starting with '!'."""
  acme = authorities.keys["acme-data"]
  examples = [
    Example("ok-0", b"Plain text that trains.", None),
    Example("bad-0", b"!Text with an infinite input.", None),
    Example("ok-1", b"More plain text.", None),
  ]
  labels = {
    "license_class": "public-domain",
    "sensitivity_tier": 0,
    "jurisdictions": ["US"],
    "source": "web",
  }
  run_dir = tmp_path / "run"
  write(
    MANIFEST,
    issue_manifest(
      acme, sample.taxonomies()["acme-data"], [e._replace(labels=labels) for e in examples]
    ).document,
    run_dir / "manifests" / "acme.signed",
  )
  (run_dir / "policies").mkdir()
  shutil.copy(authorities.policies[0], run_dir / "policies")
  config = tiny_lm.Config(**CONFIG)

  def make_inputs(ex):
    scale = np.float32(np.inf if ex.content.startswith(b"!") else 1.0)
    return {"tokens": tiny_lm.encode_text(ex.content, config), "scale": scale}

  def loss(params, inputs):
    value, aux = tiny_lm.example_loss(params, inputs["tokens"], config, with_aux=True)
    return value * inputs["scale"], aux

  task = GovernedTask(
    run_dir,
    loss_fn=loss,
    init_params=lambda: tiny_lm.init(jax.random.PRNGKey(0), config),
    make_inputs=make_inputs,
    optimizer=optax.sgd(0.1),
    trust=TrustStore.of([acme]),
    on_nonfinite=on_nonfinite,
  )
  return task, examples, loss


def test_drop_example_drops_only_the_non_finite_example_and_records_it(tmp_path, authorities):
  from aqgov.lineage import _record as rec

  task, examples, loss = _inf_task(tmp_path, authorities, "drop_example")
  state = task.init()
  batch, labels = task.make_batch(examples)
  new, summary = task.step(state, batch, labels)
  assert int(new.step) == 1 and np.isfinite(float(summary.loss))
  # brute force on the rest: per-example gradients of the finite examples, policy weights, 1/B
  kept = np.asarray([0, 2])
  rest = jax.tree.map(lambda x: x[kept], batch["inputs"])
  grads = jax.jit(jax.vmap(jax.grad(lambda p, x: loss(p, x)[0]), in_axes=(None, 0)))(
    state.params, rest
  )
  weights = jax.tree.map(lambda w: np.asarray(w)[kept], task.compiled.leaf_weights(labels))
  want = jax.tree.map(
    lambda p, g, w: p - 0.1 * np.tensordot(w, g, axes=1) / len(examples),
    state.params,
    grads,
    weights,
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new.params, want
  )
  np.testing.assert_array_equal(np.asarray(summary.applied_weights)[1], 0)
  body = rec.step_body(jax.device_get(summary), [e.id for e in examples])
  assert body["dropped"] == [{"id": "bad-0", "reason": "non-finite loss"}]
  assert rec.view_step(body).dropped == (("bad-0", "non-finite loss"),)


def test_fail_refuses_a_step_with_a_non_finite_example_and_names_it(tmp_path, authorities):
  task, examples, _ = _inf_task(tmp_path, authorities, "fail")
  with pytest.raises(NonFiniteError, match=r"bad-0 \(non-finite loss\)") as failed:
    task.step(task.init(), *task.make_batch(examples))
  assert "ok-0" not in str(failed.value) and "drop_example" in str(failed.value)


def test_lineage_query_answers_which_examples_reached_a_group_as_applied(windowed_run):
  import json

  from click.testing import CliRunner

  from aqgov.cli import main

  *_, run_dir = windowed_run
  applied = CliRunner().invoke(
    main, ["lineage", "query", str(run_dir), "--group", "core", "--json"]
  )
  policy = CliRunner().invoke(
    main, ["lineage", "query", str(run_dir), "--group", "core", "--json", "--policy"]
  )
  assert applied.exit_code == 0 and policy.exit_code == 0, applied.output + policy.output
  steps = lambda out: {json.loads(line)["step"] for line in out.splitlines()}  # noqa: E731
  assert steps(applied.output) == set(range(1, WINDOW_STEPS + 1)) - {3, 4, 5, 7, 10, 11}
  assert steps(policy.output) == set(range(1, WINDOW_STEPS + 1))
  table = CliRunner().invoke(
    main, ["lineage", "query", str(run_dir), "--group", "core", "--policy"]
  )
  assert "the policy allowed" in " ".join(table.output.split())
