"""Slice groups: attention heads, experts and other slices of a leaf as governed groups.

A slice group takes parts of one axis of the leaves it matches; the rest of a leaf stays in its
whole-leaf group. Every routing strategy is held to brute force per slice: `(1/B) Σ_i w_i[part]
∇L_i` on each part, with each part's weight read from the compiled tables, and the per-example
contribution norms of each group summed over its parts.
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
from aqgov.examples import moe
from aqgov.policy import Policy, compile_policy
from aqgov.routing import _plan as plan_lib
from aqgov.routing import routed_value_and_grad

TAXONOMY = aqgov.Taxonomy.from_toml("""
[authority]
name = "lab"
[fields.tier]
type = "int"
min = 0
max = 3
""")
D, H = 8, 4  # model width, heads (head size 2)

HEADS = f"""
name = "heads"
[groups]
q = {{ pattern = "attn/wq", axis = 1, split = {H}, per = "head" }}
o = {{ pattern = "attn/wo", axis = 0, split = {H}, per = "head" }}
kv_low = {{ patterns = ["attn/wk", "attn/wv"], axis = -1, split = 2, index = 0 }}
core = ["**"]
[[rules]]
when = "tier == 1"
route = {{ "q[0]" = 1.0, "o[2]" = 0.5, core = 1.0 }}
[[rules]]
when = "tier == 2"
route = {{ q = 0.25, "q[3]" = 1.0, o = 1.0, kv_low = 1.0 }}
[[rules]]
when = "tier == 3"
route = {{}}
[default]
route = {{ q = 1.0, o = 1.0, kv_low = 0.5, core = 1.0 }}
"""


def attention_params(seed: int) -> dict:
  keys = iter(jax.random.split(jax.random.key(seed), 8))
  normal = lambda *shape: jax.random.normal(next(keys), shape) / np.sqrt(shape[0])  # noqa: E731
  return {
    "embed": normal(16, D),
    "attn": {name: normal(D, D) for name in ("wq", "wk", "wv", "wo")},
    "scale": 1.0 + normal(D),
    "head": normal(D, 16),
  }


def attention_loss(p, tokens, reshaped=False):
  x = p["embed"][tokens[:-1]]
  t = x.shape[0]
  heads = lambda z: z.reshape(t, H, D // H).transpose(1, 0, 2)  # noqa: E731
  if reshaped:  # the parameter itself reshaped per head: the sliced leaf is scaled at the leaf
    q = jnp.einsum("td,dhk->htk", x, p["attn"]["wq"].reshape(D, H, D // H))
  else:
    q = heads(x @ p["attn"]["wq"])
  k, v = heads(x @ p["attn"]["wk"]), heads(x @ p["attn"]["wv"])
  probs = jax.nn.softmax(q @ k.transpose(0, 2, 1) / np.sqrt(D // H), axis=-1)
  out = (probs @ v).transpose(1, 0, 2).reshape(t, D) @ p["attn"]["wo"]
  logits = (jnp.tanh(out + x) * p["scale"]) @ p["head"]
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[1:, None], axis=-1))


def labels_of(tiers) -> dict:
  return TAXONOMY.encode([{"tier": int(t)} for t in tiers])


_CACHE: dict = {}


def _jitted(key, make):
  if key not in _CACHE:
    _CACHE[key] = make()
  return _CACHE[key]


def brute_force(loss_fn, compiled, params, batch, labels):
  """Per example: its gradient, each part multiplied by the part's weight from `part_table`.
  Returns ((1/B) Σ_i w_i ∇L_i, [B, G] contribution norms)."""
  classes = np.asarray(compiled.route_class(labels))
  grad = _jitted(("brute", loss_fn), lambda: jax.jit(jax.vmap(jax.grad(loss_fn), (None, 0))))
  leaves, treedef = jax.tree.flatten(grad(params, batch))
  weighted = [np.zeros(np.shape(x), np.float64) for x in leaves]
  sq = np.zeros((len(classes), compiled.num_groups))
  for u, part in enumerate(compiled.parts_list):
    w = compiled.part_table[classes, u].astype(np.float64)
    index = [slice(None)] * leaves[part.leaf].ndim
    if part.axis is not None:
      index[part.axis + 1] = slice(part.start, part.stop)
    g = np.asarray(leaves[part.leaf], np.float64)[tuple(index)]
    contrib = g * w.reshape((-1,) + (1,) * (g.ndim - 1))
    sq[:, part.group] += np.sum(np.square(contrib).reshape(len(classes), -1), axis=1)
    weighted[part.leaf][tuple(index)] = contrib
  grads = jax.tree.unflatten(treedef, [x.mean(axis=0) for x in weighted])
  return grads, np.sqrt(sq)


def assert_close(actual, expected, rtol=2e-5):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    scale = max(np.max(np.abs(e)), 1e-6)
    np.testing.assert_allclose(a, e, rtol=0, atol=rtol * scale)
    assert np.all(a[e == 0] == 0), "an entry no example may reach got a gradient"


def check(loss_fn, policy_text, params, batch, tiers, strategy):
  """Routed gradients and norms of `strategy` equal brute force (jitted once per case)."""
  compiled = _jitted(
    ("compiled", policy_text, loss_fn),
    lambda: compile_policy(Policy.from_toml(policy_text), params, TAXONOMY),
  )
  fn = _jitted(
    ("fn", policy_text, loss_fn, strategy),
    lambda: jax.jit(routed_value_and_grad(loss_fn, compiled, strategy, with_norms=True)),
  )
  labels = labels_of(tiers)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    _, grads, norms = fn(params, batch, labels)
  expected, expected_norms = brute_force(loss_fn, compiled, params, batch, labels)
  assert_close(grads, expected)
  np.testing.assert_allclose(np.asarray(norms), expected_norms, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Routing: every strategy equals brute force on each slice.


@pytest.mark.parametrize("strategy", ["cotangent", "per_example", "auto"])
@pytest.mark.parametrize("reshaped", [False, True], ids=["heads", "reshaped-kernel"])
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), tiers=st.lists(st.integers(0, 3), min_size=5, max_size=5))
def test_per_head_groups_equal_brute_force_with_norms(strategy, reshaped, seed, tiers):
  params = attention_params(seed)
  batch = jax.random.randint(jax.random.key(seed + 1), (5, 7), 0, 16)
  check(_RESHAPED if reshaped else attention_loss, HEADS, params, batch, tiers, strategy)


def _RESHAPED(p, x):  # noqa: N802
  return attention_loss(p, x, reshaped=True)


MOE_CONFIG = moe.Config(seq_len=6, d_model=8, num_heads=2, num_experts=4, expert_dim=8, top_k=2)
MOE = (
  moe.policy_text(MOE_CONFIG)
  .replace('when = "sensitivity_tier >= 2"', 'when = "tier >= 2"')
  .replace("when = \"license_class == 'unknown'\"", 'when = "tier == 1"')
)


def moe_loss(p, tokens):
  return moe.example_loss(p, tokens, MOE_CONFIG)


@pytest.mark.parametrize("strategy", ["cotangent", "per_example", "auto"])
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), tiers=st.lists(st.integers(0, 3), min_size=4, max_size=4))
def test_per_expert_groups_equal_brute_force_with_norms(strategy, seed, tiers):
  params = moe.init(jax.random.key(seed), MOE_CONFIG)
  batch = jax.random.randint(jax.random.key(seed + 1), (4, MOE_CONFIG.seq_len + 1), 1, 256)
  check(moe_loss, MOE, params, batch, tiers, strategy)


def _fast_axes(loss_fn, params, example, compiled, labels):
  """The plan's leaves scaled at their uses (leaf path -> sliced axis)."""
  p_leaves, p_def = jax.tree.flatten(params)
  weights = p_def.flatten_up_to(compiled.leaf_weights(labels))
  per = [plan_lib.per_example_weights(w, p, 1) for w, p in zip(weights, p_leaves)]
  sliced = frozenset(i for i, (_, s) in enumerate(per) if s)
  axes = {i: slices_axis(per[i][0], p_leaves[i]) for i in sliced}
  ex_leaves, ex_def = jax.tree.flatten(example)
  plan = plan_lib.make_plan(
    loss_fn,
    p_leaves,
    p_def,
    tuple(plan_lib.struct(x) for x in ex_leaves),
    ex_def,
    sliced,
    False,
    (),
    axes,
  )
  return {compiled.leaf_paths[i]: a for i, a in plan.slice_axes.items()}, plan.slice_leaves


