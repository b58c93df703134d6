"""`routed_value_and_grad`: every strategy equals a brute-force loop over examples."""

from __future__ import annotations

import re
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import aqgov
from aqgov.errors import BatchCouplingError, RoutingError, UnsupportedPrimitiveError
from aqgov.examples import tiny_lm as tiny_lm
from aqgov.routing import _cotangent as cotangent
from aqgov.routing._coupling import check_per_example
from aqgov.routing._value_and_grad import group_norms, per_example_value_and_grad

import routed_models as rm

pytestmark = pytest.mark.filterwarnings("ignore::aqgov.policy.UncoveredParametersWarning")

# Each strategy as fn(params, batch, leaf_weights), jitted once per model: the policy enters as
# weights, so random policies do not recompile. `routed_value_and_grad` adds only
# `compiled.leaf_weights(labels)` and the group reduction of the norms, tested below.
STRATEGY_FNS = {
  "per_example": lambda loss: per_example_value_and_grad(loss, with_norms=True),
  "per_example, microbatch=2": lambda loss: per_example_value_and_grad(loss, microbatch=2),
  "cotangent": lambda loss: cotangent.cotangent_value_and_grad(loss),
  "cotangent with norms": lambda loss: cotangent.cotangent_value_and_grad(loss, with_norms=True),
}
_JITTED: dict = {}


def strategy_fn(model_name: str, strategy: str):
  key = (model_name, strategy)
  if key not in _JITTED:
    _JITTED[key] = jax.jit(STRATEGY_FNS[strategy](rm.MODELS[model_name].loss))
  return _JITTED[key]


def mean_loss(loss, params, batch) -> float:
  return float(np.mean([loss(params, jax.tree.map(lambda x: x[i], batch)) for i in range(rm.B)]))


def assert_norms(got, want) -> None:
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(float(np.max(want)), 1e-6))


@pytest.mark.parametrize(
  "name", ["conv", "mlp", "scan", pytest.param("attention", marks=pytest.mark.slow)]
)
@settings(max_examples=12)
@given(data=st.data())
def test_every_strategy_equals_brute_force_under_random_policies(name, data):
  model = rm.MODELS[name]
  params, batch, compiled, labels = rm.draw_case(data, model)
  weights = compiled.leaf_weights(labels)
  want, want_norms = rm.brute_force(model.loss, compiled, params, batch, labels)
  want_loss = mean_loss(model.loss, params, batch)
  for strategy in STRATEGY_FNS:
    out = strategy_fn(name, strategy)(params, batch, weights)
    np.testing.assert_allclose(out[0], want_loss, rtol=1e-5)
    rm.assert_matches(compiled, out[1], want)
    if len(out) == 3:
      assert_norms(group_norms(compiled, out[2]), want_norms)


POLICY = """
name = "p"
[groups]
embed = ["embed/**"]
core = ["blocks/**", "adapter/**"]
head = ["head/**"]
[[rules]]
when = "kind == 'k1'"
route = { head = 1.0 }
[[rules]]
when = "kind == 'k2' and tier >= 2"
route = { embed = 0.25, core = 0.5 }
[default]
route = { embed = 1.0, core = 1.0, head = 1.0 }
"""
LM_PARAMS = rm.MODELS["attention"].init(jax.random.key(0))
LM_COMPILED = aqgov.compile_policy(aqgov.Policy.from_toml(POLICY), LM_PARAMS, rm.TAXONOMY)


def lm_loss_with_aux(params, example):
  loss, aux = tiny_lm.example_loss(params, example["tokens"], rm.LM, with_aux=True)
  return loss, aux["representations"]["adapter"]


_PUBLIC: dict = {}


def public_fn(strategy: str, microbatch=None):
  key = (strategy, microbatch)
  if key not in _PUBLIC:
    _PUBLIC[key] = jax.jit(
      aqgov.routed_value_and_grad(
        lm_loss_with_aux,
        LM_COMPILED,
        strategy,
        has_aux=True,
        with_norms=True,
        microbatch=microbatch,
      )
    )
  return _PUBLIC[key]


