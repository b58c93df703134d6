"""Forward visibility: a `visible = "routed"` group acts as zero for every example not routed to it.

Every strategy is held to brute force: a loop over examples, each differentiated at its own
parameters with the groups it may not see explicitly zeroed.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import aqgov
from aqgov.errors import PolicyError, UnsupportedPrimitiveError

import routed_models as rm

pytestmark = pytest.mark.filterwarnings("ignore::aqgov.policy.UncoveredParametersWarning")

QUARANTINE = """
name = "quarantine"
[groups]
body = ["body/**"]
adapter = { patterns = ["adapter/**"], visible = "routed" }
[[rules]]
when = "kind == 'k1'"
route = { adapter = 1.0 }
[default]
route = { body = 1.0 }
"""


def _loss_and_grads(fn, params, batch, labels):
  (loss, grads, norms) = jax.jit(fn)(params, batch, labels)
  return float(loss), grads, np.asarray(norms)


def _brute_loss(loss, compiled, params, batch, labels) -> float:
  n = jax.tree.leaves(batch)[0].shape[0]
  return float(
    np.mean(
      [
        loss(rm.seen_params(compiled, params, labels, i), jax.tree.map(lambda x: x[i], batch))
        for i in range(n)
      ]
    )
  )


@pytest.mark.parametrize("name", ["mlp", "conv", pytest.param("attention", marks=pytest.mark.slow)])
@pytest.mark.parametrize("strategy", ["per_example", "cotangent"])
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_every_strategy_equals_brute_force_with_random_visibility(name, strategy, data):
  model = rm.MODELS[name]
  params, batch, compiled, labels = rm.draw_case(data, model, visibility=True)
  want, want_norms = rm.brute_force(model.loss, compiled, params, batch, labels)
  fn = aqgov.routed_value_and_grad(model.loss, compiled, strategy, with_norms=True)
  loss, grads, norms = _loss_and_grads(fn, params, batch, labels)
  np.testing.assert_allclose(
    loss, _brute_loss(model.loss, compiled, params, batch, labels), rtol=1e-5
  )
  rm.assert_matches(compiled, grads, want)
  np.testing.assert_allclose(
    norms, want_norms, rtol=1e-4, atol=1e-5 * max(float(np.max(want_norms)), 1e-6)
  )


def _adapter_model():
  keys = jax.random.split(jax.random.key(0), 6)
  params = {
    "body": {"w1": jax.random.normal(keys[0], (4, 8)), "w2": jax.random.normal(keys[1], (8, 3))},
    "adapter": {
      "a": jax.random.normal(keys[2], (8, 8)) * 0.5,
      "b": jax.random.normal(keys[3], (8,)),
      "log_scale": jax.random.normal(keys[4], (8,)),
    },
  }
  batch = {"x": jax.random.normal(keys[5], (6, 4)), "y": jnp.ones((6, 3))}
  labels = rm.SPACE.encode([{"t": {"kind": f"k{i % 3}", "tier": 0}} for i in range(6)])
  return params, batch, labels


def _adapter_loss(p, ex):
  h = jnp.tanh(ex["x"] @ p["body"]["w1"])
  # a nonlinear use too: exp(0) = 1, so the hidden adapter's scale is not zero
  h = h + jax.nn.relu(h @ p["adapter"]["a"] + p["adapter"]["b"]) * jnp.exp(
    p["adapter"]["log_scale"]
  )
  return jnp.sum((h @ p["body"]["w2"] - ex["y"]) ** 2)


def test_a_hidden_adapter_is_exactly_zero_for_unrouted_examples_in_a_mixed_batch():
  params, batch, labels = _adapter_model()
  compiled = aqgov.compile_policy(aqgov.Policy.from_toml(QUARANTINE), params, rm.TAXONOMY)
  want, _ = rm.brute_force(_adapter_loss, compiled, params, batch, labels)
  for strategy in ("per_example", "cotangent", "auto"):
    fn = aqgov.routed_value_and_grad(_adapter_loss, compiled, strategy, with_norms=True)
    loss, grads, norms = _loss_and_grads(fn, params, batch, labels)
    np.testing.assert_allclose(
      loss, _brute_loss(_adapter_loss, compiled, params, batch, labels), rtol=1e-6
    )
    rm.assert_matches(compiled, grads, want)
    adapter = compiled.group_names.index("adapter")
    assert (norms[[0, 2, 3, 5], adapter] == 0).all() and (norms[[1, 4], adapter] > 0).all()
  assert aqgov.routed_value_and_grad(_adapter_loss, compiled).strategy(params, batch) == "cotangent"


def test_visibility_changes_the_value_not_only_the_gradient():
  params, batch, labels = _adapter_model()
  plain = aqgov.Policy.from_toml(
    QUARANTINE.replace('{ patterns = ["adapter/**"], visible = "routed" }', '["adapter/**"]')
  )
  seen = aqgov.compile_policy(plain, params, rm.TAXONOMY)
  hidden = aqgov.compile_policy(aqgov.Policy.from_toml(QUARANTINE), params, rm.TAXONOMY)
  loss_seen = aqgov.routed_value_and_grad(_adapter_loss, seen)(params, batch, labels)[0]
  loss_hidden = aqgov.routed_value_and_grad(_adapter_loss, hidden)(params, batch, labels)[0]
  assert float(loss_seen) != pytest.approx(float(loss_hidden))
  no_adapter = jax.tree.map(jnp.zeros_like, params["adapter"])
  k0 = jax.tree.map(lambda x: x[0], batch)  # kind k0: not routed to the adapter
  np.testing.assert_allclose(
    jax.vmap(lambda ex: _adapter_loss({**params, "adapter": no_adapter}, ex))(batch)[0],
    _adapter_loss({**params, "adapter": no_adapter}, k0),
    rtol=1e-6,
  )


def test_groups_sharing_a_visibility_may_combine_and_stay_on_the_fast_path():
  params, batch, labels = _adapter_model()
  params["adapter"]["lora_b"] = jnp.ones((8, 8)) * 0.1

  def lora_loss(p, ex):  # a low-rank adapter: a product of two hidden leaves of one group
    h = jnp.tanh(ex["x"] @ p["body"]["w1"])
    h = h + h @ (p["adapter"]["a"] @ p["adapter"]["lora_b"])
    return jnp.sum((h @ p["body"]["w2"] - ex["y"]) ** 2)

  compiled = aqgov.compile_policy(aqgov.Policy.from_toml(QUARANTINE), params, rm.TAXONOMY)
  fn = aqgov.routed_value_and_grad(lora_loss, compiled, "cotangent", with_norms=True)
  want, _ = rm.brute_force(lora_loss, compiled, params, batch, labels)
  _, grads, _ = _loss_and_grads(fn, params, batch, labels)
  rm.assert_matches(compiled, grads, want)


def test_a_use_mixing_hidden_and_shared_parameters_falls_back_exactly():
  params, batch, labels = _adapter_model()

  def gated(p, ex):  # the hidden adapter's weight times a shared one: no exact masked use
    h = jnp.tanh(ex["x"] @ p["body"]["w1"])
    h = h + h @ (p["adapter"]["a"] * p["body"]["w1"][0])
    return jnp.sum((h @ p["body"]["w2"] - ex["y"]) ** 2)

  compiled = aqgov.compile_policy(aqgov.Policy.from_toml(QUARANTINE), params, rm.TAXONOMY)
  with pytest.raises(UnsupportedPrimitiveError, match="different visibility"):
    aqgov.routed_value_and_grad(gated, compiled, "cotangent")(params, batch, labels)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    fn = aqgov.routed_value_and_grad(gated, compiled, "auto", with_norms=True)
    _, grads, _ = _loss_and_grads(fn, params, batch, labels)
  assert any("visibility" in str(w.message) for w in caught)
  want, _ = rm.brute_force(gated, compiled, params, batch, labels)
  rm.assert_matches(compiled, grads, want)


def test_a_hidden_leaf_used_inside_scan_falls_back_exactly():
  model = rm.MODELS["scan"]
  params = model.init(jax.random.key(3))
  batch = model.batch(jax.random.key(4), rm.B)
  policy = aqgov.Policy.from_toml("""
