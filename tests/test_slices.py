"""Slice groups: attention heads, experts and other slices of a leaf as governed groups.

A slice group takes parts of one axis of the leaves it matches; the rest of a leaf stays in its
whole-leaf group. Every routing strategy is held to brute force per slice: `(1/B) Σ_i w_i[part]
∇L_i` on each part, with each part's weight read from the compiled tables, and the per-example
contribution norms of each group summed over its parts.
"""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import aqgov
from aqgov.cli import main
from aqgov.documents._document_type import sign, verify
from aqgov.documents._keys import TrustStore, generate
from aqgov.entropy._metrics import gradient_entropy, group_gradient_entropy
from aqgov.errors import PolicyError
from aqgov.examples import moe
from aqgov.governed import governed_step
from aqgov.lineage._task import TrainState
from aqgov.policy import POLICY, Policy, compile_policy, compose, explain, explain_table
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


# ---------------------------------------------------------------------------------------------
# Policy syntax, explain, composition, signing.


def _policy(groups: str, route: str = "{}") -> Policy:
  return Policy.from_toml(f'name = "p"\n[groups]\n{groups}\n[default]\nroute = {route}\n')


def _compiled(policy, params=None):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", aqgov.policy.UncoveredParametersWarning)
    return compile_policy(policy, params or attention_params(0), TAXONOMY)


def test_a_slice_group_takes_its_parts_and_the_rest_of_the_leaf_stays_in_its_whole_leaf_group():
  policy = _policy(
    'heads_0_1 = { pattern = "attn/wq", axis = 1, split = 4, index = "0:2" }\ncore = ["**"]',
    "{ heads_0_1 = 0.5, core = 1.0 }",
  )
  compiled = _compiled(policy)
  wq = compiled.leaf_paths.index("attn/wq")
  parts = [p for p in compiled.parts_list if p.leaf == wq]
  names = [compiled.group_names[p.group] for p in parts]
  assert [(n, p.axis, p.start, p.stop) for n, p in zip(names, parts)] == [
    ("heads_0_1", 1, 0, 4),
    ("core", 1, 4, 8),
  ]
  weights = compiled.leaf_weights(labels_of([0, 3]))
  assert weights["attn"]["wq"].shape == (2, 8)
  np.testing.assert_array_equal(weights["attn"]["wq"][0], [0.5] * 4 + [1.0] * 4)
  np.testing.assert_array_equal(weights["attn"]["wk"], [1.0, 1.0])


def test_per_declares_one_group_per_part_and_a_route_naming_it_sets_every_part():
  policy = _policy(
    'expert = { pattern = "attn/wq", axis = 1, split = 4, per = "expert" }',
    '{ expert = 1.0, "expert[2]" = 0.25 }',
  )
  assert policy.group_names == ("expert[0]", "expert[1]", "expert[2]", "expert[3]")
  assert policy.default == {"expert[0]": 1.0, "expert[1]": 1.0, "expert[2]": 0.25, "expert[3]": 1.0}
  assert policy.slice_of("expert[2]") == aqgov.policy.Slice(1, 4, (2,))


@pytest.mark.parametrize(
  "groups, message",
  [
    (
      'a = { pattern = "attn/wq", axis = 1, split = 4, index = "0:2" }\n'
      'b = { pattern = "attn/*", axis = 1, split = 8, index = 3 }',
      r"'a' \(\[0:4\]\) and 'b' \(\[3:4\]\) overlap on axis 1 of 'attn/wq'",
    ),
    (
      'a = { pattern = "attn/wq", axis = 0, split = 2, index = 0 }\n'
      'b = { pattern = "attn/wq", axis = 1, split = 2, index = 1 }',
      "along different axes",
    ),
    ('a = { pattern = "attn/wq", axis = 1, split = 3, index = 0 }', "do not divide it"),
    ('a = { pattern = "attn/wq", axis = 2, split = 2, index = 0 }', "cuts axis 2 of 'attn/wq'"),
  ],
)
def test_slices_that_overlap_or_do_not_fit_the_leaf_are_policy_errors(groups, message):
  with pytest.raises(PolicyError, match=message):
    _compiled(_policy(groups + '\ncore = ["**"]'))