@pytest.mark.parametrize("strategy", ["auto", "cotangent", "per_example"])
@settings(max_examples=6)
@given(seed=st.integers(0, 2**16), labels=rm.label_lists())
def test_routed_value_and_grad_equals_brute_force_with_aux_and_norms(strategy, seed, labels):
  model = rm.MODELS["attention"]
  params = model.init(jax.random.key(seed))
  batch = model.batch(jax.random.key(seed + 1), rm.B)
  labels = rm.SPACE.encode(labels)
  (loss, aux), grads, norms = public_fn(strategy)(params, batch, labels)
  want, want_norms = rm.brute_force(model.loss, LM_COMPILED, params, batch, labels)
  want_aux = jax.vmap(lm_loss_with_aux, (None, 0))(params, batch)[1]
  np.testing.assert_allclose(loss, mean_loss(model.loss, params, batch), rtol=1e-5)
  # float32 rounding differs between programs; compare against the representation's scale
  np.testing.assert_allclose(aux, want_aux, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(want_aux))))
  rm.assert_matches(LM_COMPILED, grads, want)
  assert norms.shape == (rm.B, LM_COMPILED.num_groups)
  assert_norms(norms, want_norms)


@pytest.mark.parametrize("strategy", list(STRATEGY_FNS))
@pytest.mark.parametrize("name", ["mlp", "scan"])
@settings(max_examples=8)
@given(data=st.data())
def test_example_routed_away_from_a_group_leaves_its_gradient_bitwise_unchanged(
  name, strategy, data
):
  model = rm.MODELS[name]
  params, batch, compiled, labels = rm.draw_case(data, model)
  weights = np.asarray(compiled.group_weights(labels))
  away = [(i, g) for i in range(rm.B) for g in range(compiled.num_groups) if weights[i, g] == 0.0]
  assume(away)
  i, g = data.draw(st.sampled_from(away), label="example, group")
  other = model.batch(jax.random.key(data.draw(st.integers(0, 2**16), label="perturbation")), rm.B)
  perturbed = jax.tree.map(lambda x, y: x.at[i].set(y[i]), batch, other)
  fn = strategy_fn(name, strategy)
  before = fn(params, batch, compiled.leaf_weights(labels))[1]
  after = fn(params, perturbed, compiled.leaf_weights(labels))[1]
  for b, a, group in zip(jax.tree.leaves(before), jax.tree.leaves(after), compiled.leaf_group):
    if group == g:
      assert np.asarray(b).tobytes() == np.asarray(a).tobytes()


@pytest.mark.parametrize(
  "strategy, microbatch", [("cotangent", None), ("per_example", None), ("per_example", 2)]
)
def test_batch_sharded_over_eight_devices_gives_the_one_device_result(strategy, microbatch):
  model = rm.MODELS["mlp"]
  n = 8
  params = model.init(jax.random.key(3))
  batch = model.batch(jax.random.key(4), n)
  labels = rm.SPACE.encode(
    [{"t": {"kind": rm.KINDS[i % 3], "tier": i % 4}} if i % 5 else None for i in range(n)]
  )
  compiled = aqgov.compile_policy(
    aqgov.Policy.from_toml(
      'name = "p"\n[groups]\nbody = ["l0/**", "l1/**"]\nhead = ["head/**"]\n'
      "[[rules]]\nwhen = \"kind == 'k1'\"\nroute = { head = 1.0 }\n"
      "[default]\nroute = { body = 0.5, head = 1.0 }\n"
    ),
    params,
    rm.TAXONOMY,
  )
  fn = jax.jit(
    aqgov.routed_value_and_grad(
      model.loss, compiled, strategy, with_norms=True, microbatch=microbatch
    )
  )
  single = fn(params, batch, labels)

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  shard = lambda t: jax.device_put(t, NamedSharding(mesh, P("data")))
  replicate = lambda t: jax.device_put(t, NamedSharding(mesh, P()))
  sharded_batch = shard(batch)
  assert len(sharded_batch["x"].sharding.device_set) == 8
  sharded = fn(replicate(params), sharded_batch, shard(labels))
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# -- refusing batch-coupled losses ----------------------------------------------------------------


class NNXNet(nnx.Module):
  def __init__(self, norm: str, rngs: nnx.Rngs):
    self.dense = nnx.Linear(4, 6, rngs=rngs)
    self.norm = (
      nnx.BatchNorm(6, use_running_average=False, rngs=rngs)
      if norm == "batch-train"
      else nnx.BatchNorm(6, use_running_average=True, rngs=rngs)
      if norm == "batch-eval"
      else nnx.LayerNorm(6, rngs=rngs)
    )
    self.head = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(jax.nn.relu(self.norm(self.dense(x))))


