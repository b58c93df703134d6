"""What a governed step applied: effective weights per example and group after fallback routes,
dropped examples, pause, reroute and freeze, held equal to brute force."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import aqgov
from aqgov.entropy._profile import Bound, EntropyProfile
from aqgov.errors import ProfileError
from aqgov.governed import GovernanceState, governed_step
from aqgov.lineage._task import TrainState

TAXONOMY = """
[authority]
name = "lab"

[fields.tier]
type = "enum"
values = ["public", "sensitive", "holdout"]
"""

POLICY = """
name = "lab-routing"

[groups]
embed = ["embed/**"]
core = ["core/**"]
head = ["head/**"]

[[rules]]
when = "tier == 'holdout'"
route = {}

[[rules]]
when = "tier == 'sensitive'"
route = { core = 0.5, head = 1.0 }

[default]
route = { embed = 1.0, core = 1.0, head = 1.0 }
"""
TIERS = ("public", "sensitive", "holdout")


def _params():
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  return {
    "embed": {"w": jax.random.normal(k[0], (4, 6)) * 0.5},
    "core": {"w": jax.random.normal(k[1], (6, 6)) * 0.5},
    "head": {"w": jax.random.normal(k[2], (6, 3)) * 0.5},
  }


def _loss(params, example):
  h = jnp.tanh(example["x"] @ params["embed"]["w"])
  h = jnp.tanh(h @ params["core"]["w"])
  logits = h @ params["head"]["w"]
  return -jax.nn.log_softmax(logits)[example["y"]]


@functools.cache
def _compiled():
  return aqgov.compile_policy(
    aqgov.Policy.from_toml(POLICY), _params(), aqgov.Taxonomy.from_toml(TAXONOMY)
  )


def _class_of(tier: str) -> str:
  """The composed route class name of examples of `tier`."""
  labels = aqgov.Taxonomy.from_toml(TAXONOMY).encode([{"tier": tier}])
  return _compiled().class_names[int(_compiled().route_class(labels)[0])]


def _always(group: str, action: str, **kw) -> Bound:
  """A bound on the group's gradient entropy that breaks whenever it is measured."""
  return Bound(group=group, metric="gradient_entropy", low=1e9, action=action, **kw)


@functools.cache
def _step(config: str):
  """The governed step of a profile that, over steps 1-5, reroutes the core at x0.25 (step 1),
  fires a fallback route sending sensitive examples to the head only (step 2, measured on the
  head, which they reach; it holds for steps
  3-4), freezes the head (step 3) and pauses (step 5)."""
  bounds = (
    _always("core", "reroute", fallback=0.25, steps=(1, 2)),
    _always(
      "head", "route", steps=(2, 3), classes=[_class_of("sensitive")], to=["head"], duration=2
    ),
    _always("head", "reroute", fallback=0.0, steps=(3, 4)),
    _always("core", "pause", steps=(5, 6)),
  )
  profile = EntropyProfile(
    name="every-action", bounds=bounds, optimizer_state="advance" if "advance" in config else "hold"
  )
  tx, step = governed_step(
    _loss, _compiled(), optax.sgd(1.0), profile=profile, strict="strict" in config
  )
  return tx, jax.jit(step)


def _batch(tiers, seed):
  rng = np.random.default_rng(seed)
  b = len(tiers)
  inputs = {
    "x": jnp.asarray(rng.normal(size=(b, 4)), jnp.float32),
    "y": jnp.asarray(rng.integers(0, 3, size=b), jnp.int32),
  }
  labels = aqgov.Taxonomy.from_toml(TAXONOMY).encode([{"tier": t} for t in tiers])
  return {"inputs": inputs, "index": jnp.arange(b, dtype=jnp.int32)}, labels


def _state(tx):
  params = _params()
  governance = GovernanceState(jnp.zeros((_compiled().num_groups,), bool))
  return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), governance)


_per_example_grads = jax.jit(jax.vmap(jax.grad(_loss), in_axes=(None, 0)))  # the brute force


def _per_group(compiled, tree) -> list[list[np.ndarray]]:
  leaves = jax.tree_util.tree_leaves(tree)
  return [
    [np.asarray(x, np.float64) for x, lg in zip(leaves, compiled.leaf_group) if lg == g]
    for g in range(compiled.num_groups)
  ]


