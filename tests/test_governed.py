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
