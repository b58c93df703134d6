"""Entropy metrics: extremes, invariances, ranges, and measurements from the three representation sources."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import aqgov
from aqgov.entropy import _metrics as entropy
from aqgov.entropy._profile import Bound, EntropyProfile, Representation
from aqgov.routing._value_and_grad import routed_value_and_grad

import attention_models as am

seeds = st.integers(0, 2**31 - 1)


def _rng(seed):
  return np.random.default_rng(seed)


def _softmax_probs(rng, shape, temperature=1.0):
  logits = rng.normal(size=shape) / temperature
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def _orthogonal(rng, d):
  q, r = np.linalg.qr(rng.normal(size=(d, d)))
  return q * np.sign(np.diag(r))


# A few fixed shapes (values vary freely): every new shape costs a compilation.
attn_shapes = st.sampled_from([(1, 1, 2), (3, 2, 5, 7), (2, 2, 3, 4, 9)])
rep_shapes = st.sampled_from([(2, 2), (9, 4), (3, 8)])
leaf_sizes = st.sampled_from([(2,), (5, 1, 3), (7, 20)])

attention_entropy = jax.jit(entropy.attention_entropy)
renyi2 = jax.jit(entropy.renyi2, static_argnames="center")
effective_rank = jax.jit(entropy.effective_rank, static_argnames="center")
gradient_entropy = jax.jit(entropy.gradient_entropy)


def _attn_shape(spec):
  return spec


# --- attention entropy ------------------------------------------------------------------------


@given(attn_shapes)
def test_uniform_attention_has_entropy_one_per_head(spec):
  shape = _attn_shape(spec)
  got = attention_entropy(np.full(shape, 1.0 / shape[-1], np.float32))
  assert got.shape == (shape[-3],)
  np.testing.assert_allclose(got, 1.0, atol=1e-6)


@given(attn_shapes, seeds)
def test_one_hot_attention_has_entropy_zero(spec, seed):
  shape = _attn_shape(spec)
  idx = _rng(seed).integers(0, shape[-1], size=shape[:-1])
  got = attention_entropy(np.eye(shape[-1], dtype=np.float32)[idx])
  np.testing.assert_allclose(got, 0.0, atol=1e-7)


@given(st.sampled_from([(1, 2), (3, 6)]))
def test_uniform_over_causally_allowed_keys_has_entropy_one(spec):
  heads, t = spec
  allowed = np.tril(np.ones((t, t)))
  probs = np.broadcast_to(allowed / allowed.sum(-1, keepdims=True), (heads, t, t))
  got = attention_entropy(probs, mask=allowed.astype(bool))
  np.testing.assert_allclose(got, 1.0, atol=1e-6)


def test_queries_with_a_single_allowed_key_are_left_out_of_the_mean():
  t = 4
  allowed = np.tril(np.ones((t, t)))
  probs = allowed / allowed.sum(-1, keepdims=True)
  probs[1:] = np.eye(t)[1:]  # rows 1..3 one-hot: entropy 0; row 0 has one key: not measurable
  got = attention_entropy(probs[None], mask=allowed.astype(bool))
  np.testing.assert_allclose(got, [0.0], atol=1e-7)
  none_measurable = attention_entropy(
    np.ones((1, 1, 1, 3)) / 3, mask=np.asarray([[True, False, False]])
  )
  assert np.isnan(np.asarray(none_measurable)).all()


@given(attn_shapes, seeds)
def test_attention_entropy_is_invariant_to_key_permutation(spec, seed):
  shape = _attn_shape(spec)
  rng = _rng(seed)
  probs = _softmax_probs(rng, shape)
  mask = rng.random(shape) < 0.7
  probs = np.where(mask, probs, 0.0).astype(np.float32)
  perm = rng.permutation(shape[-1])
  np.testing.assert_allclose(
    attention_entropy(probs[..., perm], mask[..., perm]),
    attention_entropy(probs, mask),
    rtol=1e-5,
    atol=1e-6,
  )


@given(attn_shapes, seeds, st.floats(0.05, 5.0))
def test_attention_entropy_lies_in_the_unit_interval(spec, seed, temperature):
  got = np.asarray(attention_entropy(_softmax_probs(_rng(seed), _attn_shape(spec), temperature)))
  assert ((got >= 0.0) & (got <= 1.0)).all()


def test_attention_entropy_is_per_head():
  uniform = np.full((1, 4, 4), 0.25)
  one_hot = np.eye(4)[np.zeros((1, 4), int)]
  np.testing.assert_allclose(
    attention_entropy(np.concatenate([uniform, one_hot])), [1.0, 0.0], atol=1e-6
  )


def test_attention_entropy_jits_to_the_same_value():
  probs = _softmax_probs(_rng(0), (3, 2, 5, 6))
  np.testing.assert_allclose(
    jax.jit(entropy.attention_entropy)(probs), attention_entropy(probs), rtol=1e-6
  )


# --- Renyi-2 and effective rank ---------------------------------------------------------------


@given(rep_shapes, seeds)
def test_isotropic_representations_have_renyi2_one_and_full_effective_rank(shape, seed):
  n, d = shape
  rng = _rng(seed)
  r = min(n, d)
  # equal singular values: orthonormal columns (n >= d) or rows (n < d)
  q = np.linalg.qr(rng.normal(size=(max(n, d), r)))[0]
  reps = (q if n >= d else q.T).astype(np.float32) * 3.0
  np.testing.assert_allclose(renyi2(reps), 1.0, atol=1e-5)
  np.testing.assert_allclose(effective_rank(reps), r, rtol=1e-4)


@given(rep_shapes, seeds)
def test_rank_one_representations_have_renyi2_zero_and_effective_rank_one(shape, seed):
  n, d = shape
  rng = _rng(seed)
  reps = np.outer(rng.normal(size=n), rng.normal(size=d)).astype(np.float32)
  np.testing.assert_allclose(renyi2(reps), 0.0, atol=1e-5)
  np.testing.assert_allclose(effective_rank(reps), 1.0, atol=1e-3)


@given(rep_shapes, seeds, st.floats(1e-3, 1e3))
def test_renyi2_and_effective_rank_are_invariant_to_rotation_and_scaling(shape, seed, scale):
  n, d = shape
  rng = _rng(seed)
  reps = rng.normal(size=(n, d)).astype(np.float32)
  moved = (scale * reps @ _orthogonal(rng, d)).astype(np.float32)
  np.testing.assert_allclose(renyi2(moved), renyi2(reps), atol=2e-5)
  np.testing.assert_allclose(effective_rank(moved), effective_rank(reps), rtol=2e-4)


@given(rep_shapes, seeds)
def test_renyi2_and_effective_rank_stay_in_range(shape, seed):
  n, d = shape
  rng = _rng(seed)
  reps = (rng.normal(size=(n, d)) * rng.exponential(size=d)).astype(np.float32)
  h2, rank = float(renyi2(reps)), float(effective_rank(reps))
  assert 0.0 <= h2 <= 1.0
  assert 1.0 <= rank <= min(n, d)


@given(rep_shapes, seeds)
def test_centering_removes_a_shared_offset(shape, seed):
  n, d = shape
  rng = _rng(seed)
  reps = rng.normal(size=(n, d)).astype(np.float32)
  shifted = (reps + rng.normal(size=(1, d)) * 10).astype(np.float32)
  np.testing.assert_allclose(renyi2(shifted, center=True), renyi2(reps, center=True), atol=1e-4)


def test_zero_representations_count_as_collapsed():
  assert float(renyi2(np.zeros((5, 3)))) == 0.0
  assert float(effective_rank(np.zeros((5, 3)))) == 1.0


def test_leading_axes_of_representations_are_flattened_into_samples():
  reps = _rng(1).normal(size=(2, 3, 4)).astype(np.float32)
  np.testing.assert_allclose(renyi2(reps), renyi2(reps.reshape(6, 4)), rtol=1e-6)


def test_degenerate_shapes_are_refused():
  with pytest.raises(ValueError, match="N >= 2 and D >= 2"):
    renyi2(np.ones((5, 1)))
  with pytest.raises(ValueError, match="at least 2 keys"):
    attention_entropy(np.ones((1, 3, 1)))


# --- gradient entropy -------------------------------------------------------------------------


def _tree(rng, sizes):
  return {f"p{i}": rng.normal(size=s).astype(np.float32) for i, s in enumerate(sizes)}


@given(leaf_sizes, seeds)
def test_equal_magnitude_gradients_have_entropy_one(sizes, seed):
  rng = _rng(seed)
  tree = {k: np.sign(v) * 0.3 for k, v in _tree(rng, sizes).items()}
  np.testing.assert_allclose(gradient_entropy(tree), 1.0, atol=1e-5)


@given(leaf_sizes, seeds)
def test_a_single_nonzero_gradient_entry_has_entropy_zero(sizes, seed):
  rng = _rng(seed)
  tree = {k: np.zeros_like(v) for k, v in _tree(rng, sizes).items()}
  tree["p0"][0] = -2.5
  np.testing.assert_allclose(gradient_entropy(tree), 0.0, atol=1e-6)


@given(leaf_sizes, seeds, st.floats(1e-4, 1e4))
def test_gradient_entropy_is_invariant_to_signs_permutations_and_positive_scaling(
  sizes, seed, scale
):
  rng = _rng(seed)
  tree = _tree(rng, sizes)
  flat = np.concatenate(list(tree.values()))
  moved = (
    flat[rng.permutation(flat.size)] * rng.choice([-1.0, 1.0], size=flat.size) * scale
  ).astype(np.float32)
  splits = np.cumsum(sizes)[:-1]
  moved_tree = dict(zip(tree, np.split(moved, splits)))
  np.testing.assert_allclose(gradient_entropy(moved_tree), gradient_entropy(tree), atol=2e-5)


@given(leaf_sizes, seeds)
def test_gradient_entropy_lies_in_the_unit_interval(sizes, seed):
  rng = _rng(seed)
  tree = {k: v * rng.exponential(size=v.shape) ** 3 for k, v in _tree(rng, sizes).items()}
  value = float(gradient_entropy(tree))
  assert 0.0 <= value <= 1.0


def test_a_zero_gradient_is_not_measured():
  assert math.isnan(float(gradient_entropy({"a": np.zeros(3), "b": np.zeros((2, 2))})))


# --- measurements -----------------------------------------------------------------------------


def _profile(src: am.Source, bounds=()) -> EntropyProfile:
  return EntropyProfile(
    name="lab",
    representations=(
      Representation(
        path=src.attention_path, group="core", kind="attention", heads=am.HEADS, causal=True
      ),
      Representation(path=src.features_path, group="head", kind="features"),
    ),
    bounds=tuple(bounds),
  )


@functools.cache
def _source(name: str) -> am.Source:
  return am.source(name)


@functools.cache
def _step_outputs(name: str):
  src = _source(name)
  compiled = aqgov.compile_policy(am.policy(), src.params, am.taxonomy())
  tokens, labels = am.batch()
  (_, aux), grads = routed_value_and_grad(src.loss, compiled, "per_example", has_aux=True)(
    src.params, tokens, labels
  )
  return compiled, grads, aux


@pytest.mark.parametrize("source", ["aux", "nnx", "linen"])
def test_measure_reads_every_metric_from_each_representation_source(source):
  src = _source(source)
  compiled, grads, aux = _step_outputs(src.name)
  got = jax.jit(
    lambda g, a: entropy.measure(
      _profile(src), compiled, grads=g, representations=a, metrics=entropy.METRICS
    )
  )(grads, aux)
  assert set(got) == {f"gradient_entropy/{g}" for g in ("embed", "core", "head")} | {
    "attention_entropy/core",
    "renyi2/head",
    "effective_rank/head",
  }
  assert got["attention_entropy/core"].shape == (am.HEADS,)
  reps = entropy.flatten(aux)
  probs = reps[src.attention_path]
  causal = jnp.tril(jnp.ones(probs.shape[-2:], bool))
  np.testing.assert_allclose(
    got["attention_entropy/core"], entropy.attention_entropy(probs, causal), rtol=1e-6
  )
  np.testing.assert_allclose(got["renyi2/head"], entropy.renyi2(reps[src.features_path]), rtol=1e-6)
  core = [g for g, grp in zip(jax.tree_util.tree_leaves(grads), compiled.leaf_group) if grp == 1]
  np.testing.assert_allclose(
    got["gradient_entropy/core"], entropy.gradient_entropy(core), rtol=1e-5
  )


def test_nnx_and_linen_intermediates_flatten_to_their_module_paths():
  assert set(entropy.flatten(_step_outputs("nnx")[2])) == {"core/probs/0", "features/0"}
  assert set(_step_outputs("linen")[2]) == {
    "core/probs/0",
    "core/__call__/0",
    "embed/__call__/0",
    "head/__call__/0",
    "__call__/0",
  }


def test_measure_defaults_to_what_the_profile_bounds():
  src = _source("aux")
  compiled, grads, aux = _step_outputs(src.name)
  profile = _profile(
    src,
    [
      Bound(group="core", metric="attention_entropy", low=0.2, action="pause"),
      Bound(group="embed", metric="gradient_entropy", low=0.1, action="pause"),
    ],
  )
  assert set(entropy.measure(profile, compiled, grads=grads, representations=aux)) == {
    "attention_entropy/core",
    "gradient_entropy/embed",
  }


def test_a_bound_the_step_cannot_measure_is_a_profile_error():
  src = _source("aux")
  compiled, grads, aux = _step_outputs(src.name)
  profile = _profile(
    src, [Bound(group="embed", metric="gradient_entropy", low=0.1, action="pause")]
  )
  with pytest.raises(aqgov.ProfileError, match="pass grads="):
    entropy.measure(profile, compiled, representations=aux)


def test_a_representation_pattern_that_matches_nothing_is_a_profile_error():
  src = _source("aux")
  compiled, grads, aux = _step_outputs(src.name)
  profile = EntropyProfile(
    name="lab",
    representations=(
      Representation(path="atention", group="core", kind="attention", heads=am.HEADS),
    ),
    bounds=(Bound(group="core", metric="attention_entropy", low=0.2, action="pause"),),
  )
  with pytest.raises(aqgov.ProfileError, match="matched none"):
    entropy.measure(profile, compiled, grads=grads, representations=aux)


def test_wrong_head_count_is_a_profile_error():
  src = _source("aux")
  compiled, grads, aux = _step_outputs(src.name)
  profile = EntropyProfile(
    name="lab",
    representations=(Representation(path="attention", group="core", kind="attention", heads=3),),
    bounds=(Bound(group="core", metric="attention_entropy", low=0.2, action="pause"),),
  )
  with pytest.raises(aqgov.ProfileError, match="heads=3"):
    entropy.measure(profile, compiled, grads=grads, representations=aux)


def test_groups_unknown_to_the_policy_are_a_profile_error():
  src = _source("aux")
  compiled, grads, aux = _step_outputs(src.name)
  profile = EntropyProfile(
    name="lab", bounds=(Bound(group="adapter", metric="gradient_entropy", low=0.1, action="pause"),)
  )
  with pytest.raises(aqgov.ProfileError, match="adapter"):
    entropy.measure(profile, compiled, grads=grads)
