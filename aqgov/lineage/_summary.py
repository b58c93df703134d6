"""The step summary: the arrays that leave the jitted step for the lineage, and parameter digests.

`StepSummary` is a pytree of arrays only, so a jitted step can return it (or pass it to a host
callback) without any host state. Example ids are host strings and never enter jit: the summary
carries `example_index`, an int index into the batch's host-side id list (-1 marks padding rows).

Two digests bind the lineage to the weights:
- `fingerprint`: fixed pseudo-random projections of each group's parameters, [G, dim] float32,
  computed inside the step every step. Cheap: each leaf is viewed as a matrix X[r, c] and projected
  onto rank-1 vectors S[d, r] * T[d, c] whose coefficients come from an integer hash of a seed, so
  the cost is one small matmul per leaf and nothing of parameter size is materialised. Exactly
  reproducible when the same step function is compiled again for the same platform and device
  configuration (XLA's CPU/GPU reductions are deterministic there), which is what replay needs. It
  is a tripwire, not a cryptographic commitment: any single changed parameter changes it, and
  equal fingerprints make divergence overwhelmingly unlikely, but do not prove equality.
- `params_sha256`: the full SHA-256 over canonical bytes of every leaf, computed on the host at
  checkpoints. This one is a commitment.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from aqgov.documents import _canonical as canonical
from aqgov.policy import _paths as paths

if TYPE_CHECKING:
  from aqgov.entropy import Events
  from aqgov.policy import CompiledPolicy

# why `StepSummary.dropped` dropped a row (0: kept)
FINITE, NONFINITE_LOSS, NONFINITE_GRADIENT = 0, 1, 2
DROP_REASONS = ("", "non-finite loss", "non-finite gradient")

Array = jax.Array | np.ndarray  # on the device in the step, on the host once fetched
PyTree = Any  # a JAX pytree of arrays (parameters, optimizer state, a batch)


class StepSummary(NamedTuple):
  """What one training step reports to the lineage (all arrays; B examples, G groups).

  step: int32 [] — number of updates applied including this one (the first step is 1).
  example_index: int32 [B] — row -> index into the host-side id list of the batch; -1 = padding.
  route_class: int32 [B] — the composed route class of each example.
  weights: float32 [B, G] — the weight each example's gradient had in each group.
  contribution_norms: float32 [B, G] — `|| w_i[g] * grad_g L_i ||_2` over the group's leaves.
  loss: float32 [] — the step's mean loss.
  fingerprint: float32 [G, dim] — `fingerprint(params after the update, ...)`.
  measurements: {name: array} — entropy measurements (`"<metric>/<group>"`), may be empty.
  events: pytree of arrays — governance events (a fixed-size NamedTuple), `()` when none.
  seen: bool [B, G] or None — which groups each example saw in its forward pass (None: all;
    see `visible = "routed"` groups in aqgov.policy).
  applied_weights: float32 [B, G] or None — the weight each example's gradient was actually
    applied with: `weights` after fallback routes, dropped examples, pause, reroute and freeze
    (None: exactly `weights`).
  applied_scale: float32 [G] or None — the scale enforcement applied to each group's routed
    gradient (0: the group got no update); the applied contribution of an example is
    `applied_scale[g] * contribution_norms[i, g]` (None: all ones).
  dropped: int8 [B] or None — per row 0, or why the example was dropped from the step
    (`DROP_REASONS`: 1 non-finite loss, 2 non-finite gradient).
  sketch: [B, G, dim] (bfloat16/float16/float32) or None — seeded projections of each example's
    routed gradient per group (`aqgov.routing.SketchSpec`), written to the sketch store.
  """

  step: Array
  example_index: Array
  route_class: Array
  weights: Array
  contribution_norms: Array
  loss: Array
  fingerprint: Array
  measurements: Mapping[str, Array] = {}
  events: Events | tuple[()] = ()
  seen: Array | None = None
  applied_weights: Array | None = None
  applied_scale: Array | None = None
  dropped: Array | None = None
  sketch: Array | None = None


def _mix32(x: Array) -> Array:
  """A bijective 32-bit integer hash (lowbias32): cheap, vectorisable, good avalanche."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _coefficients(seed: Array, n: int, dim: int) -> Array:
  """[dim, n] pseudo-random float32 coefficients in [-1, 1), a pure function of `seed`."""
  counter = jax.lax.broadcasted_iota(jnp.uint32, (dim, n), 0) * n + jax.lax.broadcasted_iota(
    jnp.uint32, (dim, n), 1
  )
  h = _mix32(counter ^ _mix32(seed))
  return ((h >> 8).astype(jnp.float32) - 2.0**23) * 2.0**-23