def nnx_case(norm: str):
  graphdef, params, rest = nnx.split(NNXNet(norm, nnx.Rngs(0)), nnx.Param, ...)

  def loss(p, ex):
    return rm._xent(nnx.merge(graphdef, p, rest)(ex["x"]), ex["y"])

  policy = aqgov.Policy.from_toml(
    'name = "n"\n[groups]\nbody = ["dense/**", "norm/**"]\nhead = ["head/**"]\n'
    "[[rules]]\nwhen = \"kind == 'k1'\"\nroute = { head = 1.0 }\n"
    "[default]\nroute = { body = 1.0, head = 0.5 }\n"
  )
  return params, loss, aqgov.compile_policy(policy, params, rm.TAXONOMY)


class LinenNet(linen.Module):
  train: bool

  @linen.compact
  def __call__(self, x):
    h = linen.BatchNorm(use_running_average=not self.train)(linen.Dense(6)(x))
    return linen.Dense(3)(jax.nn.relu(h))


def linen_case(train: bool):
  variables = LinenNet(train).init(jax.random.key(0), jnp.ones((2, 4)))

  def loss(p, ex):
    logits, _ = LinenNet(train).apply(
      {"params": p, "batch_stats": variables["batch_stats"]}, ex["x"], mutable=["batch_stats"]
    )
    return rm._xent(logits, ex["y"])

  policy = aqgov.Policy.from_toml(
    'name = "l"\n[groups]\nall = ["**"]\n[default]\nroute = { all = 1.0 }\n'
  )
  return variables["params"], loss, aqgov.compile_policy(policy, variables["params"], rm.TAXONOMY)


def _inputs(n=4):
  batch = rm.MODELS["mlp"].batch(jax.random.key(1), n)
  labels = rm.SPACE.encode([{"t": {"kind": rm.KINDS[i % 3], "tier": 0}} for i in range(n)])
  return batch, labels


@pytest.mark.parametrize("strategy", ["auto", "cotangent", "per_example"])
@pytest.mark.parametrize("flavour", ["nnx", "linen"])
def test_batchnorm_in_training_mode_is_refused(flavour, strategy):
  params, loss, compiled = nnx_case("batch-train") if flavour == "nnx" else linen_case(True)
  batch, labels = _inputs()
  fn = aqgov.routed_value_and_grad(loss, compiled, strategy)
  with pytest.raises(BatchCouplingError, match="use_running_average=True") as info:
    jax.jit(fn)(params, batch, labels)
  assert "training mode" in str(info.value) and "LayerNorm" in str(info.value)


@pytest.mark.parametrize("flavour", ["nnx", "linen"])
def test_batchnorm_with_running_averages_routes_like_brute_force(flavour):
  params, loss, compiled = nnx_case("batch-eval") if flavour == "nnx" else linen_case(False)
  batch, labels = _inputs()
  want, _ = rm.brute_force(loss, compiled, params, batch, labels)
  fn = aqgov.routed_value_and_grad(loss, compiled)
  assert fn.strategy(params, batch) == "cotangent"
  rm.assert_matches(compiled, jax.jit(fn)(params, batch, labels)[1], want)


@pytest.mark.parametrize("strategy", ["auto", "cotangent", "per_example"])
def test_nnx_model_with_layernorm_routes_like_brute_force(strategy):
  params, loss, compiled = nnx_case("layer")
  batch, labels = _inputs()
  want, want_norms = rm.brute_force(loss, compiled, params, batch, labels)
  _, grads, norms = jax.jit(aqgov.routed_value_and_grad(loss, compiled, strategy, with_norms=True))(
    params, batch, labels
  )
  rm.assert_matches(compiled, grads, want)
  assert_norms(norms, want_norms)


