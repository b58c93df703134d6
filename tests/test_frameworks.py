"""Equinox and Haiku models route exactly like plain pytrees: every strategy equals brute force.

Equinox: the parameters are `eqx.partition(model, eqx.is_inexact_array)[0]` and the loss
recombines them with the static part. Haiku: the parameters are `hk.transform(f).init(...)` and
the loss calls `apply`. Policies name groups by the paths these frameworks give their leaves.
"""

from __future__ import annotations

import equinox as eqx
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import aqgov

import routed_models as rm

pytestmark = [
  pytest.mark.filterwarnings("ignore::aqgov.policy.UncoveredParametersWarning"),
  pytest.mark.filterwarnings("ignore::UserWarning:equinox"),
]

STRATEGIES = ("per_example", "cotangent", "auto")


def _policy(first: str, rest: str, *, visible: bool = False) -> aqgov.Policy:
  rest_group = f'{{ patterns = ["{rest}"], visible = "routed" }}' if visible else f'["{rest}"]'
  return aqgov.Policy.from_toml(f"""
name = "frameworks"
[groups]
first = ["{first}"]
rest = {rest_group}
[[rules]]
when = "kind == 'k1'"
route = {{ first = 1.0 }}
[[rules]]
when = "kind == 'k2'"
route = {{ first = 0.5, rest = 1.0 }}
[default]
route = {{ first = 1.0, rest = 1.0 }}
""")


def _labels(n: int):
  return rm.SPACE.encode([{"t": {"kind": f"k{i % 3}", "tier": 0}} for i in range(n)])


def _assert_exact(loss, compiled, params, batch, labels, cotangent_expected: bool = True):
  want, want_norms = rm.brute_force(loss, compiled, params, batch, labels)
  for strategy in STRATEGIES:
    fn = aqgov.routed_value_and_grad(loss, compiled, strategy, with_norms=True)
    _, grads, norms = jax.jit(fn)(params, batch, labels)
    rm.assert_matches(compiled, grads, want)
    np.testing.assert_allclose(norms, want_norms, rtol=1e-4, atol=1e-5 * float(np.max(want_norms)))
  if cotangent_expected:
    assert aqgov.routed_value_and_grad(loss, compiled).strategy(params, batch) == "cotangent"


def _xent(logits, label):
  return -jax.nn.log_softmax(logits)[label]


# -- Equinox ----------------------------------------------------------------------------------


def _eqx_mlp():
  model = eqx.nn.MLP(6, 4, width_size=16, depth=2, key=jax.random.key(0))
  return eqx.partition(model, eqx.is_inexact_array)


def _eqx_cnn():
  keys = jax.random.split(jax.random.key(1), 2)
  model = [eqx.nn.Conv2d(2, 4, 3, key=keys[0]), eqx.nn.Linear(4 * 6 * 6, 4, key=keys[1])]
  return eqx.partition(model, eqx.is_inexact_array)


@pytest.mark.parametrize("visible", [False, True])
def test_an_equinox_mlp_routes_exactly(visible):
  params, static = _eqx_mlp()

  def loss(p, ex):
    return _xent(eqx.combine(p, static)(ex["x"]), ex["y"])

  batch = {"x": jax.random.normal(jax.random.key(2), (6, 6)), "y": jnp.arange(6) % 4}
  compiled = aqgov.compile_policy(
    _policy("layers/0/**", "layers/**", visible=visible), params, rm.TAXONOMY
  )
  assert compiled.leaf_paths[0].startswith("layers/0/")
  _assert_exact(loss, compiled, params, batch, _labels(6))


def test_an_equinox_cnn_routes_exactly():
  params, static = _eqx_cnn()

  def loss(p, ex):
    conv, head = eqx.combine(p, static)
    return _xent(head(jax.nn.relu(conv(ex["x"])).reshape(-1)), ex["y"])

  batch = {"x": jax.random.normal(jax.random.key(3), (6, 2, 8, 8)), "y": jnp.arange(6) % 4}
  compiled = aqgov.compile_policy(_policy("0/**", "1/**"), params, rm.TAXONOMY)
  _assert_exact(loss, compiled, params, batch, _labels(6))


# -- Haiku ------------------------------------------------------------------------------------


def _hk_mlp(x):
  return hk.nets.MLP([16, 16, 4])(x)


def _hk_cnn(x):
  h = jax.nn.relu(hk.Conv2D(4, 3)(x))
  return hk.Linear(4)(h.reshape(-1))


@pytest.mark.parametrize("visible", [False, True])
def test_a_haiku_mlp_routes_exactly(visible):
  f = hk.without_apply_rng(hk.transform(_hk_mlp))
  params = f.init(jax.random.key(4), jnp.zeros((6,)))

  def loss(p, ex):
    return _xent(f.apply(p, ex["x"]), ex["y"])

  batch = {"x": jax.random.normal(jax.random.key(5), (6, 6)), "y": jnp.arange(6) % 4}
  compiled = aqgov.compile_policy(
    _policy("mlp/~/linear_0/**", "mlp/**", visible=visible), params, rm.TAXONOMY
  )
  _assert_exact(loss, compiled, params, batch, _labels(6))


def test_a_haiku_cnn_routes_exactly():
  f = hk.without_apply_rng(hk.transform(_hk_cnn))
  params = f.init(jax.random.key(6), jnp.zeros((8, 8, 2)))

  def loss(p, ex):
    return _xent(f.apply(p, ex["x"]), ex["y"])

  batch = {"x": jax.random.normal(jax.random.key(7), (6, 8, 8, 2)), "y": jnp.arange(6) % 4}
  compiled = aqgov.compile_policy(_policy("conv2_d/**", "linear/**"), params, rm.TAXONOMY)
  _assert_exact(loss, compiled, params, batch, _labels(6))


def test_an_equinox_batchnorm_in_training_mode_is_refused_as_batch_coupled():
  bn = eqx.nn.BatchNorm(4, axis_name="batch")
  state = eqx.nn.State(bn)
  params, static = eqx.partition(bn, eqx.is_inexact_array)

  def loss(p, ex):
    out, _ = eqx.combine(p, static)(ex["x"], state)
    return jnp.sum(out)

  policy = aqgov.Policy.from_toml(
    'name = "p"\n[groups]\nall = ["**"]\n[default]\nroute = { all = 1.0 }\n'
  )
  compiled = aqgov.compile_policy(policy, params, rm.TAXONOMY)
  with pytest.raises(aqgov.BatchCouplingError, match="batch axis"):
    aqgov.routed_value_and_grad(loss, compiled)(params, {"x": jnp.ones((3, 4))}, _labels(3))