@pytest.mark.parametrize(
  "spec, message",
  [
    ('{ pattern = "x", axis = 1, split = 4 }', "needs 'index'"),
    ('{ pattern = "x", split = 4, index = 0 }', "needs 'axis' and 'split'"),
    ('{ pattern = "x", axis = 1, split = 4, index = "2:9" }', "distinct parts among 0..3"),
    ('{ pattern = "x", axis = 1, split = 4, index = 0, per = "head" }', "not both"),
    ('{ pattern = "x", axis = 1, split = 0, per = "head" }', "at least 1"),
    ('{ pattern = "x", axis = 1, split = 2, per = "wombat" }', "per = 'wombat'"),
    ('{ pattern = "x", axis = 1, split = 2, index = 0, visible = "routed" }', "whole-leaf groups"),
    ('{ pattern = "x", axis = "1", split = 2, index = 0 }', "must be an integer"),
  ],
)
def test_malformed_slice_declarations_say_what_to_write(spec, message):
  with pytest.raises(PolicyError, match=message):
    _policy(f"a = {spec}")


def test_slice_policies_round_trip_keep_their_id_and_sign_and_verify():
  policy = Policy.from_toml(HEADS)
  assert Policy.from_toml(policy.to_toml()) == policy
  assert Policy.from_dict(policy.to_dict()).id == policy.id
  other = Policy.from_toml(HEADS.replace("split = 2, index = 0", "split = 2, index = 1"))
  assert other.id != policy.id
  key = generate("lab")
  signed = sign(POLICY, policy, key)
  assert verify(POLICY, signed, TrustStore.of([key])).id == policy.id


def test_composition_takes_the_most_restrictive_weight_per_slice():
  heads = _policy(
    'h = { pattern = "attn/wq", axis = 1, split = 4, per = "head" }\ncore = ["**"]',
    '{ h = 1.0, "h[1]" = 0.5, core = 1.0 }',
  )
  coarse = Policy.from_toml(
    'name = "coarse"\n[groups]\nattn = ["attn/**"]\nrest = ["**"]\n'
    "[default]\nroute = { attn = 0.25, rest = 1.0 }\n"
  )
  compiled = _compiled(compose([heads, coarse]))
  wq = compiled.leaf_weights(labels_of([0]))["attn"]["wq"][0]
  np.testing.assert_array_equal(wq, [0.25] * 8)  # min(1, 0.25), min(0.5, 0.25)
  strict_heads = Policy.from_toml(
    'name = "coarse"\n[groups]\nattn = ["attn/**"]\nrest = ["**"]\n'
    "[default]\nroute = { attn = 0.75, rest = 1.0 }\n"
  )
  wq = _compiled(compose([heads, strict_heads])).leaf_weights(labels_of([0]))["attn"]["wq"][0]
  np.testing.assert_array_equal(wq, [0.75, 0.75, 0.5, 0.5, 0.75, 0.75, 0.75, 0.75])
  clash = _policy('h = { pattern = "attn/wq", axis = 1, split = 2, per = "head" }')
  with pytest.raises(PolicyError, match="'h\\[0\\]' means"):
    compose([heads, clash.__class__.create("other", clash.groups, default={})])