@pytest.mark.parametrize(
  "config", ["hold, strict", pytest.param("advance", marks=pytest.mark.slow)]
)
@settings(max_examples=16, deadline=None)
@given(
  tiers=st.lists(st.sampled_from(TIERS), min_size=4, max_size=4),  # one shape: one compile
  seed=st.integers(0, 2**16),
)
def test_effective_weights_times_per_example_gradients_are_the_applied_update(config, tiers, seed):
  compiled = _compiled()
  tx, step = _step(config)
  state = _state(tx)
  batch, labels = _batch(tiers, seed)
  per_example = _per_example_grads
  for _ in range(5):
    new, summary = step(state, batch, labels)
    s = jax.device_get(summary)
    grads = _per_group(compiled, per_example(state.params, batch["inputs"]))
    moved = _per_group(
      compiled, jax.tree.map(lambda a, b: np.float64(a) - np.float64(b), new.params, state.params)
    )
    a = np.asarray(s.applied_weights, np.float64)
    for g in range(compiled.num_groups):
      for leaf_grads, leaf_moved in zip(grads[g], moved[g]):
        want = -np.tensordot(a[:, g], leaf_grads, axes=1) / len(tiers)  # sgd(1.0)
        np.testing.assert_allclose(leaf_moved, want, rtol=2e-5, atol=2e-6)
      norms = np.sqrt(
        sum(np.sum((a[:, g, None] * x.reshape(len(tiers), -1)) ** 2, 1) for x in grads[g])
      )
      np.testing.assert_allclose(
        np.asarray(s.contribution_norms)[:, g] * np.asarray(s.applied_scale)[g],
        norms,
        rtol=2e-4,
        atol=1e-6,
      )
    assert (a <= np.asarray(s.weights)).all()  # enforcement never grants more than the policy
    w, number = np.asarray(s.weights), int(s.step)
    sensitive = np.asarray([t == "sensitive" for t in tiers])
    core, head = _compiled().group_names.index("core"), _compiled().group_names.index("head")
    expect = {1: w[:, core] * 0.25, 5: 0 * w[:, core]}
    if number in expect:
      np.testing.assert_array_equal(a[:, core], expect[number])
    if number in (3, 4):  # the fallback route sends sensitive examples to the head only
      assert (a[sensitive][:, [g for g in range(3) if g != head]] == 0).all()
    if number == 3:
      assert (a[:, head] == 0).all()
    state = new


def test_a_route_bound_names_route_classes_and_groups_to_keep():
  with pytest.raises(ProfileError, match="needs `classes`"):
    _always("core", "route", to=["head"])
  with pytest.raises(ProfileError, match="needs `to`"):
    _always("core", "route", classes=["x"])
  with pytest.raises(ProfileError, match="only apply to action = 'route'"):
    _always("core", "pause", classes=["x"], to=["head"])
  with pytest.raises(ProfileError, match="`fallback` scales"):
    _always("core", "route", classes=["x"], to=["head"], fallback=0.0)
  with pytest.raises(ProfileError, match="optimizer_state"):
    EntropyProfile(name="p", optimizer_state="freeze")
  profile = EntropyProfile(
    name="p", bounds=[_always("core", "route", classes=["nobody*"], to=["head"])]
  )
  with pytest.raises(ProfileError, match="matches none of the compiled policy's route classes"):
    aqgov.enforce(profile, _compiled(), optax.sgd(1.0))
  unknown = EntropyProfile(name="p", bounds=[_always("core", "route", classes=["*"], to=["x"])])
  with pytest.raises(ProfileError, match=r"names group\(s\) \['x'\]"):
    aqgov.enforce(unknown, _compiled(), optax.sgd(1.0))


def test_profiles_without_routes_or_optimizer_state_keep_their_canonical_form():
  plain = EntropyProfile(name="p", bounds=[_always("core", "pause")])
  assert "optimizer_state" not in plain.to_dict()
  assert "classes" not in plain.to_dict()["bounds"][0]
  routed = EntropyProfile(
    name="p",
    bounds=[_always("core", "route", classes=["b", "a"], to=["head"], duration=3)],
    optimizer_state="advance",
  )
  assert EntropyProfile.from_toml(routed.to_toml()) == routed
  assert routed.to_dict()["bounds"][0]["classes"] == ["a", "b"]
  assert routed.id != EntropyProfile(name="p", bounds=routed.bounds).id


def test_a_signed_profile_with_a_route_and_held_state_round_trips_and_verifies():
  from aqgov.documents import _keys as keys
  from aqgov.documents._document_type import sign, verify
  from aqgov.entropy._profile import PROFILE

  key = keys.generate("safety")
  profile = EntropyProfile(
    name="p",
    bounds=[_always("core", "route", classes=["*"], to=["head"], duration=2)],
    optimizer_state="advance",
  )
  signed = sign(PROFILE, profile, key)
  assert verify(PROFILE, signed, keys.TrustStore.of([key])) == profile
  with pytest.raises(ProfileError, match=r"\[\[bound\]\] #1: .*needs `to`"):
    EntropyProfile.from_toml(
      'name = "p"\n[[bound]]\ngroup = "core"\nmetric = "gradient_entropy"\nlow = 1.0\n'
      'action = "route"\nclasses = ["*"]\n'
    )