@pytest.mark.parametrize("strategy", ["auto", "per_example"])
def test_loss_with_a_collective_over_a_batch_axis_is_refused(strategy):
  params = rm.MODELS["mlp"].init(jax.random.key(0))
  compiled = aqgov.compile_policy(
    aqgov.Policy.from_toml(
      'name = "p"\n[groups]\nall = ["**"]\n[default]\nroute = { all = 1.0 }\n'
    ),
    params,
    rm.TAXONOMY,
  )

  def loss(p, ex):  # normalises by a batch mean: mixes examples
    x = ex["x"] - jax.lax.pmean(ex["x"], "batch")
    return rm._mlp_loss(p, {"x": x, "y": ex["y"]})

  batch, labels = _inputs()
  with pytest.raises(BatchCouplingError, match="collective"):
    aqgov.routed_value_and_grad(loss, compiled, strategy)(params, batch, labels)


# -- auto: falling back from constructs the cotangent strategy does not cover --------------------


def _solve_case():
  key = jax.random.split(jax.random.key(0), 2)
  params = {
    "a": jnp.eye(4) * 2.0 + 0.1 * jax.random.normal(key[0], (4, 4)),
    "w": jax.random.normal(key[1], (4, 3)),
  }

  def loss(p, ex):  # jnp.linalg.solve is a custom_linear_solve: differentiable, not transformed
    return rm._xent(jnp.linalg.solve(p["a"], ex["x"]) @ p["w"], ex["y"])

  policy = aqgov.Policy.from_toml(
    'name = "s"\n[groups]\nsolve = ["a"]\nread = ["w"]\n'
    "[[rules]]\nwhen = \"kind == 'k1'\"\nroute = { read = 1.0 }\n"
    "[default]\nroute = { solve = 1.0, read = 0.5 }\n"
  )
  return params, loss, aqgov.compile_policy(policy, params, rm.TAXONOMY)


def test_auto_falls_back_to_per_example_with_exactly_one_warning():
  params, loss, compiled = _solve_case()
  batch, labels = _inputs()
  fn = aqgov.routed_value_and_grad(loss, compiled, "auto")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    first = jax.jit(fn)(params, batch, labels)
    jax.jit(fn)(params, batch, labels)
    jax.jit(fn)(params, *_inputs(6))  # new shapes: planned again, still no second warning
  notices = [str(w.message) for w in caught if "aqgov:" in str(w.message)]
  assert notices == [
    "aqgov: cotangent routing does not cover custom_linear_solve; using per_example"
  ]
  assert fn.strategy(params, batch) == "per_example"
  want, _ = rm.brute_force(loss, compiled, params, batch, labels)
  rm.assert_matches(compiled, first[1], want)


def test_cotangent_strategy_refuses_what_it_does_not_cover():
  params, loss, compiled = _solve_case()
  batch, labels = _inputs()
  with pytest.raises(UnsupportedPrimitiveError, match="custom_linear_solve"):
    aqgov.routed_value_and_grad(loss, compiled, "cotangent")(params, batch, labels)


# -- arguments and memory -----------------------------------------------------------------------


def test_unknown_strategy_and_bad_microbatch_are_refused():
  loss = rm.MODELS["mlp"].loss
  with pytest.raises(RoutingError, match="unknown routing strategy"):
    aqgov.routed_value_and_grad(loss, LM_COMPILED, "fast")
  for bad in (0, -1, 2.5, True):
    with pytest.raises(RoutingError, match="microbatch"):
      aqgov.routed_value_and_grad(loss, LM_COMPILED, "per_example", microbatch=bad)
  with pytest.raises(RoutingError, match=re.escape("strategy='per_example'")):
    aqgov.routed_value_and_grad(loss, LM_COMPILED, "cotangent", microbatch=4)


def test_microbatching_bounds_the_memory_of_the_per_example_strategy():
  model = rm.MODELS["mlp"]
  params = model.init(jax.random.key(0))
  compiled = aqgov.compile_policy(
    aqgov.Policy.from_toml(
      'name = "p"\n[groups]\nall = ["**"]\n[default]\nroute = { all = 1.0 }\n'
    ),
    params,
    rm.TAXONOMY,
  )
  n = 256
  batch = model.batch(jax.random.key(1), n)
  labels = rm.SPACE.encode([{"t": {"kind": "k0", "tier": 0}}] * n)

  def temp_bytes(microbatch):
    fn = aqgov.routed_value_and_grad(model.loss, compiled, "per_example", microbatch=microbatch)
    return jax.jit(fn).lower(params, batch, labels).compile().memory_analysis().temp_size_in_bytes

  assert temp_bytes(8) < temp_bytes(None) / 4


