"""`route` and `strict` as Optax transforms: routed means of per-example updates, in any chain."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import aqgov
from aqgov.errors import RoutingError
from aqgov.routing._transforms import reached

import routed_models as rm

pytestmark = pytest.mark.filterwarnings("ignore::aqgov.policy.UncoveredParametersWarning")


@pytest.mark.parametrize("name", sorted(rm.MODELS))
@given(data=st.data())
def test_route_equals_brute_force_routed_mean(name, data):
  model = rm.MODELS[name]
  params, batch, compiled, labels = rm.draw_case(data, model)
  per_example = rm.per_example_grads(model.loss)(params, batch)
  tx = aqgov.route(compiled)
  got, _ = tx.update(per_example, tx.init(params), params, labels=labels)
  want, _ = rm.brute_force(model.loss, compiled, params, batch, labels)
  rm.assert_matches(compiled, got, want)


OPTIMIZERS = {
  "sgd": lambda: optax.sgd(0.1, momentum=0.9),
  "adamw": lambda: optax.adamw(1e-2, weight_decay=1e-2),
  "lion": lambda: optax.lion(1e-3),
  "sophia": lambda: optax.contrib.sophia(1e-2, update_interval=1),
}


MLP_POLICY = """
name = "p"
[groups]
body = ["l0/**", "l1/**"]
head = ["head/**"]
[[rules]]
when = "kind == 'k1'"
route = { head = 1.0 }
[[rules]]
when = "kind == 'k2'"
route = { body = 0.25, head = 0.5 }
[default]
route = { body = 1.0, head = 1.0 }
"""
_STEPS: dict = {}


def _steps(opt):
  """Jitted (chain(route, opt).update, opt.update), built once per optimizer."""
  if opt not in _STEPS:
    model = rm.MODELS["mlp"]
    params = model.init(jax.random.key(0))
    compiled = aqgov.compile_policy(aqgov.Policy.from_toml(MLP_POLICY), params, rm.TAXONOMY)
    chained, plain = optax.chain(aqgov.route(compiled), OPTIMIZERS[opt]()), OPTIMIZERS[opt]()
    # sophia estimates the curvature of `obj_fn` (here the batch's mean loss); the others ignore it
    objective = lambda b: lambda p: jnp.mean(jax.vmap(model.loss, (None, 0))(p, b))
    _STEPS[opt] = (
      compiled,
      chained,
      plain,
      jax.jit(lambda u, s, p, lab, b: chained.update(u, s, p, labels=lab, obj_fn=objective(b))),
      jax.jit(lambda g, s, p, b: plain.update(g, s, p, obj_fn=objective(b))),
    )
  return _STEPS[opt]


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@settings(max_examples=10)
@given(seed=st.integers(0, 2**16), labels=rm.label_lists())
def test_route_in_chain_equals_optimizer_on_brute_force_gradient(opt, seed, labels):
  model = rm.MODELS["mlp"]
  compiled, chained, plain, chained_step, plain_step = _steps(opt)
  params = model.init(jax.random.key(seed))
  batch = model.batch(jax.random.key(seed + 1), rm.B)
  labels = rm.SPACE.encode(labels)
  s_chained, s_plain = chained.init(params), plain.init(params)
  for _ in range(2):  # two steps: the optimizer state must evolve identically
    per_example = rm.per_example_grads(model.loss)(params, batch)
    got, s_chained = chained_step(per_example, s_chained, params, labels, batch)
    routed, _ = rm.brute_force(model.loss, compiled, params, batch, labels)
    routed = jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), routed)
    want, s_plain = plain_step(routed, s_plain, params, batch)
    # float32 rounding of the gradient (and of Sophia's Hutchinson curvature, which can nearly
    # cancel) is amplified by normalising optimizers: compare against the update's scale
    scale = max(float(np.max(np.abs(w))) for w in jax.tree.leaves(want))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-3 * scale)
    params = optax.apply_updates(params, got)


@pytest.mark.parametrize("name", ["mlp", "attention"])
@settings(max_examples=10)
@given(data=st.data())
def test_example_routed_away_from_a_group_contributes_nothing(name, data):
  model = rm.MODELS[name]
  params, batch, compiled, labels = rm.draw_case(data, model)
  weights = np.asarray(compiled.group_weights(labels))
  away = [(i, g) for i in range(rm.B) for g in range(compiled.num_groups) if weights[i, g] == 0.0]
  assume(away)
  i, g = data.draw(st.sampled_from(away), label="example, group")
  key = jax.random.key(data.draw(st.integers(0, 2**16), label="perturbation"))
  other = model.batch(key, rm.B)
  perturbed = jax.tree.map(lambda x, y: x.at[i].set(y[i]), batch, other)
  tx = aqgov.route(compiled)
  before, _ = tx.update(
    rm.per_example_grads(model.loss)(params, batch), tx.init(params), labels=labels
  )
  after, _ = tx.update(
    rm.per_example_grads(model.loss)(params, perturbed), tx.init(params), labels=labels
  )
  for b, a, group in zip(jax.tree.leaves(before), jax.tree.leaves(after), compiled.leaf_group):
    if group == g:
      assert np.asarray(b).tobytes() == np.asarray(a).tobytes()


@settings(max_examples=10)
@given(data=st.data())
def test_strict_update_is_the_optimizer_update_on_reached_parameters_and_zero_elsewhere(data):
  model = rm.MODELS["mlp"]
  params, batch, compiled, labels = rm.draw_case(data, model)
  loose = aqgov.routed(compiled, optax.adam(1e-2))
  tight = aqgov.routed(compiled, optax.adam(1e-2), strict=True)
  s_loose, s_tight = loose.init(params), tight.init(params)
  steps = [rm.SPACE.encode([{"t": {"kind": "k0", "tier": 0}}] * rm.B), labels]
  for step_labels in steps:
    per_example = rm.per_example_grads(model.loss)(params, batch)
    u_loose, s_loose = loose.update(per_example, s_loose, params, labels=step_labels)
    u_tight, s_tight = tight.update(per_example, s_tight, params, labels=step_labels)
    hit = reached(compiled.leaf_weights(step_labels))
    for lo, ti, h in zip(jax.tree.leaves(u_loose), jax.tree.leaves(u_tight), jax.tree.leaves(hit)):
      np.testing.assert_array_equal(ti, np.where(h, lo, 0.0))


def test_strict_freezes_a_group_that_momentum_would_still_move():
  model = rm.MODELS["mlp"]
  params = model.init(jax.random.key(0))
  batch = model.batch(jax.random.key(1), rm.B)
  compiled = aqgov.compile_policy(aqgov.Policy.from_toml(MLP_POLICY), params, rm.TAXONOMY)
  everything = rm.SPACE.encode([{"t": {"kind": "k0", "tier": 0}}] * rm.B)
  head_only = rm.SPACE.encode([{"t": {"kind": "k1", "tier": 0}}] * rm.B)
  per_example = rm.per_example_grads(model.loss)(params, batch)
  results = {}
  for strict in (False, True):
    tx = aqgov.routed(compiled, optax.adam(1e-2), strict=strict)
    state = tx.init(params)
    _, state = tx.update(per_example, state, params, labels=everything)
    results[strict], _ = tx.update(per_example, state, params, labels=head_only)
  assert float(jnp.abs(results[False]["l0"]["w"]).max()) > 1e-3  # Adam's momentum moves the body
  assert not np.any(np.asarray(results[True]["l0"]["w"]))  # strict mode keeps it still
  assert not np.any(np.asarray(results[True]["l1"]["b"]))
  np.testing.assert_array_equal(results[True]["head"]["w"], results[False]["head"]["w"])


def test_route_update_without_labels_is_refused():
  params = rm.MODELS["mlp"].init(jax.random.key(0))
  compiled = aqgov.compile_policy(
    aqgov.Policy.from_toml(
      'name = "p"\n[groups]\nall = ["**"]\n[default]\nroute = { all = 1.0 }\n'
    ),
    params,
    rm.TAXONOMY,
  )
  tx = aqgov.route(compiled)
  per_example = jax.tree.map(lambda p: jnp.zeros((rm.B,) + p.shape), params)
  with pytest.raises(RoutingError, match="labels"):
    tx.update(per_example, tx.init(params))
  with pytest.raises(RoutingError, match="labels"):
    aqgov.strict(compiled).update(params, optax.EmptyState())


def test_route_refuses_updates_of_another_parameter_tree():
  params = rm.MODELS["mlp"].init(jax.random.key(0))
  compiled = aqgov.compile_policy(
    aqgov.Policy.from_toml(
      'name = "p"\n[groups]\nall = ["**"]\n[default]\nroute = { all = 1.0 }\n'
    ),
    params,
    rm.TAXONOMY,
  )
  labels = rm.SPACE.encode([None] * rm.B)
  other = {"l0": jax.tree.map(lambda p: jnp.zeros((rm.B,) + p.shape), params["l0"])}
  with pytest.raises(RoutingError, match="structure"):
    aqgov.route(compiled).update(other, optax.EmptyState(), labels=labels)
  unbatched = jax.tree.map(lambda p: jnp.zeros((rm.B + 1,) + p.shape), params)
  with pytest.raises(RoutingError, match="batch size"):
    aqgov.route(compiled).update(unbatched, optax.EmptyState(), labels=labels)


class SliceWeights(NamedTuple):
  """Stands in for a CompiledPolicy with sub-leaf groups, which compile_policy cannot build yet."""

  weights: Any

  def leaf_weights(self, labels):
    del labels
    return self.weights


@given(heads=st.integers(1, 3), data=st.data())
def test_route_and_strict_broadcast_weights_for_slices_of_a_leaf(heads, data):
  # A group that is a slice of a leaf gets a weight block broadcastable to the leaf:
  # [B, H, 1, 1] for one weight per attention head of a [H, 3, 2] kernel, [B, 2] per column.
  n = data.draw(st.integers(1, 4), label="batch")
  rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
  updates = rng.normal(size=(n, heads, 3, 2)).astype(np.float32)
  for shape in [(n, heads, 1, 1), (n, 2), (n,)]:
    w = rng.choice([0.0, 0.5, 1.0], size=shape).astype(np.float32)
    per_example = w.reshape(shape[:1] + (1,) * (4 - len(shape)) + shape[1:])
    compiled = SliceWeights({"attn": jnp.asarray(w)})
    got, _ = aqgov.route(compiled).update(
      {"attn": jnp.asarray(updates)}, optax.EmptyState(), labels={}
    )
    np.testing.assert_allclose(
      got["attn"], np.sum(per_example * updates, axis=0) / n, rtol=1e-6, atol=1e-7
    )
    masked, _ = aqgov.strict(compiled).update(
      {"attn": jnp.asarray(updates[0])}, optax.EmptyState(), labels={}
    )
    reached_any = np.any(per_example > 0, axis=0)
    np.testing.assert_array_equal(masked["attn"], np.where(reached_any, updates[0], 0.0))


MESHES = {
  "explicit axes": lambda: jax.make_mesh((8,), ("data",)),
  "auto axes": lambda: jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",)),
}


@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_route_on_a_batch_sharded_over_eight_devices_matches_one_device(mesh):
  model = rm.MODELS["mlp"]
  n = 8
  params = model.init(jax.random.key(0))
  batch = model.batch(jax.random.key(1), n)
  compiled = aqgov.compile_policy(aqgov.Policy.from_toml(MLP_POLICY), params, rm.TAXONOMY)
  labels = rm.SPACE.encode(
    [{"t": {"kind": rm.KINDS[i % 3], "tier": 0}} if i % 4 else None for i in range(n)]
  )
  per_example = rm.per_example_grads(model.loss)(params, batch)
  tx = aqgov.routed(compiled, optax.adam(1e-2), strict=True)
  step = jax.jit(lambda u, s, p, lab: tx.update(u, s, p, labels=lab)[0])
  single = step(per_example, tx.init(params), params, labels)

  mesh = MESHES[mesh]()
  shard = lambda t: jax.device_put(t, NamedSharding(mesh, P("data")))
  replicate = lambda t: jax.device_put(t, NamedSharding(mesh, P()))
  sharded = step(shard(per_example), replicate(tx.init(params)), replicate(params), shard(labels))
  assert len(jax.tree.leaves(per_example)[0].sharding.device_set) == 1
  assert len(shard(per_example)["l0"]["w"].sharding.device_set) == 8
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
