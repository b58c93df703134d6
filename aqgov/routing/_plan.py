"""Planning per-use cotangent scaling: trace the per-example loss once, analyse it, decide norms.

A `Plan` is the traced jaxpr of `loss_fn(param leaves, example leaves)` and what the analysis
found: which leaves are weighted per slice (scaled at the leaf), which single-use equations give
a per-example gradient norm from their operands (`sites`, each with the `SiteStat` it computes
for the requested norms), and which leaves need their per-example gradients materialised.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from aqgov.errors import BatchCouplingError, RoutingError
from aqgov.routing import _jax_compat as jc
from aqgov.routing import _slices as slices
from aqgov.routing._analysis import CONST, Kind, Uses, analyze, check_visibility, inexact, is_param
from aqgov.routing._site_stats import EXACT, NormSpec, site_stat, sketch_stat
from aqgov.routing._sketch import SketchSpec


class Plan(NamedTuple):
  closed: Any  # ClosedJaxpr of loss_fn(param leaves, example leaves)
  out_tree: Any  # pytree structure of loss_fn's output
  n_params: int
  slice_leaves: frozenset  # leaves weighted per slice (scaled at the leaf)
  diff_leaves: tuple  # indices of inexact parameter leaves
  sites: dict  # inlining path -> (Site, SiteStat): norms from operands + cotangent
  materialised: frozenset  # leaves whose per-example gradients are materialised for norms
  vis_key: tuple = ()  # leaf -> visibility key, None when every example sees it
  slice_axes: dict = {}  # sliced leaves scaled at their uses (not batched): leaf -> sliced axis
  sketch_sites: dict = {}  # inlining path -> (Site, SiteStat): gradient sketches at that site


def struct(x) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))


def trace(loss_fn: Callable, p_leaves, p_def, ex_structs, ex_def):
  """(ClosedJaxpr, output structure) of `loss_fn` on flat parameter and example leaves."""

  def flat(p_flat, ex_flat):
    return loss_fn(jax.tree.unflatten(p_def, p_flat), jax.tree.unflatten(ex_def, ex_flat))

  try:
    closed, shape = jax.make_jaxpr(flat, return_shape=True)(
      [struct(p) for p in p_leaves], list(ex_structs)
    )
  except NameError as e:
    if not jc.unbound_axis(e):
      raise
    raise BatchCouplingError(
      f"the loss uses a collective over a named axis ({e}); that mixes examples, so "
      "per-example routing would be wrong: make the loss depend on one example only"
    ) from e
  return closed, jax.tree.structure(shape)


def in_kinds(p_leaves, n_ex: int, slice_leaves) -> list[Kind]:
  """Kinds of the traced jaxpr's inputs: parameter leaves, then example leaves."""
  kinds = []
  for i, p in enumerate(p_leaves):
    if not jnp.issubdtype(jnp.result_type(p), jnp.inexact):
      kinds.append(CONST)
    elif i in slice_leaves:
      kinds.append(Kind(True, frozenset({i})))
    else:
      kinds.append(Kind(False, frozenset({i}), i))
  return kinds + [Kind(True, frozenset())] * n_ex


def check_output(out_shape: Any, has_aux: bool) -> None:
  """Refuse a per-example loss that is not one float scalar (with `has_aux`: `(scalar, aux)`);
  `out_shape` is the loss's output for one example, as `jax.eval_shape` gives it."""
  out_tree = jax.tree.structure(out_shape)
  leaves = jax.tree.leaves(out_shape)
  shaped = jax.tree.unflatten(out_tree, range(out_tree.num_leaves))
  well_formed = (
    (isinstance(shaped, tuple) and len(shaped) == 2 and shaped[0] == 0)
    if has_aux
    else out_tree.num_leaves == 1
  )
  loss = leaves[0] if leaves else None
  if not well_formed or getattr(loss, "shape", None) != () or not inexact(loss):
    expected = "(scalar loss, aux pytree)" if has_aux else "one float scalar"
    raise RoutingError(
      f"loss_fn must return {expected} per example; got structure {out_tree} with first leaf "
      f"{loss}: reduce the loss over the example's own axes (tokens, pixels) inside loss_fn"
    )