def test_params_of_another_tree_are_refused():
  params = rm.MODELS["mlp"].init(jax.random.key(0))
  batch, labels = _inputs()
  with pytest.raises(RoutingError, match="structure the policy was compiled for"):
    aqgov.routed_value_and_grad(rm.MODELS["mlp"].loss, LM_COMPILED)(params, batch, labels)


# -- how batch coupling is detected --------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["nnx", "linen"])
def test_check_per_example_refuses_batchnorm_in_training_mode(flavour):
  params, loss, _ = nnx_case("batch-train") if flavour == "nnx" else linen_case(True)
  example = jax.tree.map(lambda x: x[0], _inputs()[0])
  with pytest.raises(BatchCouplingError, match=f"flax.{flavour}.*training mode"):
    check_per_example(loss, params, example)


@pytest.mark.parametrize("flavour", ["nnx", "linen"])
def test_check_per_example_accepts_batchnorm_in_eval_mode(flavour):
  params, loss, _ = nnx_case("batch-eval") if flavour == "nnx" else linen_case(False)
  example = jax.tree.map(lambda x: x[0], _inputs()[0])
  assert check_per_example(loss, params, example) is None


class LinenCallArgNet(linen.Module):
  @linen.compact
  def __call__(self, x, train: bool):
    return linen.BatchNorm()(linen.Dense(6)(x), use_running_average=not train)


def test_linen_batchnorm_put_in_training_mode_by_a_call_argument_is_refused():
  variables = LinenCallArgNet().init(jax.random.key(0), jnp.ones((2, 4)), False)

  def loss(p, ex):
    out = LinenCallArgNet().apply(
      {"params": p, "batch_stats": variables["batch_stats"]}, ex["x"], True, mutable=["batch_stats"]
    )[0]
    return jnp.sum(out)

  with pytest.raises(BatchCouplingError, match="training mode"):
    check_per_example(loss, variables["params"], {"x": jnp.ones(4)})


def test_nnx_module_closed_over_in_training_mode_is_refused():
  model = NNXNet("batch-train", nnx.Rngs(0))
  _, params, _ = nnx.split(model, nnx.Param, ...)

  def loss(p, ex):
    nnx.update(model, p)
    return rm._xent(model(ex["x"]), ex["y"])

  with pytest.raises(BatchCouplingError, match=r"flax.nnx BatchNorm at norm"):
    check_per_example(loss, params, jax.tree.map(lambda x: x[0], _inputs()[0]))


def test_psum_over_a_vmapped_axis_is_refused():
  params = rm.MODELS["mlp"].init(jax.random.key(0))

  def loss(p, ex):  # communicates over the axis the caller vmaps the per-example check over
    return rm._mlp_loss(p, {"x": ex["x"] - jax.lax.psum(ex["x"], "outer"), "y": ex["y"]})

  example = jax.tree.map(lambda x: x[:2], _inputs()[0])
  with pytest.raises(BatchCouplingError, match=r"psum over \['outer'\]"):
    jax.vmap(lambda ex: check_per_example(loss, params, ex) or 0.0, axis_name="outer")(example)


@pytest.mark.parametrize("strategy", ["auto", "per_example"])
def test_per_example_assertion_skips_the_checks(strategy):
  params, loss, compiled = linen_case(True)  # one example's batch statistics: the user's call
  batch, labels = _inputs()
  fn = aqgov.routed_value_and_grad(loss, compiled, strategy, per_example=True)
  _, grads = jax.jit(fn)(params, batch, labels)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_routing_leaves_a_running_profiler_untouched():
  params, loss, compiled = linen_case(False)
  batch, labels = _inputs()
  calls = []

  def profiler(frame, event, arg):
    calls.append(event)

  previous = sys.getprofile()
  sys.setprofile(profiler)
  try:
    aqgov.routed_value_and_grad(loss, compiled)(params, batch, labels)
    assert sys.getprofile() is profiler
  finally:
    sys.setprofile(previous)
  assert calls


def _clip_gradient(lo, hi):
  """The JAX docs' `clip_gradient`: identity forward, cotangent clipped (not linear in it)."""

  @jax.custom_vjp
  def clip(x):
    return x

  clip.defvjp(lambda x: (x, None), lambda _, g: (jnp.clip(g, lo, hi),))
  return clip


