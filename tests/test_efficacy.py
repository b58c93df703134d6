"""The efficacy study: exposure, the generated corpus, and (slow) the direction of each claim."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aqgov.credentials import Taxonomy
from aqgov.examples import _canaries as canaries
from aqgov.examples import _efficacy_lm as lm
from aqgov.examples import efficacy
from aqgov.policy import Policy, compile_policy


def test_a_secret_scored_most_likely_has_maximal_exposure():
  rng = np.random.default_rng(0)
  others = rng.uniform(20.0, 30.0, 9_999)
  assert canaries.exposure(5.0, others) == pytest.approx(np.log2(10_000))
  assert canaries.extrapolated_exposure(5.0, others) > np.log2(10_000)


def test_a_secret_scored_like_the_candidates_has_chance_exposure():
  rng = np.random.default_rng(1)
  exposures = [canaries.exposure(rng.normal(), rng.normal(size=4_095)) for _ in range(400)]
  # the rank of an exchangeable secret is uniform: E[log2(N+1) - log2(rank)] = log2(e) ~ 1.44 bits
  assert np.mean(exposures) == pytest.approx(np.log2(np.e), abs=0.2)
  fitted = [
    canaries.extrapolated_exposure(rng.normal(), rng.normal(size=4_095)) for _ in range(400)
  ]
  assert np.mean(fitted) == pytest.approx(np.log2(np.e), abs=0.25)


def test_ties_count_against_the_secret():
  assert canaries.exposure(1.0, np.ones(1023)) == pytest.approx(0.0)


def test_the_model_scores_codes_as_its_full_forward_does():
  config = lm.Config(seq_len=40, d_model=32, num_heads=2, adapter_dim=8)
  params = lm.init(jax.random.PRNGKey(0), config)
  params = {**params, "adapter": jax.tree.map(lambda x: x + 0.1, params["adapter"])}
  canary = canaries.Canary("kalomi", "01234567")
  prefix = canaries.encode([canary.prefix], len(canary.prefix) - 1)[0]
  codes = canaries.candidate_codes(0, 3)
  scored = lm.score_codes(params, prefix, codes, config)
  for code, got in zip(codes, scored):
    row = jnp.concatenate([prefix, code])
    logits, _, _ = lm.run(params, row[:-1], config)
    logp = jax.nn.log_softmax(logits[len(prefix) - 1 :])
    want = -jnp.take_along_axis(logp, code[:, None], axis=-1).sum()
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_ablating_zeroes_exactly_the_adapters():
  params = lm.init(jax.random.PRNGKey(0))
  ablated = lm.ablate(params)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(ablated["adapter"]))
  assert all(
    np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(ablated["blocks"]), jax.tree.leaves(params["blocks"]))
  )


def test_the_corpus_is_deterministic_per_seed():
  trained, _ = canaries.make_canaries(3)
  a = canaries.training_stream(3, 20, 16, trained, 48)
  b = canaries.training_stream(3, 20, 16, trained, 48)
  c = canaries.training_stream(4, 20, 16, trained, 48)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not np.array_equal(a.tokens, c.tokens)
  assert canaries.make_canaries(3) == canaries.make_canaries(3) != canaries.make_canaries(4)


def test_canaries_fill_their_share_of_slots_and_filtering_removes_them():
  trained, _ = canaries.make_canaries(0)
  stream = canaries.training_stream(0, 200, 32, trained, 48)
  assert stream.sensitive.mean() == pytest.approx(0.07, abs=0.01)
  planted = canaries.encode([c.text for c in trained], 48)
  hits = stream.tokens[stream.sensitive]
  assert np.array_equal(hits, planted[stream.canary[stream.sensitive]])
  assert len(set(stream.canary[stream.sensitive].tolist())) == len(trained)
  text = bytes(stream.filtered.astype(np.uint8).ravel())
  assert b"secret code" not in text
  assert np.array_equal(stream.tokens[~stream.sensitive], stream.filtered[~stream.sensitive])


def test_never_seen_canaries_are_absent_from_the_training_data():
  trained, never_seen = canaries.make_canaries(0)
  assert len(trained) == 20 and len(never_seen) == 20
  assert not {c.name for c in trained} & {c.name for c in never_seen}
  stream = canaries.training_stream(0, 200, 32, trained, 48)
  text = bytes(stream.tokens.astype(np.uint8).ravel())
  assert all(c.name.encode() not in text and c.code.encode() not in text for c in never_seen)
  assert all(c.text.encode() in text for c in trained)


def test_the_policies_confine_sensitive_examples_to_the_adapters():
  setup = efficacy.make_setup(0, 4, batch_size=8, candidates=10)
  params = lm.init(jax.random.PRNGKey(0), setup.config)
  for last_only in (False, True):
    policy = Policy.from_toml(efficacy.policy_toml(visible=False, last_only=last_only))
    compiled = compile_policy(policy, params, Taxonomy.from_toml(efficacy.TAXONOMY))
    labels = {k: v[0] for k, v in setup.labels.items()}
    weights = compiled.leaf_weights(labels)
    sensitive = setup.stream.sensitive[0]
    for path, w in zip(compiled.leaf_paths, jax.tree.leaves(weights)):
      reached_by_sensitive = path.startswith("adapter/1/") or (
        path.startswith("adapter/") and not last_only
      )
      np.testing.assert_array_equal(
        np.asarray(w),
        np.where(sensitive, float(reached_by_sensitive), float(not path.startswith("adapter/"))),
      )


def test_with_visibility_ordinary_examples_do_not_see_the_adapters():
  setup = efficacy.make_setup(0, 4, batch_size=8, candidates=10)
  params = lm.init(jax.random.PRNGKey(0), setup.config)
  for visible in (False, True):
    policy = Policy.from_toml(efficacy.policy_toml(visible=visible))
    compiled = compile_policy(policy, params, Taxonomy.from_toml(efficacy.TAXONOMY))
    seen = np.asarray(compiled.group_visibility({k: v[0] for k, v in setup.labels.items()}))
    adapter = compiled.group_names.index("adapter")
    sensitive = setup.stream.sensitive[0]
    want = sensitive if visible else np.ones_like(sensitive)
    np.testing.assert_array_equal(seen[:, adapter], want)
    assert seen[:, [g for g in range(compiled.num_groups) if g != adapter]].all()


@pytest.mark.slow
def test_visibility_confines_the_canaries_to_the_adapter():
  rows = efficacy.run_seed(0, 300, candidates=1000, depth=False, attack=False)
  control, filtered = rows["control"], rows["filtered"]
  vis_ablated, routing_ablated = rows["visibility, ablated"], rows["routing, ablated"]
  assert control["exposure"] > 6.0  # of log2(1001) ~ 10 bits; chance is ~1.4
  assert filtered["exposure"] < 3.0
  assert vis_ablated["exposure"] < 3.0
  assert abs(vis_ablated["loss"] - filtered["loss"]) < 0.1 * filtered["loss"]
  assert routing_ablated["loss"] > 2 * vis_ablated["loss"]
  assert (
    rows["visibility"]["loss"] > vis_ablated["loss"]
  )  # the adapter is no model of ordinary text