def _check_output(closed, out_tree, has_aux: bool) -> None:
  check_output(jax.tree.unflatten(out_tree, [v.aval for v in closed.jaxpr.outvars]), has_aux)


def make_plan(
  loss_fn: Callable,
  p_leaves,
  p_def,
  ex_structs,
  ex_def,
  slice_leaves,
  has_aux: bool,
  vis_key: tuple = (),
  slice_axes: dict | None = None,
  norms: NormSpec = EXACT,
  sketch: SketchSpec | None = None,
) -> Plan:
  """The plan for these shapes. `slice_leaves` are weighted per slice; those in `slice_axes`
  (leaf -> the one axis the weight varies along) are scaled at their uses when every use allows
  it (`_slices`), the others at the leaf. With `sketch`, each site also gets a `SiteStat` for
  gradient sketches (`sketch_sites`); a leaf inside a scan is then materialised instead, its
  projection being of the whole leaf, not of one iteration's use."""
  closed, out_tree = trace(loss_fn, p_leaves, p_def, ex_structs, ex_def)
  _check_output(closed, out_tree, has_aux)
  fast = dict(slice_axes or {})
  while True:  # batching a leaf can add uses to others: repeat until no sliced leaf changes
    slow = frozenset(slice_leaves) - fast.keys()
    uses = Uses()
    outs = analyze(closed, in_kinds(p_leaves, len(ex_structs), slow), uses, ())
    if is_param(outs[0]):
      uses.add(None, outs[0].leaves)
    keep = slices.fast_leaves(uses, fast)
    if keep == fast.keys():
      break
    fast = {leaf: fast[leaf] for leaf in keep}
  vis_key = tuple(vis_key) or (None,) * len(p_leaves)
  check_visibility(uses, vis_key)
  sites, sketch_sites, materialised = {}, {}, set(slice_leaves)
  for leaf, recorded in uses.by_leaf.items():
    path, site = recorded[0]
    if leaf in fast:  # norms per position of the sliced axis come from a materialised probe
      continue
    if sketch is not None and site is not None and site.role is not None:
      site = None
    stat = site_stat(site, norms, leaf) if len(recorded) == 1 and site is not None else None
    if stat is not None:
      sites[path] = (site, stat)
      if sketch is not None:
        sketch_sites[path] = (site, sketch_stat(site, sketch))
    else:  # several uses (tied weights), no statistic for this use, or a sketch inside a scan
      materialised.add(leaf)
  diff = tuple(i for i, p in enumerate(p_leaves) if jnp.issubdtype(jnp.result_type(p), jnp.inexact))
  return Plan(
    closed,
    out_tree,
    len(p_leaves),
    slow,
    diff,
    sites,
    frozenset(materialised),
    vis_key,
    fast,
    sketch_sites,
  )


def per_example_weights(w, leaf, batch: int) -> tuple[jax.Array, bool]:
  """(weights, is_slice): [B] for a whole-leaf weight, [B, *broadcastable] for a slice weight."""
  w = jnp.asarray(w, jnp.float32)
  shape = jnp.shape(leaf)
  if w.ndim == 0 or w.shape[0] != batch:
    raise RoutingError(
      f"leaf weights must have a leading batch axis of size {batch}; got shape {w.shape}"
    )
  rest = w.shape[1:]
  try:
    jnp.broadcast_shapes(rest, shape)
  except ValueError as e:
    raise RoutingError(
      f"leaf weights of shape {w.shape} do not broadcast to the leaf's shape {shape}"
    ) from e
  if math.prod(rest) == 1:
    return w.reshape(batch), False
  return w.reshape((batch,) + (1,) * (len(shape) - len(rest)) + rest), True
