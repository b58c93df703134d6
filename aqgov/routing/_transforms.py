"""Routing as Optax transforms: per-example updates in, the policy-weighted batch mean out.

`route(compiled)` is the aggregation step of a governed optimizer. Its `update` takes per-example
updates (every leaf with a leading batch axis B, as `optax.experimental.aggregating` uses) and the
batch's label arrays, and returns

    g_leaf = (1/B) * sum_i w_i[leaf] * u_i[leaf]

where `w = compiled.leaf_weights(labels)`. A weight leaf is shaped [B] (whole-leaf groups) or
[B, *s] with `s` broadcastable to the parameter's shape (a slice of a leaf, e.g. one attention
head: [B, H, 1, 1]); both work unchanged.

`strict(compiled)` is the companion placed after the optimizer: it zeroes the update of every
parameter (or slice) that no example of the batch reached with a positive weight.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from aqgov.errors import RoutingError
from aqgov.policy._compile import CompiledPolicy

PyTree = Any


def broadcast_weight(weight: jax.Array, target: jax.Array) -> jax.Array:
  """`weight` [B, *s] reshaped to [B, 1, ..., 1, *s] so it broadcasts against `target` [B, *shape].

  `s` must broadcast to the parameter's `shape` by NumPy rules (aligned at the trailing axes): a
  whole-leaf weight is [B]; one weight per attention head of a [H, d, d_head] kernel is
  [B, H, 1, 1].
  """
  extra = target.ndim - weight.ndim
  if extra < 0:
    raise RoutingError(
      f"a routing weight of shape {weight.shape} has more axes than the update {target.shape} it "
      "scales; weights must be [B] or [B, *s] with s broadcastable to the parameter's shape"
    )
  return weight.reshape(weight.shape[:1] + (1,) * extra + weight.shape[1:])


def _check_batch(weight: jax.Array, update: jax.Array) -> None:
  if update.ndim == 0 or update.shape[0] != weight.shape[0]:
    raise RoutingError(
      f"per-example update of shape {update.shape} does not have the labels' batch size "
      f"{weight.shape[0]} as its leading axis; pass per-example updates "
      "(e.g. jax.vmap(jax.grad(loss), (None, 0))) and the labels of the same batch"
    )


def unsigned_zeros(x: jax.Array) -> jax.Array:
  """`x` with -0.0 made +0.0, so an excluded example (weight 0) cannot flip the sign of a zero sum:
  its contribution leaves the routed gradient bitwise unchanged, not merely equal."""
  return jnp.where(x == 0, jnp.zeros_like(x), x)


def _weighted_sum_leaf(weight: jax.Array, update: jax.Array) -> jax.Array:
  _check_batch(weight, update)
  # select, not multiply: an example routed away (weight 0) adds exactly nothing, inf/NaN included
  update = jnp.where(broadcast_weight(weight, update) != 0, update, jnp.zeros((), update.dtype))
  if weight.ndim == 1:  # a contraction over the batch axis: far faster than multiply-then-sum
    out = jnp.tensordot(
      weight.astype(update.dtype), update, axes=1, out_sharding=_contracted_sharding(update)
    )
  else:
    out = jnp.sum(broadcast_weight(weight, update).astype(update.dtype) * update, axis=0)
  return unsigned_zeros(out.astype(update.dtype))


def _contracted_sharding(update: jax.Array):
  """The output spec of a contraction over `update`'s batch axis when that axis is sharded over
  explicit mesh axes (JAX then needs it spelled out), else None (let the compiler choose)."""
  sharding = getattr(jax.typeof(update), "sharding", None)
  spec = getattr(sharding, "spec", None)
  if not spec or spec[0] is None:
    return None
  return jax.sharding.NamedSharding(sharding.mesh, jax.P(*spec[1:]))


def _map_weights(fn, leaf_weights: PyTree, updates: PyTree) -> PyTree:
  """`fn(weight, update)` over matching leaves; a structural mismatch is a `RoutingError`."""
  w_def = jax.tree.structure(leaf_weights)
  u_def = jax.tree.structure(updates)
  if w_def != u_def:
    raise RoutingError(
      f"updates do not have the structure of the parameters the policy was compiled for:\n"
      f"  compiled for: {w_def}\n  got: {u_def}\n"
      "compile the policy with the same parameter pytree you differentiate"
    )
  return jax.tree.map(fn, leaf_weights, updates)


def weighted_sum(leaf_weights: PyTree, per_example: PyTree) -> PyTree:
  """`sum_i w_i[leaf] * u_i[leaf]` per leaf (no division by B): the building block of routing."""
  return _map_weights(_weighted_sum_leaf, leaf_weights, per_example)


def aggregate(leaf_weights: PyTree, per_example: PyTree) -> PyTree:
  """The routed mean `(1/B) sum_i w_i[leaf] * u_i[leaf]` of per-example updates."""
  sums = weighted_sum(leaf_weights, per_example)
  batch = jax.tree.leaves(leaf_weights)[0].shape[0] if jax.tree.leaves(leaf_weights) else 1
  return jax.tree.map(lambda s: s / jnp.asarray(batch, s.dtype), sums)


def reached(leaf_weights: PyTree) -> PyTree:
  """Per leaf, bool [*s]: whether any example of the batch reaches it with a positive weight."""
  return jax.tree.map(lambda w: jnp.any(w > 0, axis=0), leaf_weights)


def _labels_or_raise(labels: Any, who: str) -> Any:
  if labels is None:
    raise RoutingError(
      f"{who}.update needs the batch's label arrays: call tx.update(updates, state, params, "
      "labels=labels) (optax.chain forwards extra keyword arguments to every transform)"
    )
  return labels


def route(compiled: CompiledPolicy) -> optax.GradientTransformationExtraArgs:
  """Aggregate per-example updates into the policy-routed mean gradient.

  Args:
    compiled: a `CompiledPolicy` bound to the parameter pytree being trained.

  Returns:
    A stateless `optax.GradientTransformationExtraArgs` whose `update(per_example_updates, state,
    params=None, *, labels, **extra)` returns `(1/B) sum_i w_i * u_i` (params-shaped). Put it first
    in `optax.chain(route(compiled), optimizer, ...)`; other extra arguments pass through to the
    rest of the chain. The gradient that reaches earlier layers is not affected by routing: only
    the parameter gradients are weighted.

    Without `strict`, an optimizer with memory (momentum, Adam moments, weight decay) still moves
    a parameter on a step in which no example reached it; follow the optimizer with
    `strict(compiled)` to freeze such parameters for that step.
  """

  def update_fn(updates, state, params=None, *, labels=None, **extra_args):
    del params, extra_args
    weights = compiled.leaf_weights(_labels_or_raise(labels, "route"))
    return aggregate(weights, updates), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


def strict(compiled: CompiledPolicy) -> optax.GradientTransformationExtraArgs:
  """Zero the final update of every parameter that no example of this batch reached.

  Place it after the optimizer: `optax.chain(route(compiled), optax.adam(1e-3), strict(compiled))`
  (or after any optimizer fed by `routed_value_and_grad`). A parameter is reached when at least one
  example has a positive weight for it; otherwise its update is exactly zero this step, whatever
  the optimizer's momentum, moments or weight decay would have done. The optimizer's own state
  still advances (moments decay, step counts increase) as it would without strict mode.

  Returns:
    A stateless `optax.GradientTransformationExtraArgs`; `update(updates, state, params=None, *,
    labels, **extra)` takes params-shaped updates.
  """

  def update_fn(updates, state, params=None, *, labels=None, **extra_args):
    del params, extra_args
    hit = reached(compiled.leaf_weights(_labels_or_raise(labels, "strict")))

    def mask(h, u):  # h: bool [*s], broadcastable to the parameter's shape
      return jnp.where(h, u, jnp.zeros_like(u))

    return _map_weights(mask, hit, updates), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


_strict = strict


def routed(
  compiled: CompiledPolicy, optimizer: optax.GradientTransformation, *, strict: bool = False
) -> optax.GradientTransformationExtraArgs:
  """`optax.chain(route(compiled), optimizer[, strict(compiled)])`: a governed optimizer in one call.

  Its `update` takes per-example updates and `labels=...` (and whatever extra arguments the
  optimizer needs, e.g. `obj_fn` for `optax.contrib.sophia`).
  """
  parts = [route(compiled), optimizer]
  if strict:
    parts.append(_strict(compiled))
  return optax.chain(*parts)
