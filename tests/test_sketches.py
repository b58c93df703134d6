"""Gradient sketches: the cotangent path's projections equal projecting brute-force per-example
routed gradients, an example routed away from a group has a bitwise-zero sketch there, and the
sketch store is as tamper-evident as the log."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attribution_helpers import make_sketched_run
from hypothesis import given, settings
from hypothesis import strategies as st

from aqgov.errors import LineageError, RoutingError
from aqgov.routing import SketchSpec, gradient_sketches, norm_methods
from aqgov.routing import _sketch as sketch
from aqgov.routing._cotangent import cotangent_value_and_grad


@pytest.fixture(scope="module")
def sketched(tmp_path_factory):
  return make_sketched_run(tmp_path_factory.mktemp("sketched"))


@pytest.fixture
def sketched_run(sketched):
  return sketched[0], sketched[1]


B = 5
SPEC = SketchSpec(dim=16, seed=7, dtype="float32")


def _dense(p, ex):  # x @ W: [contracting, free] layout (ghost site)
  return jnp.sum(jnp.tanh(ex["x"] @ p["w"]) ** 2)


def _dense_transposed(p, ex):  # W @ x: [free, contracting] layout
  return jnp.sum(jnp.tanh(p["w"] @ ex["x"]) ** 2)


def _conv(p, ex):  # HWIO kernel from input patches
  y = jax.lax.conv_general_dilated(
    ex["img"][None], p["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  return jnp.sum(jnp.tanh(y) ** 2)


def _embedding(p, ex):  # a gather: one equation's VJP per example
  return jnp.sum(jnp.tanh(p["e"][ex["ids"]]) ** 2)


def _elementwise(p, ex):  # a bias and a scale
  return jnp.sum(jnp.tanh(ex["x"] * p["s"] + p["b"]) ** 2)


def _scan(p, ex):  # stacked layers scanned over, and a weight shared by the iterations
  def body(h, w):
    return jnp.tanh(h @ w + h @ p["u"]), None

  h, _ = jax.lax.scan(body, ex["x"], p["ws"])
  return jnp.sum(h**2)


def _params_batch(name, key):
  k = jax.random.split(key, 4)
  if name == "dense":
    return {"w": jax.random.normal(k[0], (6, 8))}, {"x": jax.random.normal(k[1], (B, 6))}
  if name == "dense_transposed":
    return {"w": jax.random.normal(k[0], (8, 6))}, {"x": jax.random.normal(k[1], (B, 6))}
  if name == "conv":
    return (
      {"k": jax.random.normal(k[0], (3, 3, 2, 4))},
      {"img": jax.random.normal(k[1], (B, 5, 5, 2))},
    )
  if name == "scan":
    return (
      {"u": jax.random.normal(k[0], (6, 6)) / 3, "ws": jax.random.normal(k[2], (3, 6, 6)) / 3},
      {"x": jax.random.normal(k[1], (B, 6))},
    )
  if name == "embedding":
    return {"e": jax.random.normal(k[0], (9, 6))}, {"ids": jax.random.randint(k[1], (B, 3), 0, 9)}
  return (
    {"s": jax.random.normal(k[0], (6,)), "b": jax.random.normal(k[2], (6,))},
    {"x": jax.random.normal(k[1], (B, 6))},
  )


LOSSES = {
  "dense": _dense,
  "dense_transposed": _dense_transposed,
  "conv": _conv,
  "embedding": _embedding,
  "elementwise": _elementwise,
  "scan": _scan,
}


def brute_force(loss, params, batch, weights):
  """vmap(grad) per example, times the weights, then the same projection per leaf."""
  grads = jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, batch)
  out = []
  for i, g in enumerate(jax.tree.leaves(grads)):
    wg = g * weights.reshape((B,) + (1,) * (g.ndim - 1))
    out.append(sketch.project(sketch.projections(SPEC, i, g.shape[1:]), wg))
  return out


weights_strategy = st.lists(
  st.sampled_from([0.0, 0.25, 1.0, 2.5]) | st.floats(0.0, 3.0, width=32), min_size=B, max_size=B
)


@pytest.mark.parametrize("name", sorted(LOSSES))
@settings(max_examples=8, deadline=None)
@given(w=weights_strategy, seed=st.integers(0, 2**16))
def test_the_sketch_of_the_routed_contribution_equals_projecting_brute_force_routed_gradients(
  name, w, seed
):
  loss = LOSSES[name]
  params, batch = _params_batch(name, jax.random.key(seed))
  w = jnp.asarray(w, jnp.float32)
  leaf_weights = jax.tree.map(lambda _: w, params)
  _, _, got = cotangent_value_and_grad(loss, sketch=SPEC)(params, batch, leaf_weights)
  for a, b in zip(got, brute_force(loss, params, batch, w)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
  for row in np.flatnonzero(np.asarray(w) == 0):
    for a in got:
      assert not np.asarray(a[row]).view(np.uint32).any()


@pytest.mark.parametrize("name", ["dense", "conv", "scan"])
def test_norms_taken_with_sketches_are_the_norms_taken_alone(name):
  params, batch = _params_batch(name, jax.random.key(3))
  w = jnp.asarray([1.0, 0.0, 0.5, 2.0, 1.0])
  leaf_weights = jax.tree.map(lambda _: w, params)
  _, _, alone = cotangent_value_and_grad(LOSSES[name], with_norms=True)(params, batch, leaf_weights)
  _, _, both, got = cotangent_value_and_grad(LOSSES[name], with_norms=True, sketch=SPEC)(
    params, batch, leaf_weights
  )
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), both, alone)
  for a, b in zip(got, brute_force(LOSSES[name], params, batch, w)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_the_cheap_forms_are_the_ones_measured():
  """The dense and conv cases take the Kronecker site form, not a materialised per-example
  gradient: their kernel is a site (a statistic of its use's operands and cotangent)."""
  for name, leaf in (("dense", "w"), ("dense_transposed", "w"), ("conv", "k")):
    params, batch = _params_batch(name, jax.random.key(0))
    example = jax.tree.map(lambda x: x[0], batch)
    assert norm_methods(LOSSES[name], params, example)[leaf] not in ("materialised", "none")
    assert sketch.is_kronecker(SPEC, params[leaf].shape)


def test_group_sketches_sum_each_groups_leaves_and_are_zero_where_routed_away():
  params, batch = _params_batch("elementwise", jax.random.key(1))
  group_weights = jnp.asarray([[1.0, 0.5], [0.0, 1.0], [2.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
  leaf_group = (1, 0)  # tree order: b, s
  fn = gradient_sketches(_elementwise, SketchSpec(16, 7, "bfloat16"), leaf_group, 2)
  got = fn(params, batch, group_weights)
  assert got.shape == (B, 2, 16) and got.dtype == jnp.bfloat16
  grads = jax.vmap(jax.grad(_elementwise), in_axes=(None, 0))(params, batch)
  for g, leaf_name, i in ((1, "b", 0), (0, "s", 1)):
    wg = grads[leaf_name] * group_weights[:, g][:, None]
    want = sketch.project(sketch.projections(SPEC, i, (6,)), wg)
    np.testing.assert_allclose(np.asarray(got[:, g], np.float32), want, rtol=2e-2, atol=1e-2)
  bits = np.asarray(got).view(np.uint16)
  assert not bits[1, 0].any() and not bits[2, 1].any() and not bits[4].any()


def test_projections_are_a_pure_function_of_the_seed():
  a = sketch.projections(SketchSpec(64, 3), 2, (10, 12))
  b = sketch.projections(SketchSpec(64, 3), 2, (10, 12))
  c = sketch.projections(SketchSpec(64, 4), 2, (10, 12))
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not np.array_equal(a[0], c[0])
  assert SketchSpec(256).factors == (16, 16) and SketchSpec(96).factors == (8, 12)


@pytest.mark.parametrize("bad", [{"dim": 0}, {"seed": -1}, {"dtype": "int8"}])
def test_a_malformed_spec_is_refused(bad):
  with pytest.raises(RoutingError):
    SketchSpec(**bad)


@pytest.mark.slow
def test_a_modified_sketch_chunk_fails_verify(sketched_run):
  from aqgov.lineage import verify_lineage

  run_dir, trust = sketched_run
  report = verify_lineage(run_dir, trust)
  assert any("sketch block" in line for line in report.checked)
  chunk = sorted((run_dir / "sketches").glob("*.skb"))[0]
  data = bytearray(chunk.read_bytes())
  original = bytes(data)
  try:
    data[-40] ^= 1  # inside the last block's payload: the frame digest no longer matches
    chunk.write_bytes(bytes(data))
    with pytest.raises(LineageError, match="altered"):
      verify_lineage(run_dir, trust)
  finally:
    chunk.write_bytes(original)


@pytest.mark.slow
def test_a_rewritten_block_with_a_recomputed_frame_digest_fails_verify(sketched_run, tmp_path):
  import hashlib
  import shutil

  from aqgov.lineage import _sketches as store
  from aqgov.lineage import verify_lineage
  from aqgov.lineage._segments import HEADER, frame

  run_dir, trust = sketched_run
  copy = tmp_path / "run"
  shutil.copytree(run_dir, copy)
  blocks = store.read_blocks(copy)
  for chunk in (copy / "sketches").glob("*.skb"):
    chunk.unlink()
  first = min(blocks)
  out = bytearray(HEADER.pack(store.SKETCH_MAGIC, first))
  for seq, b in sorted(blocks.items()):
    sk = np.array(b.sketch)
    if seq == first:
      sk.view(np.uint16)[0, 0, 0] ^= 1
    out += frame(store.encode_block(seq, b.step, sk))
  (copy / "sketches" / store.chunk_name(first)).write_bytes(bytes(out))
  assert hashlib.sha256(bytes(out)).digest()  # a self-consistent file, only the record disagrees
  with pytest.raises(LineageError, match="sketch store was altered"):
    verify_lineage(copy, trust)


def test_a_log_written_at_schema_version_1_still_verifies_and_reads(tmp_path, monkeypatch):
  from aqgov.documents import _keys as keys
  from aqgov.documents._keys import TrustStore
  from aqgov.lineage import LogReader, verify_lineage
  from aqgov.lineage import _record as rec

  import lineage_helpers as lh

  key = keys.generate("run", roles=(keys.RUN,))
  monkeypatch.setattr(rec, "VERSION", 1)
  lh.write_log(tmp_path / "run" / "lineage", key, 3)
  monkeypatch.undo()
  assert rec.VERSION == 2
  report = verify_lineage(tmp_path / "run", TrustStore.of([key.public]))
  assert report.closed and report.size == 5
  assert [r.kind for r in LogReader(tmp_path / "run" / "lineage")][1] == "step"


def test_the_writer_binds_each_steps_sketch_block_to_its_record(tmp_path):
  from aqgov.documents import _keys as keys
  from aqgov.documents._keys import TrustStore
  from aqgov.lineage import LineageWriter, verify_lineage
  from aqgov.lineage import _sketches as store
  from aqgov.lineage._segments import records

  import lineage_helpers as lh

  key = keys.generate("run", roles=(keys.RUN,))
  w = LineageWriter.create(tmp_path / "run" / "lineage", key, lh.start_body(key), fsync="never")
  rng = np.random.default_rng(0)
  sketches = {}
  for s in range(1, 4):
    sk = jnp.asarray(rng.normal(size=(4, len(lh.GROUPS), 8)), jnp.bfloat16)
    sketches[s] = np.asarray(sk)
    w.append(lh.summary(s)._replace(sketch=sk), lh.ids(s), lh.digests(s))
  w.close()
  trust = TrustStore.of([key.public])
  assert any(
    "3 sketch block(s)" in line for line in verify_lineage(tmp_path / "run", trust).checked
  )
  blocks = store.read_blocks(tmp_path / "run")
  for index, _, body in records(tmp_path / "run" / "lineage", kinds=("step",)):
    assert body["sketch"]["dim"] == 8 and body["sketch"]["dtype"] == "bfloat16"
    got = blocks[index]
    assert got.step == body["step"] and got.sha256 == body["sketch"]["sha256"]
    np.testing.assert_array_equal(got.sketch.view(np.uint16), sketches[got.step].view(np.uint16))
  (tmp_path / "run" / "sketches" / body["sketch"]["chunk"]).unlink()
  with pytest.raises(LineageError, match="holds none"):
    verify_lineage(tmp_path / "run", trust)


def test_the_microbatched_reference_sketches_as_the_whole_batch_does():
  from aqgov.routing._value_and_grad import per_example_value_and_grad

  params, batch = _params_batch("dense", jax.random.key(3))
  w = {"w": jnp.asarray([1.0, 0.0, 2.0, 0.5, 1.0])}
  whole = per_example_value_and_grad(_dense, sketch=SPEC)(params, batch, w)[2]
  chunks = per_example_value_and_grad(_dense, sketch=SPEC, microbatch=2)(params, batch, w)[2]
  np.testing.assert_allclose(whole[0], chunks[0], rtol=1e-5, atol=1e-6)
  assert not np.asarray(chunks[0][1]).view(np.uint32).any()
