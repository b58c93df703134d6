"""Per-use cotangent scaling equals a brute-force loop over examples for every covered construct."""

from __future__ import annotations

import functools

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

from aqgov.errors import BatchCouplingError, RoutingError, UnsupportedPrimitiveError
from aqgov.routing import _ghost_norms as ghost_norms
from aqgov.routing._cotangent import check_supported, cotangent_value_and_grad, norm_methods

B = 4
seeds = st.integers(0, 2**31 - 1)
# Tests compile many small programs; skipping expensive LLVM passes halves compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


# --- reference -------------------------------------------------------------------------------


@functools.cache
def _per_example_grad(loss_fn, has_aux):
  return jax.jit(jax.value_and_grad(loss_fn, has_aux=has_aux), compiler_options=FAST_COMPILE)


def brute_force(loss_fn, params, batch, weights, has_aux=False):
  """Loop over examples: (mean loss, aux list, (1/B) Σ_i w_i ⊙ ∇L_i, [B] ||w_i ⊙ ∇L_i||²)."""
  size = jax.tree.leaves(batch)[0].shape[0]
  grad_fn = _per_example_grad(loss_fn, has_aux)
  np_batch = jax.tree.map(np.asarray, batch)
  np_weights = jax.tree.map(lambda w: np.asarray(w, np.float64), weights)
  losses, auxes, contribs = [], [], []
  for i in range(size):
    value, g = grad_fn(params, jax.tree.map(lambda b: b[i], np_batch))
    loss, aux = value if has_aux else (value, None)
    losses.append(float(loss))
    auxes.append(aux)
    contribs.append(jax.tree.map(lambda gl, w: np.asarray(gl, np.float64) * w[i], g, np_weights))
  grads = jax.tree.map(lambda *cs: sum(cs) / size, *contribs)
  sq = jax.tree.map(lambda *cs: np.array([np.sum(np.square(c)) for c in cs]), *contribs)
  return np.mean(losses), auxes, grads, sq


def assert_tree_close(actual, expected, rtol=1e-5, group=False):
  """Each leaf: ||actual - expected|| <= rtol * scale, exact where `expected` is exactly zero.

  The scale is the leaf's own norm, or with `group` the norm of all leaves together (the
  parameter tree as one routing group): float32 rounding in a leaf whose gradient is tiny by
  cancellation or dead units is relative to the group's gradient, not to that leaf's."""
  flat_a = [np.asarray(a, np.float64) for a in jax.tree.leaves(actual)]
  flat_e = [np.asarray(e, np.float64) for e in jax.tree.leaves(expected)]
  assert len(flat_a) == len(flat_e)
  group_scale = np.sqrt(sum(np.sum(np.square(e)) for e in flat_e))
  for a, e in zip(flat_a, flat_e):
    assert a.shape == e.shape
    if not np.any(e):
      np.testing.assert_array_equal(a, e)
      continue
    err, scale = np.linalg.norm(a - e), group_scale if group else np.linalg.norm(e)
    assert err <= rtol * scale, (err, scale)


def random_weights(params, seed, size=B):
  """Per-example per-leaf weights mixing 0 (routed away), 1 and fractions."""
  rng = np.random.default_rng(seed)

  def one(_):
    w = rng.choice([0.0, 1.0, 0.5, rng.uniform()], size=size)
    return jnp.asarray(w, jnp.float32)

  return jax.tree.map(one, params)


def check_against_brute_force(loss_fn, params, batch, weights, rtol=1e-5):
  """Gradients with and without norms, and the norms, equal the brute-force loop."""
  ref_loss, _, ref_grads, ref_sq = brute_force(loss_fn, params, batch, weights)
  loss, grads = _cotangent(loss_fn, False, False)(params, batch, weights)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-7)  # float32 rounding near 0
  assert_tree_close(grads, ref_grads, rtol, group=True)
  loss, grads, sq = _cotangent(loss_fn, False, True)(params, batch, weights)
  assert_tree_close(grads, ref_grads, rtol, group=True)
  # a leaf whose weight varies along one axis has its norms per position of that axis: [B, n]
  sq = jax.tree.map(lambda s: s.sum(axis=tuple(range(1, s.ndim))), sq)
  assert_tree_close(sq, ref_sq, 1e-4, group=True)


