"""A mixture-of-experts transformer trained governed: per-expert groups, sensitive examples routed
to one expert, the lineage's per-expert reach, and a batch-coupled capacity router refused."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from click.testing import CliRunner

import aqgov
from aqgov.cli import main
from aqgov.documents._document_type import sign, write
from aqgov.documents._keys import TrustStore
from aqgov.entropy import expert_utilisation
from aqgov.errors import BatchCouplingError
from aqgov.examples import moe, sample
from aqgov.examples.demo import create_authorities
from aqgov.lineage import GovernedRun, verify_lineage
from aqgov.policy import POLICY, Policy, compile_policy
from aqgov.routing import routed_value_and_grad

SMALL = {"seq_len": 16, "d_model": 16, "num_heads": 2, "num_experts": 4, "expert_dim": 16}
CONFIG = moe.Config(**SMALL)
SENSITIVE = [0, 2, 4, 7]  # sample examples with sensitivity_tier >= 2 and a known license
ORDINARY = [1, 3, 6, 9]


@pytest.fixture(scope="module")
def authorities(tmp_path_factory):
  return create_authorities(tmp_path_factory.mktemp("authorities"))


def _start(tmp_path, authorities):
  policy = Policy.from_toml(moe.policy_text(CONFIG))
  signed = write(POLICY, sign(POLICY, policy, authorities.keys["acme-data"]), tmp_path / "p.signed")
  return GovernedRun.start(
    tmp_path / "run",
    task="aqgov.examples.moe:make_task",
    task_config={**SMALL, "learning_rate": 1e-2},
    policies=[signed],
    manifests=[m for m in authorities.manifests if "acme-data" in str(m)],
    trust=authorities.public_keys,
    checkpoint_every=100,
  )


@pytest.mark.slow
def test_the_moe_trains_governed_and_sensitive_examples_shape_one_expert_only(
  tmp_path, authorities
):
  run = _start(tmp_path, authorities)
  examples = sample.examples()
  mixed = [examples[i] for i in SENSITIVE + ORDINARY]
  losses = [float(run.step(mixed).loss) for _ in range(4)]
  assert losses[-1] < losses[0]
  compiled = run.task.compiled
  before = jax.device_get(run.state.params)
  summary = jax.device_get(run.step([examples[i] for i in SENSITIVE]))
  after = jax.device_get(run.state.params)
  expert2 = compiled.group_names.index("expert[2]")
  assert np.all(summary.weights[:, expert2] == 1.0)
  assert np.all(np.delete(summary.weights, expert2, axis=1) == 0.0)
  # strict mode: Adam's momentum from the mixed steps moves nothing the sensitive batch did not reach
  for path in compiled.leaf_paths:
    b, a = _at(before, path), _at(after, path)
    if path.endswith(("moe/w_in", "moe/w_out")):
      np.testing.assert_array_equal(np.delete(a, 2, axis=0), np.delete(b, 2, axis=0))
      assert np.any(a[2] != b[2])
    else:
      np.testing.assert_array_equal(a, b, err_msg=path)
  run.close()
  keys = TrustStore.from_paths(sorted((tmp_path / "run" / "keys").glob("*.pub")))
  assert verify_lineage(tmp_path / "run", keys).closed

  def reach(group):
    out = CliRunner().invoke(
      main, ["lineage", "query", str(tmp_path / "run"), "--group", group, "--json"]
    )
    assert out.exit_code == 0, out.output
    return [json.loads(line) for line in out.output.splitlines()]

  sensitive_ids = {examples[i].id for i in SENSITIVE}
  rows = reach("expert[2]")
  assert {r["example_id"] for r in rows} == {e.id for e in mixed}
  assert {r["example_id"] for r in rows if r["step"] == 5} == sensitive_ids
  for group in ("expert[0]", "expert[1]", "expert[3]", "head[0]", "shared"):
    assert not sensitive_ids & {r["example_id"] for r in reach(group)}, group
  table = CliRunner().invoke(
    main, ["lineage", "query", str(tmp_path / "run"), "--group", "expert[2]"]
  )
  assert table.exit_code == 0 and "expert[2]" in table.output


def _at(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return np.asarray(tree)


def test_a_capacity_router_that_drops_tokens_by_batch_competition_is_refused():
  params = moe.init(jax.random.key(0), CONFIG)
  taxonomy = sample.taxonomies()["acme-data"]
  compiled = compile_policy(Policy.from_toml(moe.policy_text(CONFIG)), params, taxonomy)
  labels = taxonomy.encode(
    [{"license_class": "cc-by", "sensitivity_tier": 0, "jurisdictions": [], "source": "x"}] * 2
  )
  tokens = jnp.ones((2, CONFIG.seq_len + 1), jnp.int32)
  for strategy in ("auto", "cotangent", "per_example"):
    fn = routed_value_and_grad(
      functools.partial(moe.capacity_loss, config=CONFIG), compiled, strategy
    )
    with pytest.raises(BatchCouplingError, match="expert capacity is shared by the batch"):
      fn(params, tokens, labels)
  fn = routed_value_and_grad(functools.partial(moe.example_loss, config=CONFIG), compiled)
  assert fn.strategy(params, tokens) == "cotangent"


def test_expert_utilisation_is_one_for_balanced_experts_and_zero_for_one_expert():
  balanced = jnp.full((3, 5, 4), 0.25)
  np.testing.assert_allclose(expert_utilisation(balanced), 1.0, rtol=1e-6)
  collapsed = jax.nn.one_hot(jnp.zeros((6,), jnp.int32), 4)
  np.testing.assert_allclose(expert_utilisation(collapsed), 0.0, atol=1e-7)
  two = jnp.asarray([[0.5, 0.5, 0.0, 0.0]] * 3)
  np.testing.assert_allclose(expert_utilisation(two), np.log(2) / np.log(4), rtol=1e-6)
  with pytest.raises(ValueError, match="at least 2 experts"):
    expert_utilisation(jnp.ones((3, 1)))
  params = moe.init(jax.random.key(1), CONFIG)
  tokens = jnp.ones((CONFIG.seq_len + 1,), jnp.int32)
  aux = jax.jit(lambda p, x: moe.example_loss(p, x, CONFIG, True)[1])(params, tokens)
  value = expert_utilisation(aux["router"]["blocks/0"])
  assert 0.0 <= float(value) <= 1.0
  assert aqgov.entropy.METRICS[-1] == "expert_utilisation"


def test_a_profile_bounds_the_routers_load_entropy_and_acts_on_its_group():
  profile = aqgov.EntropyProfile.from_toml("""