def test_a_custom_rule_nonlinear_in_its_cotangent_sees_each_examples_own_cotangent():
  clip = _clip_gradient(-0.1, 0.1)
  model = rm.MODELS["mlp"]

  def loss(p, ex):
    return model.loss(p, {**ex, "x": clip(ex["x"])}) + jnp.sum(clip(ex["x"] @ p["l0"]["w"]) ** 2)

  params = model.init(jax.random.key(0))
  batch = model.batch(jax.random.key(1), rm.B)
  compiled = rm.compiled_policy(
    ['name = "p"\n[groups]\nall = ["**"]\n[default]\nroute = { all = 1.0 }\n'], params
  )
  labels = rm.SPACE.encode([{"t": {"kind": "k0", "tier": 0}}] * rm.B)
  want, _ = rm.brute_force(loss, compiled, params, batch, labels)
  for strategy in ("per_example", "cotangent"):
    _, grads = aqgov.routed_value_and_grad(loss, compiled, strategy)(params, batch, labels)
    rm.assert_matches(compiled, grads, want)


def test_an_example_routed_away_from_every_group_never_poisons_the_step():
  w = jnp.abs(jax.random.normal(jax.random.key(2), (3, 4))) + 0.1
  params = {"w": w, "v": jnp.ones((4,))}

  def loss(p, ex):  # finite for an inf input (tanh saturates), but its gradient is NaN
    return jnp.sum(jnp.tanh(ex["x"] @ p["w"]) * p["v"])

  x = jax.random.normal(jax.random.key(3), (4, 3)).at[2, 0].set(jnp.inf)
  policy = 'name = "p"\n[groups]\nall = ["**"]\n[[rules]]\nwhen = "kind == \'k1\'"\nroute = {}\n[default]\nroute = { all = 1.0 }\n'
  compiled = rm.compiled_policy([policy], params)
  labels = rm.SPACE.encode([{"t": {"kind": k, "tier": 0}} for k in ("k0", "k0", "k1", "k0")])
  keep = jnp.array([0, 1, 3])
  want = jax.tree.map(
    lambda g: g * 3 / 4,
    jax.grad(lambda p: jnp.mean(jax.vmap(loss, (None, 0))(p, {"x": x[keep]})))(params),
  )
  for strategy in ("per_example", "cotangent"):
    loss_value, grads, norms = aqgov.routed_value_and_grad(
      loss, compiled, strategy, with_norms=True
    )(params, {"x": x}, labels)
    assert np.isfinite(float(loss_value))
    for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
      np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert np.all(np.isfinite(norms)) and float(norms[2].max()) == 0.0


def test_a_loss_that_is_not_a_scalar_is_refused_with_the_reason_by_every_strategy():
  model = rm.MODELS["mlp"]
  params = model.init(jax.random.key(0))
  batch = model.batch(jax.random.key(1), rm.B)
  compiled = rm.compiled_policy(
    ['name = "p"\n[groups]\nall = ["**"]\n[default]\nroute = { all = 1.0 }\n'], params
  )
  labels = rm.SPACE.encode([{"t": {"kind": "k0", "tier": 0}}] * rm.B)
  for strategy in ("per_example", "cotangent", "auto"):
    fn = aqgov.routed_value_and_grad(lambda p, ex: model.loss(p, ex)[None], compiled, strategy)
    with pytest.raises(RoutingError, match="one float scalar per example"):
      fn(params, batch, labels)


def test_labels_for_another_batch_size_are_refused_naming_both_sizes():
  model = rm.MODELS["mlp"]
  params = model.init(jax.random.key(0))
  batch = model.batch(jax.random.key(1), rm.B)
  compiled = rm.compiled_policy(
    ['name = "p"\n[groups]\nall = ["**"]\n[default]\nroute = { all = 1.0 }\n'], params
  )
  labels = rm.SPACE.encode([{"t": {"kind": "k0", "tier": 0}}] * (rm.B + 1))
  with pytest.raises(
    RoutingError, match=rf"labels describe \[{rm.B + 1}\] examples but the batch has {rm.B}"
  ):
    aqgov.routed_value_and_grad(model.loss, compiled)(params, batch, labels)
