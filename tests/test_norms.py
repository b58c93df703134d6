"""Per-example contribution norms from the operands and cotangents at each use: every form
(stacked and shared scan weights, convolution patches or kernel VJPs, sketches) is held to the
norm of the brute-force per-example gradient."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cotangent import (
  FAST_COMPILE,
  B,
  brute_force,
  check_against_brute_force,
  keys,
  normal,
  random_weights,
)

import aqgov
from aqgov.errors import RoutingError
from aqgov.routing import _ghost_norms as ghost_norms
from aqgov.routing import _sketch_norms as sketch_norms
from aqgov.routing._cotangent import cotangent_value_and_grad, norm_methods
from aqgov.routing._site_stats import NormSpec

import routed_models as rm

seeds = st.integers(0, 2**31 - 1)


def one(batch):
  return jax.tree.map(lambda b: b[0], batch)


# --- models ----------------------------------------------------------------------------------


def stacked_loss(p, ex):
  def block(h, blk):
    return h + jnp.tanh(h @ blk["up"] + blk["b"]) @ blk["down"], jnp.sum(h * blk["s"])

  h, sums = jax.lax.scan(block, ex["x"], p["blocks"], reverse=True)
  return jnp.sum(jnp.square(h @ p["head"] - ex["y"])) + 0.1 * jnp.sum(sums)


def stacked_setup(seed, tokens):
  k = keys(seed, 7)
  params = {
    "blocks": {
      "up": normal(k[0], 3, 6, 3),
      "b": normal(k[1], 3, 3),
      "down": normal(k[2], 3, 3, 6),
      "s": normal(k[3], 3, 6),
    },
    "head": normal(k[4], 6, 2),
  }
  batch = {"x": jax.random.normal(k[5], (B, tokens, 6)), "y": jax.random.normal(k[6], (B, 2))}
  return params, batch


def rnn_loss(p, ex):
  def step(h, x):
    h = jnp.tanh(h @ p["wh"] + x @ p["wx"])
    return h, h @ p["out"]

  _, ys = jax.lax.scan(step, jnp.zeros(8), ex["x"])
  return jnp.sum(jnp.square(ys - ex["y"]))


def rnn_setup(seed, steps=3):
  k = keys(seed, 5)
  params = {"wh": normal(k[0], 8, 8), "wx": normal(k[1], 3, 8), "out": normal(k[2], 8, 2)}
  batch = {
    "x": jax.random.normal(k[3], (B, steps, 3)),
    "y": jax.random.normal(k[4], (B, steps, 2)),
  }
  return params, batch


def _conv(x, kernel, stride=1):
  return jax.lax.conv_general_dilated(
    x, kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def conv_loss(p, ex):
  h = jax.nn.relu(_conv(ex["img"][None], p["wide"], 2))  # 8x8 -> 4x4: many positions
  h = jax.nn.relu(_conv(h, p["deep"], 2))  # 4x4 -> 2x2: few positions, many kernel entries

  def block(h, k):
    return h + jnp.tanh(_conv(h, k)), None

  h, _ = jax.lax.scan(block, h, p["stack"])
  return -jax.nn.log_softmax(jnp.mean(h, axis=(0, 1, 2)) @ p["head"])[ex["label"]]


def conv_setup(seed):
  k = keys(seed, 5)
  params = {
    "wide": normal(k[0], 3, 3, 2, 12),
    "deep": normal(k[1], 3, 3, 12, 12),
    "stack": normal(k[2], 2, 3, 3, 12, 12, scale=0.3),
    "head": normal(k[3], 12, 3),
  }
  return params, {"img": jax.random.normal(k[4], (B, 8, 8, 2)), "label": jnp.arange(B) % 3}


def nested_loss(p, ex):
  def outer(h, blk):
    def inner(g, _):
      return jnp.tanh(g @ blk["w"]), None

    g, _ = jax.lax.scan(inner, h, None, length=2)
    return g @ p["mix"], None

  h, _ = jax.jit(lambda x: jax.lax.scan(outer, x, p["blocks"]))(ex["x"])
  return jnp.sum(jnp.square(h - ex["y"]))


# --- exact norms equal brute force -----------------------------------------------------------


@pytest.mark.parametrize("tokens", [1, 8])
@settings(max_examples=8)
@given(seed=seeds)
def test_stacked_scan_weights_add_their_iterations_norms_like_brute_force(tokens, seed):
  params, batch = stacked_setup(seed % 1000, tokens)
  check_against_brute_force(stacked_loss, params, batch, random_weights(params, seed))


def test_stacked_scan_weights_get_per_iteration_forms_not_materialised_gradients():
  for tokens, form in ((1, "ghost"), (8, "direct")):
    params, batch = stacked_setup(0, tokens)
    methods = norm_methods(stacked_loss, params, one(batch))
    assert methods["blocks"]["up"] == methods["blocks"]["down"] == form
    assert methods["head"] == form


@settings(max_examples=8)
@given(seed=seeds)
def test_weights_shared_by_a_scans_iterations_get_the_gram_form_with_cross_terms(seed):
  params, batch = rnn_setup(seed % 1000)
  check_against_brute_force(rnn_loss, params, batch, random_weights(params, seed))
  methods = norm_methods(rnn_loss, params, one(batch))
  # 3 steps of one row: a 3x3 Gram beats the 8x8 gradient; the 3x8 input weight's does not
  assert methods["wh"] == "ghost"
  assert methods["wx"] == "materialised"


@settings(max_examples=8)
@given(seed=seeds)
def test_convolutions_choose_patches_or_kernel_vjp_and_match_brute_force(seed):
  params, batch = conv_setup(seed % 1000)
  check_against_brute_force(conv_loss, params, batch, random_weights(params, seed))


def test_convolution_form_follows_output_positions_against_kernel_size():
  params, batch = conv_setup(0)
  methods = norm_methods(conv_loss, params, one(batch))
  assert methods["wide"] == "vjp"  # 16 positions, 18x12 kernel: the kernel gradient is cheaper
  assert methods["deep"] == "patches"  # 4 positions, 108x12 kernel: the 4x4 Gram is cheaper
  assert methods["stack"] == "patches"  # per iteration of the scan


@settings(max_examples=8)
@given(seed=seeds)
def test_nested_scans_under_jit_match_brute_force(seed):
  k = keys(seed % 1000, 4)
  params = {"blocks": {"w": normal(k[0], 2, 4, 4)}, "mix": normal(k[1], 4, 4)}
  batch = {"x": jax.random.normal(k[2], (B, 4)), "y": jax.random.normal(k[3], (B, 4))}
  check_against_brute_force(nested_loss, params, batch, random_weights(params, seed))
  methods = norm_methods(nested_loss, params, one(batch))
  assert methods["blocks"]["w"] == "materialised"  # used by the inner scan's iterations
  assert methods["mix"] == "ghost"


@pytest.mark.parametrize(
  "act_shape,w_shape,dims,steps",
  [
    ((5,), (5, 3), (((0,), (0,)), ((), ())), 4),
    ((3, 4), (4, 3), (((1,), (0,)), ((), ())), 2),
    ((2, 3, 4), (2, 4, 3), (((2,), (1,)), ((0,), (0,))), 3),
  ],
)
@settings(max_examples=8)
@given(seed=seeds, param_is_rhs=st.booleans())
def test_shared_gram_form_equals_the_summed_gradients_norm(
  act_shape, w_shape, dims, steps, param_is_rhs, seed
):
  got, expected = _shared_forms(act_shape, w_shape, dims, steps, param_is_rhs)(
    jax.random.key(seed % 1000)
  )
  np.testing.assert_allclose(got, expected, rtol=1e-5)


@functools.cache
def _shared_forms(act_shape, w_shape, dims, steps, param_is_rhs):
  (lc, rc), (lb, rb) = dims
  param_dims = dims if param_is_rhs else ((rc, lc), (rb, lb))

  @jax.jit
  def forms(key):
    acts = jax.random.normal(key, (steps, *act_shape))
    if param_is_rhs:
      fn = lambda w_, a: jax.lax.dot_general(a, w_, param_dims)
    else:
      fn = lambda w_, a: jax.lax.dot_general(w_, a, param_dims)
    outs, vjp = jax.vjp(lambda w_: jax.vmap(lambda a: fn(w_, a))(acts), jnp.ones(w_shape))
    cots = jax.random.normal(jax.random.fold_in(key, 1), outs.shape)
    site = ghost_norms.DotSite(0, param_is_rhs, param_dims, act_shape, outs.shape[1:])
    rows = jax.vmap(lambda a, g: ghost_norms.dot_rows(site, a, g))(acts, cots)
    return ghost_norms.shared_rows_sq_norm(site, rows), jnp.sum(jnp.square(vjp(cots)[0]))

  return forms


# --- sketches --------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "act_shape,w_shape,dims",
  [
    ((5,), (5, 3), (((0,), (0,)), ((), ()))),
    ((2, 6, 4), (2, 4, 3), (((2,), (1,)), ((0,), (0,)))),
  ],
)
@settings(max_examples=8)
@given(seed=seeds, param_is_rhs=st.booleans())
def test_dot_sketch_is_the_projection_of_the_materialised_gradient(
  act_shape, w_shape, dims, param_is_rhs, seed
):
  (lc, rc), (lb, rb) = dims
  param_dims = dims if param_is_rhs else ((rc, lc), (rb, lb))
  k = keys(seed % 1000, 2)
  act = jax.random.normal(k[0], act_shape)
  fn = (
    (lambda w_: jax.lax.dot_general(act, w_, param_dims))
    if param_is_rhs
    else (lambda w_: jax.lax.dot_general(w_, act, param_dims))
  )
  out, vjp = jax.vjp(fn, jnp.ones(w_shape))
  cot = jax.random.normal(k[1], out.shape)
  site = ghost_norms.DotSite(0, param_is_rhs, param_dims, act_shape, out.shape)
  got = sketch_norms.dot_sketch(site, 5, seed % 97, act, cot)
  # the same projections applied to the gradient itself, laid out [D, C, W]
  grad = vjp(cot)[0]
  batch, contract = rb, rc  # the weight's own axes in `dims`, whichever side it is on
  free = [d for d in range(grad.ndim) if d not in batch and d not in contract]
  m = jnp.transpose(grad, (*batch, *contract, *free))
  m = m.reshape(max(int(np.prod([grad.shape[d] for d in batch])), 1), -1, m.shape[-1])
  p, q = sketch_norms._gaussians(
    seed % 97, (m.shape[0], m.shape[1], 5), (m.shape[0], m.shape[2], 5)
  )
  np.testing.assert_allclose(got, jnp.einsum("dck,dcw,dwk->k", p, m, q), rtol=1e-4, atol=1e-5)


@settings(max_examples=8)
@given(seed=seeds)
def test_conv_sketch_is_the_projection_of_the_materialised_kernel_gradient(seed):
  k = keys(seed % 1000, 2)
  lhs = jax.random.normal(k[0], (1, 5, 6, 3))
  kernel_shape = (3, 2, 3, 4)
  conv = lambda w_: jax.lax.conv_general_dilated(
    lhs, w_, (2, 1), ((1, 1), (0, 1)), (1, 1), (1, 2), ("NHWC", "HWIO", "NHWC")
  )
  out, vjp = jax.vjp(conv, jnp.ones(kernel_shape))
  cot = jax.random.normal(k[1], out.shape)
  params = jax.make_jaxpr(conv)(jnp.ones(kernel_shape)).jaxpr.eqns[-1].params
  got = sketch_norms.conv_sketch(params, kernel_shape, 6, seed % 97, lhs, cot)
  p, q = sketch_norms._gaussians(seed % 97, (3, 2, 3, 6), (4, 6))
  want = jnp.einsum("hwik,hwio,ok->k", p, vjp(cot)[0], q)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


SKETCHED = [
  ("stacked", stacked_loss, lambda s: stacked_setup(s, 8)),
  ("shared", rnn_loss, lambda s: rnn_setup(s, 6)),
  ("conv", conv_loss, conv_setup),
]


@pytest.mark.parametrize("name,loss_fn,setup", SKETCHED, ids=[s[0] for s in SKETCHED])
def test_sketched_norms_estimate_brute_force_within_their_error(name, loss_fn, setup):
  params, batch = setup(3)
  weights = random_weights(params, 3)
  _, _, ref_grads, ref_sq = brute_force(loss_fn, params, batch, weights)
  fn = jax.jit(
    cotangent_value_and_grad(loss_fn, with_norms=NormSpec("sketch", 2048, where="all")),
    compiler_options=FAST_COMPILE,
  )
  _, grads, sq = fn(params, batch, weights)
  methods = norm_methods(
    loss_fn, params, one(batch), with_norms=NormSpec("sketch", 2048, where="all")
  )
  for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):  # gradients stay exact
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6)
  for got, want, method in zip(
    jax.tree.leaves(sq), jax.tree.leaves(ref_sq), jax.tree.leaves(methods)
  ):
    if method == "sketch":  # relative std at most sqrt(8/2048) = 6%; 30% is five of them
      np.testing.assert_allclose(got, want, rtol=0.3, atol=1e-6 * np.max(want))
    else:
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
  assert "sketch" in jax.tree.leaves(methods)


def test_sketches_are_set_by_their_seed():
  params, batch = rnn_setup(0, 6)
  weights = random_weights(params, 0)
  run = lambda seed: jax.jit(
    cotangent_value_and_grad(rnn_loss, with_norms="sketch", sketch_dim=8, sketch_seed=seed),
    compiler_options=FAST_COMPILE,
  )(params, batch, weights)[2]["wh"]
  np.testing.assert_array_equal(run(1), run(1))
  assert not np.allclose(run(1), run(2))


def test_routed_norms_accept_exact_and_sketch_and_refuse_anything_else():
  params, batch = rnn_setup(0, 6)
  compiled = rm.compiled_policy(['name = "n"\n[groups]\nall = ["*"]\n'], params)
  labels = rm.SPACE.encode([{"t": {"kind": "k0", "tier": 0}}] * B)
  exact = aqgov.routed_value_and_grad(rnn_loss, compiled, "cotangent", with_norms="exact")
  sketch = aqgov.routed_value_and_grad(
    rnn_loss, compiled, "cotangent", with_norms="sketch", sketch_dim=4096
  )
  want = exact(params, batch, labels)[2]
  np.testing.assert_allclose(sketch(params, batch, labels)[2], want, rtol=0.3)
  with pytest.raises(RoutingError, match="with_norms"):
    aqgov.routed_value_and_grad(rnn_loss, compiled, with_norms="approximate")
  with pytest.raises(RoutingError, match="sketch_dim"):
    aqgov.routed_value_and_grad(rnn_loss, compiled, with_norms="sketch", sketch_dim=0)


def test_a_sketch_is_used_where_it_is_cheaper_than_the_exact_form():
  params, batch = stacked_setup(0, 8)
  rnn_params, rnn_batch = rnn_setup(0)
  sketch = lambda fn, p, b, k: norm_methods(fn, p, one(b), with_norms="sketch", sketch_dim=k)
  # 6x3 kernels over 8 tokens: the exact forms are cheaper than 4 projections
  assert sketch(stacked_loss, params, batch, 4)["blocks"]["up"] == "direct"
  # a recurrent weight's projections add over the steps: sketched at any size
  assert sketch(rnn_loss, rnn_params, rnn_batch, 64)["wh"] == "sketch"
  wide = {"w": jnp.ones((64, 64))}
  tokens = {"x": jnp.ones((B, 32, 64))}
  dense = lambda p, ex: jnp.sum(jnp.tanh(ex["x"] @ p["w"]))
  assert sketch(dense, wide, tokens, 8)["w"] == "sketch"  # 8 < 32 tokens, 8·128 < 64·64
  assert sketch(dense, wide, tokens, 32)["w"] == "ghost"