name = "p"
[groups]
embed = ["embed/**"]
stack = { patterns = ["stack/**"], visible = "routed" }
head = ["head/**"]
[[rules]]
when = "kind == 'k1'"
route = { stack = 1.0, head = 1.0 }
[default]
route = { embed = 1.0, head = 1.0 }
""")
  compiled = aqgov.compile_policy(policy, params, rm.TAXONOMY)
  labels = rm.SPACE.encode([{"t": {"kind": f"k{i % 2}", "tier": 0}} for i in range(rm.B)])
  with pytest.warns(UserWarning, match="visibility"):
    fn = aqgov.routed_value_and_grad(model.loss, compiled, "auto", with_norms=True)
    assert fn.strategy(params, batch) == "per_example"
  want, _ = rm.brute_force(model.loss, compiled, params, batch, labels)
  _, grads, _ = _loss_and_grads(fn, params, batch, labels)
  rm.assert_matches(compiled, grads, want)


# -- the policy format --------------------------------------------------------------------------


def test_visibility_is_part_of_the_signed_form_and_round_trips():
  policy = aqgov.Policy.from_toml(QUARANTINE)
  assert policy.routed_visibility == ("adapter",)
  assert aqgov.Policy.from_toml(policy.to_toml()) == policy
  assert aqgov.Policy.from_dict(policy.to_dict()) == policy
  always = aqgov.Policy.from_toml(QUARANTINE.replace(', visible = "routed"', ""))
  assert always.routed_visibility == () and always.id != policy.id
  # declaring the default changes nothing, not even the id
  explicit = aqgov.Policy.from_toml(QUARANTINE.replace('visible = "routed"', 'visible = "always"'))
  assert explicit == always and explicit.id == always.id


@pytest.mark.parametrize(
  "spec, message",
  [
    ('{ patterns = ["adapter/**"], visible = "sometimes" }', "is not one of"),
    ('{ patterns = ["adapter/**"], seen = "routed" }', "unknown key"),
    ('{ visible = "routed" }', "non-empty list of glob patterns"),
  ],
)
def test_a_malformed_group_table_is_refused_with_the_reason(spec, message):
  with pytest.raises(PolicyError, match=message):
    aqgov.Policy.from_toml(
      QUARANTINE.replace('{ patterns = ["adapter/**"], visible = "routed" }', spec)
    )


def test_composition_hides_a_group_when_any_policy_hides_it():
  params, _, labels = _adapter_model()
  hiding = aqgov.Policy.from_toml(QUARANTINE)
  sharing = aqgov.Policy.from_toml(
    QUARANTINE.replace(', visible = "routed"', "")
    .replace('name = "quarantine"', 'name = "other"')
    .replace("route = { body = 1.0 }", "route = { body = 1.0, adapter = 0.5 }")
  )
  alone = aqgov.compile_policy(sharing, params, rm.TAXONOMY)
  assert not alone.has_visibility
  both = aqgov.compile_policy([sharing, hiding], params, rm.TAXONOMY)
  adapter = both.group_names.index("adapter")
  visible = np.asarray(both.group_visibility(labels))
  np.testing.assert_array_equal(visible[:, adapter], [False, True, False, False, True, False])
  assert visible[:, both.group_names.index("body")].all()
  assert "unseen" in aqgov.policy.explain(both)


def test_the_lineage_records_what_each_example_saw(tmp_path):
  from aqgov.lineage._record import step_body, view_step

  params, batch, labels = _adapter_model()
  compiled = aqgov.compile_policy(aqgov.Policy.from_toml(QUARANTINE), params, rm.TAXONOMY)
  import optax

  _, step = aqgov.governed_step(_adapter_loss, compiled, optax.sgd(0.1))
  state = aqgov.lineage.TrainState(
    jnp.zeros((), jnp.int32),
    params,
    optax.sgd(0.1).init(params),
    aqgov.governed.GovernanceState(jnp.zeros((compiled.num_groups,), bool)),
  )
  _, summary = jax.jit(step)(
    state, {"inputs": batch, "index": jnp.arange(6, dtype=jnp.int32)}, labels
  )
  view = view_step(step_body(summary, [f"ex-{i}" for i in range(6)]))
  np.testing.assert_array_equal(view.seen, np.asarray(compiled.group_visibility(labels)))
  assert not view.seen.all()