def test_explain_shows_slice_groups_with_their_sizes(tmp_path):
  compiled = _compiled(Policy.from_toml(HEADS))
  table = explain_table(compiled)
  sizes = dict(zip(table.columns, table.sizes))
  assert sizes["q[0]"] == sizes["o[3]"] == D * 2 and sizes["kv_low"] == 2 * D * 4
  assert sizes["core"] == 16 * D + D + D * 16 + 2 * D * 4
  text = explain(compiled)
  assert "q[0] (1 leaves, 16 params)" in text
  assert "slice kv_low = attn/wk[axis 1: 0:4], attn/wv[axis 1: 0:4]" in text
  (tmp_path / "p.toml").write_text(HEADS)
  shapes = {"embed": [16, D], "attn": {k: [D, D] for k in ("wq", "wk", "wv", "wo")}, "scale": [D]}
  shapes["head"] = [16, D]
  (tmp_path / "shapes.json").write_text(json.dumps(shapes))
  out = CliRunner().invoke(
    main, ["policy", "explain", str(tmp_path / "p.toml"), "--params", str(tmp_path / "shapes.json")]
  )
  assert out.exit_code == 0, out.output
  assert "slice o[2] = attn/wo[axis 0: 4:6]" in out.output and "q[3]" in out.output


# ---------------------------------------------------------------------------------------------
# Strict mode, fingerprints and entropies per slice group.


def _state(params, optimizer, compiled):
  return TrainState(
    jnp.zeros((), jnp.int32),
    params,
    optimizer.init(params),
    aqgov.governed.GovernanceState(jnp.zeros((compiled.num_groups,), bool)),
  )


def _batch(size, seed=0):
  tokens = jax.random.randint(jax.random.key(seed), (size, 7), 0, 16)
  return {"inputs": tokens, "index": jnp.arange(size, dtype=jnp.int32)}


def test_strict_mode_freezes_the_slices_no_example_reached_despite_momentum():
  params = attention_params(0)
  compiled = _compiled(Policy.from_toml(HEADS), params)
  optimizer = optax.adam(1e-2)
  tx, step = governed_step(attention_loss, compiled, optimizer, strict=True)
  step = jax.jit(step)
  state, _ = step(_state(params, tx, compiled), _batch(4), labels_of([0] * 4))
  before = state.params
  state, _ = step(state, _batch(4, 1), labels_of([1] * 4))  # reaches q[0], o[2] and core only
  wq_new, wq_old = np.asarray(state.params["attn"]["wq"]), np.asarray(before["attn"]["wq"])
  np.testing.assert_array_equal(wq_new[:, 2:], wq_old[:, 2:])
  assert np.all(wq_new[:, :2] != wq_old[:, :2])
  wo_new, wo_old = np.asarray(state.params["attn"]["wo"]), np.asarray(before["attn"]["wo"])
  np.testing.assert_array_equal(np.delete(wo_new, [4, 5], 0), np.delete(wo_old, [4, 5], 0))
  assert np.all(wo_new[4:6] != wo_old[4:6])
  wk_new, wk_old = np.asarray(state.params["attn"]["wk"]), np.asarray(before["attn"]["wk"])
  np.testing.assert_array_equal(wk_new[:, :4], wk_old[:, :4])  # kv_low: not in the route
  assert np.all(wk_new[:, 4:] != wk_old[:, 4:])  # the rest of wk is core


def test_a_sliced_leaf_fingerprints_each_slice_into_its_own_group():
  params = attention_params(0)
  compiled = _compiled(Policy.from_toml(HEADS), params)
  optimizer = optax.sgd(0.0)  # the step leaves the parameters as they are
  tx, step = governed_step(attention_loss, compiled, optimizer)
  step = jax.jit(step)
  labels = labels_of([3, 3])
  _, a = step(_state(params, tx, compiled), _batch(2), labels)
  changed = jax.tree.map(lambda x: x, params)
  changed["attn"]["wq"] = changed["attn"]["wq"].at[3, 5].add(1.0)  # head 2 of wq
  _, b = step(_state(changed, tx, compiled), _batch(2), labels)
  differs = np.any(np.asarray(a.fingerprint) != np.asarray(b.fingerprint), axis=1)
  assert [compiled.group_names[g] for g in np.flatnonzero(differs)] == ["q[2]"]
  unsliced = _compiled(Policy.from_toml('name = "w"\n[groups]\nall = ["**"]\n'), params)
  plain = aqgov.lineage.fingerprint(params, unsliced.leaf_group, 1, 0)
  np.testing.assert_array_equal(
    plain, aqgov.lineage.fingerprint(unsliced.parts(params), unsliced.part_group, 1, 0)
  )