def slices_axis(w, leaf):
  from aqgov.routing._slices import slice_axis

  return slice_axis(w.shape[1:], leaf.shape)


def test_heads_and_experts_are_scaled_at_their_uses_without_batching_the_parameter():
  labels = labels_of([0])
  params = attention_params(0)
  compiled = compile_policy(Policy.from_toml(HEADS), params, TAXONOMY)
  fast, batched = _fast_axes(attention_loss, params, jnp.zeros((7,), jnp.int32), compiled, labels)
  assert fast == {"attn/wq": 1, "attn/wo": 0, "attn/wk": 1, "attn/wv": 1} and not batched
  fast, batched = _fast_axes(
    lambda p, x: attention_loss(p, x, True), params, jnp.zeros((7,), jnp.int32), compiled, labels
  )
  assert "attn/wq" not in fast and len(batched) == 1  # a reshaped kernel is scaled at the leaf
  params = moe.init(jax.random.key(0), MOE_CONFIG)
  compiled = compile_policy(Policy.from_toml(MOE), params, TAXONOMY)
  example = jnp.ones((MOE_CONFIG.seq_len + 1,), jnp.int32)
  fast, batched = _fast_axes(moe_loss, params, example, compiled, labels)
  assert fast == {"blocks/0/moe/w_in": 0, "blocks/0/moe/w_out": 0, "blocks/0/attn/wo": 0}
  assert not batched