def _as_matrix(leaf: Array) -> Array:
  """The leaf as a [rows, cols] float32 matrix with cols small enough to keep coefficients cheap."""
  x = jnp.asarray(leaf)
  n = max(int(np.prod(x.shape)), 1)
  cols = x.shape[-1] if x.ndim else 1
  if cols > 4096 or x.ndim <= 1:
    cols = next((k for k in range(min(n, 1024), 0, -1) if n % k == 0), 1)
    if n > 4096 and cols < 64:  # awkward sizes (e.g. prime): pad to whole rows of 1024
      x = jnp.pad(jnp.reshape(x, (-1,)), (0, -n % 1024))
      cols, n = 1024, n + (-n % 1024)
  return jnp.reshape(x, (n // cols, cols)).astype(jnp.float32)


def _leaf_projection(leaf: Array, seed: Array, dim: int) -> Array:
  """[dim] projection of one leaf X[r, c] onto the rank-1 vectors S[d, r] * T[d, c].

  Generating a full [n, dim] projection costs far more than the projection itself; rank-1
  vectors need only rows + cols coefficients per output, and the contraction is one matmul.
  """
  x = _as_matrix(leaf)
  s = _coefficients(seed, x.shape[0], dim)
  t = _coefficients(seed ^ jnp.uint32(0x5BD1E995), x.shape[1], dim)
  return jnp.sum((s @ x) * t, axis=1)


def fingerprint(
  params: PyTree, leaf_group: Sequence[int], num_groups: int, key: Array | int, dim: int = 8
) -> Array:
  """[num_groups, dim] float32 random projections of each group's parameters.

  `leaf_group[l]` is the group of the l-th leaf in `jax.tree_util.tree_leaves(params)` order (the
  `CompiledPolicy.leaf_group` convention). `key` is a JAX PRNG key or an int seed; the same key,
  params and compiled step give bitwise the same fingerprint. Jit-safe; costs about one fused pass
  over the parameters.
  """
  leaves = jax.tree_util.tree_leaves(params)
  if len(leaves) != len(leaf_group):
    raise ValueError(
      f"fingerprint: params have {len(leaves)} leaves but leaf_group names {len(leaf_group)}; "
      "pass the leaf_group of the compiled policy bound to these params"
    )
  if isinstance(key, int):
    key = jax.random.key(key)
  seeds = jax.random.bits(key, (max(len(leaves), 1),), jnp.uint32)
  out = jnp.zeros((num_groups, dim), jnp.float32)
  for i, (leaf, g) in enumerate(zip(leaves, leaf_group, strict=True)):
    if not 0 <= int(g) < num_groups:
      raise ValueError(f"fingerprint: leaf {i} is in group {g}, outside 0..{num_groups - 1}")
    out = out.at[int(g)].add(_leaf_projection(leaf, seeds[i], dim))
  return out


def summarize(
  *,
  step: Array,
  example_index: Array,
  route_class: Array,
  weights: Array,
  contribution_norms: Array,
  loss: Array,
  params: PyTree,
  leaf_group: Sequence[int],
  key: Array | int,
  dim: int = 8,
  measurements: Mapping[str, Array] | None = None,
  events: Events | tuple[()] = (),
  seen: Array | None = None,
  applied_weights: Array | None = None,
  applied_scale: Array | None = None,
  dropped: Array | None = None,
  sketch: Array | None = None,
) -> StepSummary:
  """Build a `StepSummary` inside a step, fingerprinting `params` (the params after the update)."""
  weights = jnp.asarray(weights, jnp.float32)
  return StepSummary(
    step=jnp.asarray(step, jnp.int32),
    example_index=jnp.asarray(example_index, jnp.int32),
    route_class=jnp.asarray(route_class, jnp.int32),
    weights=weights,
    contribution_norms=jnp.asarray(contribution_norms, jnp.float32),
    loss=jnp.asarray(loss, jnp.float32),
    fingerprint=fingerprint(params, leaf_group, weights.shape[-1], key, dim),
    measurements=dict(measurements or {}),
    events=events,
    seen=None if seen is None else jnp.asarray(seen, bool),
    **_applied(applied_weights, applied_scale, dropped),
    sketch=sketch,
  )


def _applied(applied_weights: Array | None, applied_scale: Array | None, dropped: Array | None):
  """The summary fields saying what a step actually applied, in their dtypes."""
  return {
    "applied_weights": None
    if applied_weights is None
    else jnp.asarray(applied_weights, jnp.float32),
    "applied_scale": None if applied_scale is None else jnp.asarray(applied_scale, jnp.float32),
    "dropped": None if dropped is None else jnp.asarray(dropped, jnp.int8),
  }


def routed_summary(
  compiled: CompiledPolicy,
  labels: Mapping[str, Array],
  *,
  step: Array,
  loss: Array,
  contribution_norms: Array,
  params: PyTree,
  example_index: Array | None = None,
  key: Array | int = 0,
  measurements: Mapping[str, Array] | None = None,
  events: Events | tuple[()] = (),
) -> StepSummary:
  """`summarize` for a step routed by `compiled`, inside the user's own jitted step.

  Route classes, weights and (for `visible = "routed"` groups) what each example saw follow from
  the policy and `labels`; `loss` and `contribution_norms` are the value and norms
  `routed_value_and_grad(..., with_norms=True)` returned; `params` are the params after the
  update; `step` counts the updates applied including this one. `example_index` defaults to
  0..B-1: row i is the i-th id of the list handed to `GovernedRun.record`.
  """
  route_class = compiled.route_class(labels)
  return summarize(
    step=step,
    example_index=jnp.arange(route_class.shape[0]) if example_index is None else example_index,
    route_class=route_class,
    weights=compiled.group_weights(labels),
    contribution_norms=contribution_norms,
    loss=loss,
    params=compiled.parts(params),  # a sliced leaf fingerprints each slice into its group
    leaf_group=compiled.part_group,
    key=key,
    measurements=measurements,
    events=events,
    seen=compiled.group_visibility(labels) if compiled.has_visibility else None,
  )


def params_sha256(params: PyTree) -> str:
  """Hex SHA-256 over the canonical bytes of every leaf, in `tree_leaves` order.

  Per leaf: the canonical msgpack of `[path, dtype name, shape]` followed by the leaf's raw
  little-endian C-order bytes. Paths make the digest depend on the tree structure as well as on
  the values; the header fixes the byte length of the data, so the framing is unambiguous.
  """
  h = hashlib.sha256()
  leaves = jax.tree_util.tree_leaves(params)
  for path, leaf in zip(paths.tree_paths(params), leaves, strict=True):
    arr = np.asarray(jax.device_get(leaf))
    h.update(canonical.encode([path, arr.dtype.name, list(arr.shape)]))
    h.update(np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes())
  return h.hexdigest()