def test_gradient_entropy_of_a_slice_group_is_measured_over_its_slices():
  params = attention_params(3)
  compiled = _compiled(Policy.from_toml(HEADS), params)
  grads = jax.tree.map(lambda x: jnp.abs(x) + 0.1, params)
  got = group_gradient_entropy(grads, compiled)
  np.testing.assert_allclose(got["q[1]"], gradient_entropy(grads["attn"]["wq"][:, 2:4]), rtol=1e-6)
  core = [grads["embed"], grads["scale"], grads["head"]]
  core += [grads["attn"][k][:, 4:] for k in ("wk", "wv")]
  np.testing.assert_allclose(got["core"], gradient_entropy(core), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Subspace routes.

SUBSPACE = """
name = "subspace"
[groups]
attn = ["attn/**"]
rest = ["**"]
[[rules]]
when = "tier == 1"
route = { attn = 1.0, rest = 0.5 }
subspace = { attn = { rank = 3, seed = 1234 } }
[[rules]]
when = "tier == 2"
route = { attn = 0.5, rest = 1.0 }
subspace = { attn = { rank = 2, seed = 7 }, rest = { rank = 5, seed = 8 } }
[default]
route = { attn = 1.0, rest = 1.0 }
"""


def subspace_brute_force(loss_fn, compiled, params, batch, labels):
  """Per example: each leaf's gradient projected (U Uᵀ, the published basis) when its class is
  confined there, times its weight; the mean over the batch and [B, G] norms."""
  from aqgov.policy._subspaces import basis

  classes = np.asarray(compiled.route_class(labels))
  grad = _jitted(("brute", loss_fn), lambda: jax.jit(jax.vmap(jax.grad(loss_fn), (None, 0))))
  leaves, treedef = jax.tree.flatten(grad(params, batch))
  where = {(c, leaf): s for c, leaf, s in compiled.subspaces}
  out, sq = [], np.zeros((len(classes), compiled.num_groups))
  for leaf, g in enumerate(leaves):
    g = np.asarray(g, np.float64)
    rows = []
    for i, c in enumerate(classes):
      gi = g[i].reshape(-1)
      if (c, leaf) in where:
        u = basis(where[c, leaf], compiled.leaf_paths[leaf], gi.size).astype(np.float64)
        gi = u @ (u.T @ gi)
      gi = gi * compiled.leaf_table[c, leaf]
      sq[i, compiled.leaf_group[leaf]] += np.sum(gi**2)
      rows.append(gi.reshape(g.shape[1:]))
    out.append(np.mean(rows, axis=0))
  return jax.tree.unflatten(treedef, out), np.sqrt(sq)


@pytest.mark.parametrize("strategy", ["cotangent", "per_example"])
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), tiers=st.lists(st.integers(0, 3), min_size=5, max_size=5))
def test_a_subspace_route_projects_its_class_gradient_onto_the_published_basis(
  strategy, seed, tiers
):
  params = attention_params(seed)
  batch = jax.random.randint(jax.random.key(seed + 1), (5, 7), 0, 16)
  compiled = _jitted(
    ("compiled", SUBSPACE), lambda: compile_policy(Policy.from_toml(SUBSPACE), params, TAXONOMY)
  )
  fn = _jitted(
    ("fn", SUBSPACE, strategy),
    lambda: jax.jit(routed_value_and_grad(attention_loss, compiled, strategy, with_norms=True)),
  )
  labels = labels_of(tiers)
  _, grads, norms = fn(params, batch, labels)
  expected, expected_norms = subspace_brute_force(attention_loss, compiled, params, batch, labels)
  assert_close(grads, expected, rtol=5e-5)
  np.testing.assert_allclose(np.asarray(norms), expected_norms, rtol=2e-4, atol=1e-6)


