"""Subspace routes in the routed gradient: `g_l = (1/B) Σ_i w_i[l] P_i ∇_l L_i`, `P_i` the
projector onto the subspace example i's class confines leaf l to (identity for other classes).

Exact for every strategy by one change of variables: each (leaf, subspace) pair gets a zero
coefficient vector `z` [rank] and the loss sees the leaf as `p + U z` (U the subspace's orthonormal
basis). At `z = 0` the value is unchanged, the gradient in `z` is `Uᵀ ∇_p L`, so routing the
confined classes' weight to `z` (and none of it to `p`) and the others' weight to `p` gives
`Σ_{i unconfined} w_i ∇L_i + U Uᵀ Σ_{i confined} w_i ∇L_i` once `U g_z` is added back to the
leaf. Per-example norms add likewise (`||U Uᵀ g|| = ||Uᵀ g||` for orthonormal U, and an example
reaches `p` or `z`, never both).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from aqgov.policy import _subspaces as subspaces

PyTree = Any


class Confined(NamedTuple):
  """One leaf confined to one subspace for the route classes `classes`."""

  leaf: int
  classes: tuple[int, ...]
  basis: np.ndarray  # float32 [leaf size, rank]


def confined(compiled) -> tuple[Confined, ...]:
  """The (leaf, subspace) pairs of a compiled policy, with their classes and bases."""
  by: dict = {}
  for c, leaf, s in compiled.subspaces:
    by.setdefault((leaf, s), []).append(c)
  return tuple(
    Confined(
      leaf,
      tuple(classes),
      subspaces.basis(s, compiled.leaf_paths[leaf], math.prod(compiled.leaf_shapes[leaf])),
    )
    for (leaf, s), classes in sorted(by.items())
  )


def extended_loss(loss_fn: Callable, entries: tuple[Confined, ...]) -> Callable:
  """`loss_fn` of `(params, zs)`: each confined leaf read as `p + U z`."""

  def loss(extended, example):
    params, zs = extended
    leaves, treedef = jax.tree.flatten(params)
    for e, z in zip(entries, zs):
      p = leaves[e.leaf]
      leaves[e.leaf] = p + (jnp.asarray(e.basis) @ z).reshape(jnp.shape(p)).astype(p.dtype)
    return loss_fn(jax.tree.unflatten(treedef, leaves), example)

  return loss


def extend(entries, params, leaf_weights, visibility, route_class):
  """The extended params `(params, zs)`, their weights and visibility for one batch."""
  w_leaves, w_def = jax.tree.flatten(leaf_weights)
  z_weights = []
  for e in entries:
    hit = jnp.isin(route_class, jnp.asarray(e.classes, jnp.int32))
    z_weights.append(jnp.where(hit, w_leaves[e.leaf], 0.0))
  for e in entries:
    hit = jnp.isin(route_class, jnp.asarray(e.classes, jnp.int32))
    w_leaves[e.leaf] = jnp.where(hit, 0.0, w_leaves[e.leaf])
  zs = [jnp.zeros((e.basis.shape[1],), jnp.float32) for e in entries]
  weights = (jax.tree.unflatten(w_def, w_leaves), z_weights)
  if visibility is None:
    return (params, zs), weights, None
  v_leaves = jax.tree.structure(params).flatten_up_to(visibility)
  return (params, zs), weights, (visibility, [v_leaves[e.leaf] for e in entries])


def fold_grads(entries, grads) -> PyTree:
  """The leaf gradients with each `z`'s gradient mapped back into its leaf (`U g_z`)."""
  g_params, g_zs = grads
  leaves, treedef = jax.tree.flatten(g_params)
  for e, g in zip(entries, g_zs):
    leaves[e.leaf] = leaves[e.leaf] + (jnp.asarray(e.basis) @ g).reshape(
      jnp.shape(leaves[e.leaf])
    ).astype(leaves[e.leaf].dtype)
  return jax.tree.unflatten(treedef, leaves)


def fold_norms(entries, sq) -> PyTree:
  """Per-leaf squared norms [B] with each `z`'s added to its leaf's."""
  sq_params, sq_zs = sq
  leaves, treedef = jax.tree.flatten(sq_params)
  for e, s in zip(entries, sq_zs):
    leaves[e.leaf] = leaves[e.leaf] + s
  return jax.tree.unflatten(treedef, leaves)
