"""Step summaries, parameter fingerprints and hashes, and the step record encoding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aqgov.documents import _canonical as canonical
from aqgov.errors import LineageError
from aqgov.lineage import _record as rec
from aqgov.lineage._summary import StepSummary, fingerprint, params_sha256

import lineage_helpers as lh

PARAMS = {
  "embed": {"w": jnp.arange(12.0).reshape(3, 4)},
  "block": {"w": jnp.ones((4, 5)), "b": jnp.zeros(5)},
  "head": {"w": jnp.linspace(-1, 1, 10).reshape(5, 2)},
}
LEAF_GROUP = (1, 1, 0, 2)  # tree_leaves order: block/b, block/w, embed/w, head/w
FP = jax.jit(lambda p: fingerprint(p, LEAF_GROUP, 3, 0))


def _leaf_update(params, leaf: int, flat_index: int, delta: float):
  leaves, treedef = jax.tree.flatten(params)
  x = leaves[leaf]
  leaves[leaf] = x.reshape(-1).at[flat_index].add(delta).reshape(x.shape)
  return jax.tree.unflatten(treedef, leaves)


def test_fingerprint_is_bitwise_reproducible_under_jit():
  a, b = FP(PARAMS), FP(jax.tree.map(jnp.array, PARAMS))
  assert a.shape == (3, 8) and a.dtype == jnp.float32
  assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


@given(st.data())
def test_changing_any_parameter_changes_its_groups_fingerprint_and_no_other(data):
  leaf = data.draw(st.integers(0, 3), label="leaf")
  size = jax.tree.leaves(PARAMS)[leaf].size
  index = data.draw(st.integers(0, size - 1), label="index")
  before, after = np.asarray(FP(PARAMS)), np.asarray(FP(_leaf_update(PARAMS, leaf, index, 0.25)))
  changed = [g for g in range(3) if not np.array_equal(before[g], after[g])]
  assert changed == [LEAF_GROUP[leaf]]


def test_fingerprint_depends_on_the_key():
  assert not np.array_equal(FP(PARAMS), jax.jit(lambda p: fingerprint(p, LEAF_GROUP, 3, 1))(PARAMS))


def test_fingerprint_refuses_a_leaf_group_of_the_wrong_length():
  with pytest.raises(ValueError, match="leaf_group"):
    fingerprint(PARAMS, (0, 1), 3, 0)


def test_params_sha256_changes_with_values_dtypes_and_structure():
  base = params_sha256(PARAMS)
  assert base == params_sha256(jax.tree.map(np.asarray, PARAMS))
  assert base != params_sha256(_leaf_update(PARAMS, 0, 0, 1e-7))
  assert base != params_sha256(jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS))
  renamed = dict(PARAMS)
  renamed["blocks"] = renamed.pop("block")
  assert base != params_sha256(renamed)


def _summary(batch, groups, rows, seed):
  rng = np.random.default_rng(seed)
  rc = rng.integers(0, 4, batch).astype(np.int32)
  table = rng.random((4, groups), dtype=np.float32)
  weights = table[rc]
  if seed % 3 == 0 and batch:
    weights[0, 0] += 1.0  # not a function of the route class: stored in full
  return StepSummary(
    np.int32(seed + 1),
    rows,
    rc,
    weights,
    rng.random((batch, groups), dtype=np.float32),
    np.float32(rng.random()),
    rng.random((groups, 8), dtype=np.float32),
    {"rankme/head": rng.random(3, dtype=np.float32), "renyi2/block": np.float32(0.5)},
    {"count": np.int32(2), "value": np.float32(np.nan)},
  )


@given(st.integers(0, 12), st.integers(1, 5), st.integers(0, 2), st.integers(0, 1000))
def test_step_bodies_are_canonical_and_decode_to_the_summary(batch, groups, extra_ids, seed):
  rng = np.random.default_rng(seed)
  n_ids = batch + extra_ids
  rows = rng.permutation(n_ids)[:batch].astype(np.int32)
  s = _summary(batch, groups, rows, seed)
  host_ids = [f"id-{seed}-{i}" for i in range(n_ids)]
  sha = [canonical.sha256(i.encode()) for i in host_ids]
  body = rec.step_body(s, host_ids, sha)
  assert rec.encode_step_body(body) == canonical.encode(body)
  view = rec.view_step(canonical.decode(rec.encode_step_body(body)))
  assert view.example_ids == tuple(host_ids) and view.row_ids == tuple(host_ids[i] for i in rows)
  assert set(view.left_out) == set(host_ids) - set(view.row_ids)
  for got, want in (
    (view.weights, s.weights),
    (view.contribution_norms, s.contribution_norms),
    (view.fingerprint, s.fingerprint),
    (view.route_class, s.route_class),
  ):
    np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(view.measurements["rankme/head"], s.measurements["rankme/head"])
  assert np.isnan(view.events["value"]) and view.example_sha256 == tuple(h.hex() for h in sha)


def test_padding_rows_are_left_out_of_the_record():
  s = lh.summary(1, batch=4)._replace(example_index=np.asarray([0, 1, -1, -1], np.int32))
  view = rec.view_step(rec.step_body(s, ["a", "b"]))
  assert view.row_ids == ("a", "b") and view.weights.shape[0] == 2


@pytest.mark.parametrize("bad", [["a", ""], ["a\x00b"], [""]])
def test_example_ids_must_be_non_empty_and_free_of_nul(bad):
  s = lh.summary(1, batch=len(bad))
  with pytest.raises(LineageError, match="example id"):
    rec.step_body(s, bad)


def test_a_summary_row_pointing_past_the_ids_is_refused():
  with pytest.raises(LineageError, match="example_index"):
    rec.step_body(lh.summary(1, batch=4), ["a", "b"])


def test_a_record_envelope_is_the_canonical_encoding_of_its_five_fields():
  body = rec.encode_step_body(rec.step_body(lh.summary(3), lh.ids(3), lh.digests(3), time_s=1.5))
  for seq in (0, 1, 127, 128, 65535, 65536, 2**32, 2**63 - 1):
    for kind in rec.KINDS:
      prev = bytes(range(32))
      expected = canonical.encode(
        {"v": rec.VERSION, "seq": seq, "kind": kind, "prev": prev, "body": body}
      )
      assert rec.encode_record(seq, kind, prev, body) == expected
  with pytest.raises(LineageError):
    rec.encode_record(-1, rec.STEP, bytes(32), body)


def test_weights_differing_only_in_the_sign_of_zero_are_recorded_whole_and_kept_exactly():
  route_class = np.asarray([0, 0, 1], np.int64)
  weights = np.asarray([[0.0, 1.0], [-0.0, 1.0], [0.5, 0.5]], np.float32)
  wire = rec.weights_to_wire(weights, route_class)
  assert set(wire) == {"full"}
  back = rec.weights_from_wire(wire, route_class)
  assert back.tobytes() == weights.tobytes()
  same = np.asarray([[0.0, 1.0], [0.0, 1.0], [0.5, 0.5]], np.float32)
  assert set(rec.weights_to_wire(same, route_class)) == {"by_class"}
  assert rec.weights_from_wire(rec.weights_to_wire(same, route_class), route_class).tobytes() == (
    same.tobytes()
  )