def test_a_subspace_basis_is_orthonormal_derivable_from_the_policy_and_has_a_digest():
  from aqgov.policy._subspaces import Subspace, basis

  params = attention_params(0)
  compiled = _compiled(Policy.from_toml(SUBSPACE), params)
  digests = compiled.subspace_digests()
  assert {(d["leaf"], d["rank"]) for d in digests} >= {("attn/wq", 3), ("attn/wq", 2), ("head", 5)}
  u = basis(Subspace(3, 1234), "attn/wq", D * D)
  np.testing.assert_allclose(u.T @ u, np.eye(3), atol=1e-6)
  again = _compiled(Policy.from_toml(SUBSPACE), attention_params(1)).subspace_digests()
  assert again == digests  # the basis depends on the policy and the shapes, not the values
  import hashlib

  wq = next(d for d in digests if d["leaf"] == "attn/wq" and d["rank"] == 3)
  assert wq["basis_sha256"] == hashlib.sha256(u.astype("<f4").tobytes()).hexdigest()
  assert wq["group"] == "attn" and wq["seed"] == 1234


@pytest.mark.parametrize(
  "rule, message",
  [
    ("route = { rest = 1.0 }\nsubspace = { attn = { rank = 2, seed = 1 } }", "does not reach"),
    ("route = { attn = 1.0 }\nsubspace = { attn = { rank = 0, seed = 1 } }", "integer >= 1"),
    ("route = { attn = 1.0 }\nsubspace = { attn = { rank = 2 } }", "rank = <int>, seed = <int>"),
  ],
)
def test_malformed_subspace_routes_are_policy_errors(rule, message):
  text = f'name = "s"\n[groups]\nattn = ["attn/**"]\nrest = ["**"]\n[[rules]]\nwhen = "tier == 1"\n{rule}\n'
  with pytest.raises(PolicyError, match=message):
    Policy.from_toml(text)


def test_a_subspace_on_a_sliced_leaf_is_refused():
  text = """
name = "s"
[groups]
h = { pattern = "attn/wq", axis = 1, split = 4, per = "head" }
attn = ["attn/**"]
[[rules]]
when = "tier == 1"
route = { attn = 1.0 }
subspace = { attn = { rank = 2, seed = 1 } }
"""
  with pytest.raises(PolicyError, match="cut by slice groups and also confined to a subspace"):
    _compiled(Policy.from_toml(text))


def test_per_group_values_spread_over_each_leafs_parts():
  params = attention_params(0)
  compiled = _compiled(Policy.from_toml(HEADS), params)
  values = jnp.arange(compiled.num_groups, dtype=jnp.float32)
  spread = compiled.per_leaf(values)
  names = compiled.group_names
  wq = jnp.broadcast_to(spread["attn"]["wq"], (D, D))
  np.testing.assert_array_equal(wq[0], np.repeat([names.index(f"q[{h}]") for h in range(H)], 2))
  wk = jnp.broadcast_to(spread["attn"]["wk"], (D, D))
  np.testing.assert_array_equal(wk[0], [names.index("kv_low")] * 4 + [names.index("core")] * 4)
  assert float(spread["embed"]) == names.index("core")


def test_gradient_sketches_are_refused_for_slice_groups_with_the_reason():
  from aqgov.errors import RoutingError
  from aqgov.routing import SketchSpec

  compiled = compile_policy(Policy.from_toml(HEADS), attention_params(0), TAXONOMY)
  with pytest.raises(RoutingError, match="slice or subspace groups"):
    routed_value_and_grad(attention_loss, compiled, sketch=SketchSpec(dim=16))