name = "moe-load"
[[representation]]
path = "router/blocks/*"
group = "shared"
kind = "router"
[[bound]]
group = "shared"
metric = "expert_utilisation"
low = 1.01
action = "pause"
""")
  params = moe.init(jax.random.key(0), CONFIG)
  taxonomy = sample.taxonomies()["acme-data"]
  compiled = compile_policy(Policy.from_toml(moe.policy_text(CONFIG)), params, taxonomy)
  labels = taxonomy.encode(
    [{"license_class": "cc-by", "sensitivity_tier": 0, "jurisdictions": [], "source": "x"}] * 3
  )
  tokens = jax.random.randint(jax.random.key(1), (3, CONFIG.seq_len + 1), 0, 256)
  loss = functools.partial(moe.example_loss, config=CONFIG, with_aux=True)
  (_, aux), grads = routed_value_and_grad(loss, compiled, has_aux=True)(params, tokens, labels)
  measured = aqgov.measure(profile, compiled, grads=grads, representations=aux)
  load = float(measured["expert_utilisation/shared"])
  assert 0.0 < load <= 1.0  # a normalised entropy: no router load reaches the bound of 1.01
  tx = aqgov.enforce(profile, compiled, optax.sgd(0.1))
  updates, _ = tx.update(grads, tx.init(params), params, measurements=measured, step=1)
  shared = compiled.group_names.index("shared")
  paused = [u for u, g in zip(jax.tree.leaves(updates), compiled.leaf_group) if g == shared]
  assert paused and all(float(jnp.abs(u).max()) == 0.0 for u in paused)