@functools.cache
def _cotangent(loss_fn, has_aux, with_norms):
  return jax.jit(
    cotangent_value_and_grad(loss_fn, has_aux=has_aux, with_norms=with_norms),
    compiler_options=FAST_COMPILE,
  )


def normal(key, *shape, scale=1.0):
  return scale * jax.random.normal(key, shape) / np.sqrt(shape[0] if shape else 1)


def keys(seed, n):
  return list(jax.random.split(jax.random.key(seed), n))


# --- models ----------------------------------------------------------------------------------


def mlp_loss(p, ex):
  h = ex["x"]
  for layer in p["layers"]:
    h = jax.nn.relu(h @ layer["w"] + layer["b"])
  logits = h @ p["out"]
  return -jax.nn.log_softmax(logits)[ex["y"]]


def mlp_setup(seed):
  k = keys(seed, 8)
  params = {
    "layers": [{"w": normal(k[i], 6, 6), "b": normal(k[i + 3], 6)} for i in range(3)],
    "out": normal(k[6], 6, 3),
  }
  batch = {"x": jax.random.normal(k[7], (B, 6)), "y": jnp.arange(B) % 3}
  return params, batch


def conv_loss(p, ex):
  x = ex["img"][None]
  y = jax.lax.conv_general_dilated(
    x, p["k1"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  y = jax.nn.relu(y + p["b1"])
  y = jax.lax.conv_general_dilated(
    y, p["k2"], (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  logits = jnp.mean(y, axis=(1, 2))[0] @ p["head"]
  return -jax.nn.log_softmax(logits)[ex["label"]]


def conv_setup(seed):
  k = keys(seed, 6)
  params = {
    "k1": normal(k[0], 3, 3, 2, 4),
    "b1": normal(k[1], 4),
    "k2": normal(k[2], 2, 2, 4, 5),
    "head": normal(k[3], 5, 3),
  }
  batch = {"img": jax.random.normal(k[4], (B, 6, 6, 2)), "label": jnp.arange(B) % 3}
  return params, batch


def layer_norm(x, scale, bias):
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias


def attention_loss(p, ex, tied=False, one_hot=False):
  tokens = ex["tokens"]
  if one_hot:
    x = jax.nn.one_hot(tokens, p["emb"].shape[0]) @ p["emb"]
  else:
    x = jnp.take(p["emb"], tokens, axis=0)
  x = x + p["pos"]
  h = layer_norm(x, p["ln_s"], p["ln_b"])
  q, k, v = jnp.split(h @ p["qkv"], 3, axis=-1)
  t, d = q.shape
  q, k, v = (a.reshape(t, 2, d // 2) for a in (q, k, v))
  scores = jnp.einsum("thd,shd->hts", q, k) / np.sqrt(d // 2)
  scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e9)
  att = jnp.einsum("hts,shd->thd", jax.nn.softmax(scores, -1), v).reshape(t, d)
  x = x + att @ p["o"]
  x = x + jax.nn.gelu(layer_norm(x, p["ln_s"], p["ln_b"]) @ p["f1"]) @ p["f2"]
  logits = x @ (p["emb"].T if tied else p["unemb"])
  return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), ex["targets"][:, None], -1))


def attention_setup(seed, tied=False):
  k = keys(seed, 10)
  vocab, d, t = 7, 8, 5
  params = {
    "emb": normal(k[0], vocab, d),
    "pos": normal(k[1], t, d, scale=0.1),
    "ln_s": 1 + normal(k[2], d, scale=0.1),
    "ln_b": normal(k[3], d, scale=0.1),
    "qkv": normal(k[4], d, 3 * d),
    "o": normal(k[5], d, d),
    "f1": normal(k[6], d, 2 * d),
    "f2": normal(k[7], 2 * d, d),
  }
  if not tied:
    params["unemb"] = normal(k[8], d, vocab)
  tokens = jax.random.randint(k[9], (B, t + 1), 0, vocab)
  return params, {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}


def scanned_loss(p, ex):
  def block(h, blk):
    h = h + jnp.tanh(layer_norm(h, blk["g"], 0.0) @ blk["w"] + blk["b"])
    return h, jnp.sum(h)

  h, sums = jax.lax.scan(block, ex["x"], p["blocks"])
  return jnp.sum(jnp.square(h @ p["head"] - ex["y"])) + 0.01 * jnp.sum(sums)


def scanned_setup(seed):
  k = keys(seed, 6)
  params = {
    "blocks": {
      "w": normal(k[0], 3, 5, 5),
      "b": normal(k[1], 3, 5),
      "g": 1 + normal(k[2], 3, 5, scale=0.1),
    },
    "head": normal(k[3], 5, 2),
  }
  return params, {"x": jax.random.normal(k[4], (B, 4, 5)), "y": jax.random.normal(k[5], (B, 4, 2))}


# --- equality with brute force, per construct ------------------------------------------------


@given(seed=seeds)
def test_mlp_matches_brute_force(seed):
  params, batch = mlp_setup(seed % 1000)
  check_against_brute_force(mlp_loss, params, batch, random_weights(params, seed))


@given(seed=seeds)
def test_conv_matches_brute_force(seed):
  params, batch = conv_setup(seed % 1000)
  check_against_brute_force(conv_loss, params, batch, random_weights(params, seed))


@given(seed=seeds)
def test_attention_with_layer_norm_and_gathered_embeddings_matches_brute_force(seed):
  params, batch = attention_setup(seed % 1000)
  check_against_brute_force(attention_loss, params, batch, random_weights(params, seed))


def _one_hot_attention(p, ex):
  return attention_loss(p, ex, one_hot=True)


@given(seed=seeds)
def test_attention_with_one_hot_embeddings_matches_brute_force(seed):
  params, batch = attention_setup(seed % 1000)
  check_against_brute_force(_one_hot_attention, params, batch, random_weights(params, seed))


def _tied_attention(p, ex):
  return attention_loss(p, ex, tied=True)


@given(seed=seeds)
def test_tied_embedding_and_output_projection_matches_brute_force(seed):
  params, batch = attention_setup(seed % 1000, tied=True)
  check_against_brute_force(_tied_attention, params, batch, random_weights(params, seed))


def library_attention_loss(p, ex):
  q, k, v = (jnp.einsum("td,dhk->thk", ex["x"], p[name]) for name in ("q", "k", "v"))
  att = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(ex["x"].shape)
  g = p["g"] / jnp.linalg.norm(p["g"], axis=0, keepdims=True)  # weight normalisation
  h = jax.nn.silu(att @ g.T)
  pooled = jax.lax.reduce_window(ex["x"] * p["s"], -jnp.inf, jax.lax.max, (2, 1), (1, 1), "VALID")
  return jnp.sum(jax.nn.softplus(h)) + jnp.sum(pooled)


@given(seed=seeds)
def test_library_attention_weight_normalisation_and_pooling_match_brute_force(seed):
  k = keys(seed % 1000, 6)
  params = {
    "q": normal(k[0], 8, 2, 4),
    "k": normal(k[1], 8, 2, 4),
    "v": normal(k[2], 8, 2, 4),
    "g": normal(k[3], 4, 8),
    "s": normal(k[4], 8),
  }
  batch = {"x": jax.random.normal(k[5], (B, 5, 8))}
  check_against_brute_force(library_attention_loss, params, batch, random_weights(params, seed))


def lora_loss(p, ex):
  w = p["w0"] + p["a"] @ p["b"]  # parameter-only subgraph mixing two leaves
  return jnp.sum(jnp.square(jnp.tanh(ex["x"] @ w) - ex["y"])) + 0.01 * jnp.sum(jnp.square(p["a"]))


@given(seed=seeds)
def test_parameter_only_subgraph_of_two_leaves_matches_brute_force(seed):
  k = keys(seed % 1000, 5)
  params = {"w0": normal(k[0], 4, 4), "a": normal(k[1], 4, 2), "b": normal(k[2], 2, 4)}
  batch = {"x": jax.random.normal(k[3], (B, 3, 4)), "y": jax.random.normal(k[4], (B, 3, 4))}
  check_against_brute_force(lora_loss, params, batch, random_weights(params, seed))


@given(seed=seeds)
def test_scanned_stack_of_blocks_matches_brute_force(seed):
  params, batch = scanned_setup(seed % 1000)
  check_against_brute_force(scanned_loss, params, batch, random_weights(params, seed))


def rnn_loss(p, ex):
  def step(h, x):
    h = jnp.tanh(h @ p["wh"] + x @ p["wx"])
    return h, h @ p["out"]

  _, ys = jax.lax.scan(step, p["h0"], ex["x"])  # parameter-only initial carry
  return jnp.sum(jnp.square(ys - ex["y"]))


@given(seed=seeds)
def test_recurrent_scan_with_shared_weights_and_parameter_carry_matches_brute_force(seed):
  k = keys(seed % 1000, 6)
  params = {
    "wh": normal(k[0], 4, 4),
    "wx": normal(k[1], 3, 4),
    "out": normal(k[2], 4, 2),
    "h0": normal(k[3], 4),
  }
  batch = {"x": jax.random.normal(k[4], (B, 5, 3)), "y": jax.random.normal(k[5], (B, 5, 2))}
  check_against_brute_force(rnn_loss, params, batch, random_weights(params, seed))


@jax.jit
def _jitted_layer(h, w, b):
  return jax.nn.gelu(h @ w + b)


def remat_jit_loss(p, ex):
  h = _jitted_layer(ex["x"], p["w1"], p["b1"])
  h = jax.checkpoint(lambda h: jnp.tanh(_jitted_layer(h, p["w2"], p["b2"]) @ p["w3"]))(h)
  return jnp.sum(jnp.square(h - ex["y"]))


@given(seed=seeds)
def test_checkpoint_and_nested_jit_match_brute_force(seed):
  k = keys(seed % 1000, 7)
  params = {
    "w1": normal(k[0], 4, 5),
    "b1": normal(k[1], 5),
    "w2": normal(k[2], 5, 5),
    "b2": normal(k[3], 5),
    "w3": normal(k[4], 5, 3),
  }
  batch = {"x": jax.random.normal(k[5], (B, 4)), "y": jax.random.normal(k[6], (B, 3))}
  check_against_brute_force(remat_jit_loss, params, batch, random_weights(params, seed))


@jax.custom_jvp
def _scaled(x, s):
  return x * s


@_scaled.defjvp
def _scaled_jvp(primals, tangents):
  (x, s), (dx, ds) = primals, tangents
  return _scaled(x, s), dx * s + x * ds


@jax.custom_vjp
def _linear(x, w):
  return x @ w


def _linear_fwd(x, w):
  return x @ w, (x, w)


def _linear_bwd(res, g):
  x, w = res
  return g @ w.T, jnp.outer(x, g)


_linear.defvjp(_linear_fwd, _linear_bwd)


def custom_rules_loss(p, ex):
  h = jax.nn.relu(_linear(ex["x"], p["w1"]))  # custom_vjp mixing x and a parameter
  h = jax.nn.gelu(_scaled(h, p["s"]), approximate=False)  # custom_jvp mixing h and a parameter
  return jnp.sum(jnp.square(h @ p["w2"] - ex["y"]))


@given(seed=seeds)
def test_custom_jvp_and_custom_vjp_rules_match_brute_force(seed):
  k = keys(seed % 1000, 5)
  params = {"w1": normal(k[0], 4, 5), "s": 1 + normal(k[1], 5, scale=0.3), "w2": normal(k[2], 5, 2)}
  batch = {"x": jax.random.normal(k[3], (B, 4)), "y": jax.random.normal(k[4], (B, 2))}
  check_against_brute_force(custom_rules_loss, params, batch, random_weights(params, seed))


def cond_loss(p, ex):
  m = jax.lax.cond(ex["x"][0] > 0, lambda: p["w"] * 2.0, lambda: p["v"] @ p["w"])
  h = jax.lax.cond(ex["x"][1] > 0, jnp.tanh, lambda h: h @ p["v"], ex["x"] @ m)
  return jnp.sum(jnp.square(h))


@given(seed=seeds)
def test_cond_on_the_example_matches_brute_force(seed):
  k = keys(seed % 1000, 3)
  params = {"w": normal(k[0], 3, 3), "v": normal(k[1], 3, 3)}
  batch = {"x": jax.random.normal(k[2], (B, 3))}
  check_against_brute_force(cond_loss, params, batch, random_weights(params, seed))


def while_loss_without_params(p, ex):
  # the loop sees the example in one carry only; the other carry stays example-independent
  acc, _, growth = jax.lax.while_loop(
    lambda c: c[1] < 3,
    lambda c: (c[0] + ex["x"], c[1] + 1, c[2] * 2.0),
    (jnp.zeros(3), 0, jnp.ones(3)),
  )
  return jnp.sum(growth @ p["w"]) + jnp.sum(jnp.tanh(acc @ p["w"]))


@given(seed=seeds)
def test_while_loop_outside_the_parameters_matches_brute_force(seed):
  k = keys(seed % 1000, 2)
  params = {"w": normal(k[0], 3, 3)}
  batch = {"x": jax.random.normal(k[1], (B, 3))}
  check_against_brute_force(while_loss_without_params, params, batch, random_weights(params, seed))


def barrier_loss(p, ex):
  w, x = jax.lax.optimization_barrier((p["w"], ex["x"]))  # identity on each operand separately
  return jnp.sum(jnp.tanh(x @ w))


@given(seed=seeds)
def test_optimization_barrier_over_parameters_and_example_matches_brute_force(seed):
  k = keys(seed % 1000, 2)
  params = {"w": normal(k[0], 3, 3)}
  batch = {"x": jax.random.normal(k[1], (B, 3))}
  check_against_brute_force(barrier_loss, params, batch, random_weights(params, seed))


def param_terms_loss(p, ex):
  norm = jnp.sum(jnp.square(p["a"] @ p["b"]))  # depends on parameters only
  return jnp.sum(jnp.square(ex["x"] @ p["a"])) + 0.1 * norm


def param_only_loss(p, ex):
  return jnp.sum(jnp.square(p["a"] @ p["b"]))


@pytest.mark.parametrize("loss_fn", [param_terms_loss, param_only_loss])
@given(seed=seeds)
def test_parameter_only_loss_terms_are_weighted_per_example(loss_fn, seed):
  k = keys(seed % 1000, 3)
  params = {"a": normal(k[0], 3, 3), "b": normal(k[1], 3, 2)}
  batch = {"x": jax.random.normal(k[2], (B, 3))}
  check_against_brute_force(loss_fn, params, batch, random_weights(params, seed))


def slice_loss(p, ex):
  return jnp.sum(jnp.square(jnp.tanh(ex["x"] @ p["w"] + p["b"]) @ p["o"]))


@given(seed=seeds)
def test_slice_weights_within_a_leaf_match_brute_force(seed):
  k = keys(seed % 1000, 5)
  params = {"w": normal(k[0], 4, 6), "b": normal(k[1], 6), "o": normal(k[2], 6, 2)}
  batch = {"x": jax.random.normal(k[3], (B, 3, 4))}
  rng = np.random.default_rng(seed)
  weights = {
    "w": jnp.asarray(rng.choice([0.0, 0.5, 1.0], (B, 1, 6)), jnp.float32),  # per column
    "b": jnp.asarray(rng.choice([0.0, 1.0], (B, 6)), jnp.float32),
    "o": jnp.asarray(rng.uniform(size=(B,)), jnp.float32),
  }
  check_against_brute_force(slice_loss, params, batch, weights)


# --- routed-away examples contribute exactly nothing -----------------------------------------


@given(seed=seeds, victim=st.integers(0, B - 1))
def test_example_routed_away_from_a_leaf_leaves_its_gradient_bitwise_unchanged(seed, victim):
  params, batch = attention_setup(seed % 1000)
  weights = random_weights(params, seed)
  weights = {k: w.at[victim].set(0.0) if k in ("qkv", "f1") else w for k, w in weights.items()}
  fn = _cotangent(attention_loss, False, False)
  _, grads = fn(params, batch, weights)
  other = jax.random.randint(jax.random.key(seed), batch["tokens"].shape[1:], 0, 7)
  perturbed = dict(batch, tokens=batch["tokens"].at[victim].set(other))
  _, grads2 = fn(params, perturbed, weights)
  for name in ("qkv", "f1"):
    np.testing.assert_array_equal(np.asarray(grads[name]), np.asarray(grads2[name]))


def test_example_routed_away_everywhere_contributes_nothing_to_any_leaf():
  params, batch = mlp_setup(0)
  weights = jax.tree.map(lambda p: jnp.zeros((B,)).at[0].set(1.0), params)
  _, grads = _cotangent(mlp_loss, False, False)(params, batch, weights)
  perturbed = dict(batch, x=batch["x"].at[1:].multiply(-3.0))
  _, grads2 = _cotangent(mlp_loss, False, False)(params, perturbed, weights)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- contribution norms ----------------------------------------------------------------------


@pytest.mark.parametrize(
  "act_shape,w_shape,dims",
  [
    ((5,), (5, 3), (((0,), (0,)), ((), ()))),  # vector @ matrix (ghost form)
    ((7, 4), (4, 3), (((1,), (0,)), ((), ()))),  # tokens @ matrix
    ((2, 6, 4), (2, 4, 3), (((2,), (1,)), ((0,), (0,)))),  # batched heads
  ],
)
@given(seed=seeds, param_is_rhs=st.booleans())
def test_ghost_and_direct_norm_forms_agree_with_the_materialised_gradient(
  act_shape, w_shape, dims, param_is_rhs, seed
):
  k = keys(seed % 1000, 2)
  act = jax.random.normal(k[0], act_shape)
  got, expected = _norm_forms(act_shape, w_shape, dims, param_is_rhs)(act, k[1])
  np.testing.assert_allclose(got, expected, rtol=1e-5)


@functools.cache
def _norm_forms(act_shape, w_shape, dims, param_is_rhs):
  """jit(act, key) -> (ghost_norms.dot_sq_norm, ||materialised weight gradient||²)."""
  (lc, rc), (lb, rb) = dims
  param_dims = dims if param_is_rhs else ((rc, lc), (rb, lb))

  @jax.jit
  def forms(act, key):
    if param_is_rhs:
      fn = lambda w_: jax.lax.dot_general(act, w_, param_dims)
    else:
      fn = lambda w_: jax.lax.dot_general(w_, act, param_dims)
    out, vjp = jax.vjp(fn, jnp.ones(w_shape))
    cot = jax.random.normal(key, out.shape)
    site = ghost_norms.DotSite(0, param_is_rhs, param_dims, act_shape, out.shape)
    return ghost_norms.dot_sq_norm(site, act, cot), jnp.sum(jnp.square(vjp(cot)[0]))

  return forms


@pytest.mark.parametrize(
  "dims,strides,padding,lhs_dil,rhs_dil",
  [
    (("NHWC", "HWIO", "NHWC"), (1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1)),
    (("NCHW", "OIHW", "NCHW"), (2, 1), ((0, 1), (2, 0)), (1, 1), (2, 1)),
    (("NHWC", "OIHW", "NCHW"), (1, 2), ((1, 0), (0, 0)), (2, 1), (1, 1)),
  ],
)
@given(seed=seeds)
def test_convolution_patch_norm_agrees_with_the_materialised_kernel_gradient(
  dims, strides, padding, lhs_dil, rhs_dil, seed
):
  got, expected = _conv_forms(dims, strides, padding, lhs_dil, rhs_dil)(jax.random.key(seed % 1000))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


@functools.cache
def _conv_forms(dims, strides, padding, lhs_dil, rhs_dil):
  """jit(key) -> (ghost_norms.conv_sq_norm, ||materialised kernel gradient||²) for one example."""
  lhs_shape = {"NHWC": (1, 7, 6, 3), "NCHW": (1, 3, 7, 6)}[dims[0]]
  kernel_shape = {"HWIO": (3, 2, 3, 4), "OIHW": (4, 3, 3, 2)}[dims[1]]

  @jax.jit
  def forms(key):
    k1, k2, k3 = jax.random.split(key, 3)
    lhs = jax.random.normal(k1, lhs_shape)
    conv = lambda k: jax.lax.conv_general_dilated(
      lhs, k, strides, padding, lhs_dil, rhs_dil, dimension_numbers=dims
    )
    kernel = jax.random.normal(k2, kernel_shape)
    out, vjp = jax.vjp(conv, kernel)
    cot = jax.random.normal(k3, out.shape)
    params = jax.make_jaxpr(conv)(kernel).jaxpr.eqns[-1].params
    return (
      ghost_norms.conv_sq_norm(params, kernel_shape, lhs, cot),
      jnp.sum(jnp.square(vjp(cot)[0])),
    )

  return forms


def test_norms_avoid_per_example_gradients_for_single_use_matmuls_and_convolutions():
  params, batch = mlp_setup(0)
  example = jax.tree.map(lambda b: b[0], batch)
  methods = norm_methods(mlp_loss, params, example)
  assert methods["out"] == "ghost"
  assert all(layer["w"] == "ghost" for layer in methods["layers"])
  assert all(layer["b"] == "vjp" for layer in methods["layers"])  # the add's own VJP
  params, batch = conv_setup(0)
  methods = norm_methods(conv_loss, params, jax.tree.map(lambda b: b[0], batch))
  # many output positions for so few kernel entries: the per-example kernel gradient is cheaper
  assert methods["k1"] == methods["k2"] == "vjp"


def test_tied_weights_have_their_per_example_gradients_materialised():
  params, batch = attention_setup(0, tied=True)
  methods = norm_methods(_tied_attention, params, jax.tree.map(lambda b: b[0], batch))
  assert methods["emb"] == "materialised"


# --- frameworks ------------------------------------------------------------------------------


class _NnxMlp(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(4, 8, rngs=rngs)
    self.norm = nnx.LayerNorm(8, rngs=rngs)
    self.l2 = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.l2(jax.nn.relu(self.norm(self.l1(x))))


_NNX_GRAPHDEF, _NNX_STATE = nnx.split(_NnxMlp(nnx.Rngs(0)))


def nnx_loss(state, ex):
  model = nnx.merge(_NNX_GRAPHDEF, state)
  return -jax.nn.log_softmax(model(ex["x"]))[ex["y"]]


@given(seed=seeds)
def test_flax_nnx_model_matches_brute_force(seed):
  batch = {"x": jax.random.normal(jax.random.key(seed % 1000), (B, 4)), "y": jnp.arange(B) % 3}
  check_against_brute_force(nnx_loss, _NNX_STATE, batch, random_weights(_NNX_STATE, seed))


class _LinenCnn(linen.Module):
  @linen.compact
  def __call__(self, x):
    x = linen.Conv(4, (3, 3))(x)
    x = linen.relu(x)
    x = x.mean(axis=(0, 1))
    return linen.Dense(3)(x)


_LINEN = _LinenCnn()
_LINEN_PARAMS = _LINEN.init(jax.random.key(0), jnp.ones((5, 5, 2)))["params"]


def linen_loss(params, ex):
  return -jax.nn.log_softmax(_LINEN.apply({"params": params}, ex["img"]))[ex["label"]]


@given(seed=seeds)
def test_flax_linen_model_matches_brute_force(seed):
  batch = {
    "img": jax.random.normal(jax.random.key(seed % 1000), (B, 5, 5, 2)),
    "label": jnp.arange(B) % 3,
  }
  check_against_brute_force(linen_loss, _LINEN_PARAMS, batch, random_weights(_LINEN_PARAMS, seed))


# --- API behaviour ---------------------------------------------------------------------------


def counter_loss(p, ex):
  return jnp.sum(jnp.square(ex["x"] @ p["w"])) * p["scale"] + 0 * p["step"]


def test_integer_leaves_get_zero_gradients_and_norms():
  params = {"w": jnp.ones((3, 2)), "scale": jnp.array(0.5), "step": jnp.array(7)}
  batch = {"x": jax.random.normal(jax.random.key(0), (B, 3))}
  weights = jax.tree.map(lambda _: jnp.full((B,), 0.5), params)
  _, grads, sq = _cotangent(counter_loss, False, True)(params, batch, weights)
  assert grads["step"].dtype == jnp.int32 and int(grads["step"]) == 0
  np.testing.assert_array_equal(sq["step"], np.zeros(B))
  float_params = {k: v for k, v in params.items() if k != "step"}
  ref = brute_force(
    lambda p, ex: counter_loss(dict(p, step=params["step"]), ex),
    float_params,
    batch,
    {k: weights[k] for k in float_params},
  )
  assert_tree_close({k: grads[k] for k in float_params}, ref[2], group=True)


def aux_loss(p, ex):
  h = jnp.tanh(ex["x"] @ p["w"])
  return jnp.sum(jnp.square(h)), {"h": h, "n": jnp.sum(h)}


def test_aux_is_returned_stacked_per_example():
  k = keys(0, 2)
  params = {"w": normal(k[0], 3, 4)}
  batch = {"x": jax.random.normal(k[1], (B, 3))}
  weights = random_weights(params, 3)
  (loss, aux), grads = _cotangent(aux_loss, True, False)(params, batch, weights)
  ref_loss, ref_aux, ref_grads, _ = brute_force(aux_loss, params, batch, weights, has_aux=True)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  np.testing.assert_allclose(aux["h"], np.stack([a["h"] for a in ref_aux]), rtol=1e-6)
  assert aux["n"].shape == (B,)
  assert_tree_close(grads, ref_grads, group=True)


def test_loss_is_traced_once_per_shape_under_jit():
  traces = []

  def loss(p, ex):
    traces.append(1)
    return jnp.sum(jnp.square(ex["x"] @ p["w"]))

  fn = cotangent_value_and_grad(loss)
  params = {"w": jnp.ones((3, 2))}
  weights = {"w": jnp.ones((B,))}
  step = jax.jit(lambda p, b, w: fn(p, b, w)[1])
  step(params, {"x": jnp.ones((B, 3))}, weights)
  step2 = jax.jit(lambda p, b, w: fn(p, b, w)[0])
  step2(params, {"x": jnp.zeros((B, 3))}, weights)
  assert len(traces) == 1


def test_unit_weights_give_the_plain_gradient_of_the_mean_loss():
  params, batch = mlp_setup(3)
  weights = jax.tree.map(lambda _: jnp.ones((B,)), params)
  loss, grads = _cotangent(mlp_loss, False, False)(params, batch, weights)
  plain = jax.value_and_grad(lambda p: jnp.mean(jax.vmap(mlp_loss, in_axes=(None, 0))(p, batch)))
  ref_loss, ref_grads = plain(params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  assert_tree_close(grads, ref_grads, 1e-6)


def test_weights_without_a_batch_axis_are_refused():
  params, batch = mlp_setup(0)
  weights = jax.tree.map(lambda _: jnp.ones((B + 1,)), params)
  with pytest.raises(RoutingError, match="leading batch axis"):
    cotangent_value_and_grad(mlp_loss)(params, batch, weights)


def test_non_scalar_loss_is_refused():
  fn = cotangent_value_and_grad(lambda p, ex: ex["x"] @ p["w"])
  with pytest.raises(RoutingError, match="one float scalar"):
    fn({"w": jnp.ones((3, 2))}, {"x": jnp.ones((B, 3))}, {"w": jnp.ones((B,))})


# --- refusals --------------------------------------------------------------------------------


def while_loss(p, ex):
  return jax.lax.while_loop(
    lambda c: c[0] < ex["n"], lambda c: (c[0] + 1, c[1] @ p["w"]), (0, ex["x"])
  )[1].sum()


def linear_solve_loss(p, ex):
  a = p["w"] @ p["w"].T + 3 * jnp.eye(3)
  x = jax.lax.custom_linear_solve(lambda v: a @ v, ex["x"], lambda mv, b: jnp.linalg.solve(a, b))
  return jnp.sum(x)


@pytest.mark.parametrize(
  "loss_fn,name", [(while_loss, "while"), (linear_solve_loss, "custom_linear_solve")]
)
def test_uncovered_construct_is_refused_naming_the_fallback(loss_fn, name):
  params = {"w": jnp.eye(3)}
  example = {"x": jnp.ones(3), "n": jnp.array(2)}
  with pytest.raises(UnsupportedPrimitiveError, match=f"{name}.*per_example") as info:
    check_supported(loss_fn, params, example)
  assert info.value.primitive == name
  with pytest.raises(UnsupportedPrimitiveError):
    cotangent_value_and_grad(loss_fn)(
      params, jax.tree.map(lambda x: x[None], example), {"w": jnp.ones((1,))}
    )


def test_supported_models_pass_the_check():
  params, batch = scanned_setup(0)
  assert check_supported(scanned_loss, params, jax.tree.map(lambda b: b[0], batch)) is None


def coupled_loss(p, ex):
  h = ex["x"] @ p["w"]
  h = h - jax.lax.pmean(h, "batch")  # batch statistics: mixes examples
  return jnp.sum(jnp.square(h))


def test_collective_over_a_named_axis_is_refused_as_batch_coupling():
  params, example = {"w": jnp.ones((3, 2))}, {"x": jnp.ones(3)}
  with pytest.raises(BatchCouplingError, match="mixes examples"):
    check_supported(coupled_loss, params, example)
  with pytest.raises(BatchCouplingError, match="mixes examples"):
    jax.vmap(lambda ex: check_supported(coupled_loss, params, ex) or 0.0, axis_name="batch")(
      {"x": jnp.ones((2, 3))}
    )
