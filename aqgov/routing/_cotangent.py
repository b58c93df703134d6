"""Exact per-example, per-leaf gradient weighting at about the cost of a plain step.

Computes `g_l = (1/B) Σ_i w_i[l] ∇_l L_i` by *per-use cotangent scaling*, a jaxpr transformation.
The per-example loss is traced once to a jaxpr whose inputs are the parameter leaves and one
example. A forward dependency analysis gives every value a kind: whether it depends on the
example (so it is batched under `vmap`) and on which parameter leaves. Each equation where a
parameter-only value `p` meets an example-dependent value `a` is re-emitted as

    join(op(a, sg(p)), [op(sg(a), p_l) for each leaf l of p], [w_i[l]])

where `sg` is stop_gradient, `p_l` is `p` with its gradient flowing to leaf `l` only, and `join` is
the identity forward whose backward passes the cotangent unchanged to the first argument and
multiplied by `w_i[l]` to the others. The rewritten per-example function is vmapped over the batch
with the parameters unbatched, so each example's cotangent into a parameter is scaled *before*
vmap's transpose sums it over the batch; the cotangent flowing back to earlier layers is untouched.
The value is unchanged; the parameter-side op's forward value is dead code and its transpose is
the one the plain step computes anyway, so the cost is one elementwise multiply per use. For a
matmul or convolution, which is linear in `a`, the weight scales `a` instead of the output
cotangent when `a` is not larger (`op(sg(a)·w_i, p)`): the multiply fuses into the forward pass.

Scaling the parameter leaf itself inside the vmapped function is exact too, but it batches the
parameter: every example gets its own copy and every matmul becomes a batched one (measured
hundreds of times slower than the plain step on an MLP). It is used only for leaves whose weight
varies *within* the leaf (a slice such as one attention head): `sg(p) + w_i ⊙ (p - sg(p))`.

Forward visibility: a leaf hidden from an example (a `visible = "routed"` group it is not routed
to) acts as zero in that example's forward pass; each use of it is masked per example (see
`_emission`), and uses that cannot be masked exactly raise `UnsupportedPrimitiveError`.

The transformation recurses into nested `jit`, `checkpoint`/`remat`, `scan` and `cond`; custom
JVP/VJP calls are handled whole, honouring their rules. Anything else that contains a jaxpr raises
`UnsupportedPrimitiveError` so callers can fall back to per-example gradients; collectives over a
named axis raise `BatchCouplingError`, since they mix examples.

The phases live in their own modules: `_analysis` (kinds, supported constructs, uses and sites),
`_plan` (tracing once per shape, the plan), `_emission` (re-emitting equations with the join
construct), `_norms` (per-example contribution norms); the JAX internals they read are in
`_jax_compat`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from aqgov.errors import RoutingError
from aqgov.routing import _jax_compat as jc
from aqgov.routing import _norms as norms
from aqgov.routing import _site_stats as site_stats
from aqgov.routing import _sketch as sketches
from aqgov.routing import _slices as slices
from aqgov.routing._analysis import Uses, analyze, check_visibility, is_param
from aqgov.routing._emission import emit
from aqgov.routing._env import Ctx, Env, weigh
from aqgov.routing._plan import Plan, in_kinds, make_plan, per_example_weights, struct, trace
from aqgov.routing._slices import slice_axis
from aqgov.routing._transforms import unsigned_zeros

PyTree = Any
_sg = jax.lax.stop_gradient


def check_supported(
  loss_fn: Callable, params: PyTree, example: PyTree, *, visibility: PyTree | None = None
) -> None:
  """Raise `UnsupportedPrimitiveError` / `BatchCouplingError` if the cotangent strategy cannot
  transform `loss_fn(params, example)` (one example, no batch axis); return None if it can.

  `visibility` is as for `cotangent_value_and_grad` (leaves None or per-example bool arrays)."""
  p_leaves, p_def = jax.tree.flatten(params)
  ex_leaves, ex_def = jax.tree.flatten(example)
  closed, _ = trace(loss_fn, p_leaves, p_def, [struct(x) for x in ex_leaves], ex_def)
  uses = Uses()
  outs = analyze(closed, in_kinds(p_leaves, len(ex_leaves), frozenset()), uses, ())
  if is_param(outs[0]):
    uses.add(None, outs[0].leaves)
  check_visibility(uses, _visibility_keys(p_def, visibility)[0])


def norm_methods(
  loss_fn: Callable,
  params: PyTree,
  example: PyTree,
  *,
  has_aux: bool = False,
  with_norms: bool | str = True,
  sketch_dim: int = 64,
) -> PyTree:
  """How `with_norms` gets each leaf's per-example contribution norm (params-shaped strings).

  All but "sketch" are exact, and none but "materialised" forms a per-example gradient that
  outlives the backward step of its use:
  "ghost": Gram-matrix form of a matmul (inside a scan: per iteration for a stacked leaf, over
  all iterations' rows for a shared one); "direct": a matmul's per-example product `A_iᵀ G_i`
  reduced at once; "patches": the Gram form of a convolution's input patches (few output
  positions); "vjp": that one equation's VJP per example (a convolution's per-example kernel
  gradients as one grouped convolution); "sketch": an unbiased estimate from `sketch_dim` random
  projections; "materialised": per-example gradients formed in the backward pass (several uses,
  e.g. tied weights, or a leaf shared by a scan's iterations whose Gram form is dearer);
  "none": the loss does not depend on it."""
  p_leaves, p_def = jax.tree.flatten(params)
  ex_leaves, ex_def = jax.tree.flatten(example)
  spec = site_stats.norm_spec(with_norms, sketch_dim, 0) or site_stats.NormSpec()
  plan = make_plan(
    loss_fn,
    p_leaves,
    p_def,
    tuple(struct(x) for x in ex_leaves),
    ex_def,
    frozenset(),
    has_aux,
    norms=spec,
  )
  return jax.tree.unflatten(p_def, norms.methods(plan))


def _visibility_keys(p_def, visibility: PyTree | None) -> tuple[tuple, list]:
  """(leaf -> key or None, key -> per-example bool array): leaves sharing one array share a key."""
  if visibility is None:
    return (None,) * p_def.num_leaves, []
  keys, arrays, index = [], [], {}
  for v in p_def.flatten_up_to(visibility):
    if v is None:
      keys.append(None)
      continue
    if id(v) not in index:
      index[id(v)] = len(arrays)
      arrays.append(v)
    keys.append(index[id(v)])
  return tuple(keys), arrays


def cotangent_value_and_grad(
  loss_fn: Callable,
  *,
  has_aux: bool = False,
  with_norms: bool | str = False,
  sketch_dim: int = 64,
  sketch_seed: int = 0,
  sketch: sketches.SketchSpec | None = None,
) -> Callable:
  """`fn(params, batch, leaf_weights, visibility=None)` -> `(loss_mean, grads)` with
  `grads_l = (1/B) Σ_i w_i[l] ∇_l loss_fn(params ⊙ seen_i, example_i)`.

  `visibility` (optional) is params-shaped: a leaf is None (every example sees it) or a bool [B]
  array, False where the leaf acts as zero in that example's forward pass; leaves given the same
  array object share one visibility (one group), which lets a use combine them.

  `leaf_weights` is params-shaped; each leaf is [B] or [B, *shape broadcastable to the leaf].
  With `has_aux`, `loss_fn` returns `(loss, aux)` and the result is `((loss_mean, aux[B,...]),
  grads)`. With `with_norms` a trailing params-shaped pytree of [B] squared per-example
  contribution norms `||w_i[l] ⊙ ∇_l L_i||²` is added ([B, n] per position of its axis for a
  leaf whose weight varies along one axis, so that each slice's norm can be summed): exact with
  `with_norms=True` (or "exact"); with "sketch", matmul and convolution kernels get an unbiased
  estimate from `sketch_dim` random projections seeded by `sketch_seed` (`_sketch_norms`), other
  leaves exact. With `sketch` (a `SketchSpec`) a trailing list of per-leaf [B, dim] float32
  sketches of `w_i[l] ⊙ ∇_l L_i` (None for a leaf without gradient; see `aqgov.routing._sketch`)
  is added. Jit-able; traced jaxprs are cached by shapes. Raises `UnsupportedPrimitiveError` /
  `BatchCouplingError` as `check_supported`.
  """
  cache: dict = {}
  spec = site_stats.norm_spec(with_norms, sketch_dim, sketch_seed)

  def fn(params, batch, leaf_weights, visibility=None):
    p_leaves, p_def = jax.tree.flatten(params)
    b_leaves, b_def = jax.tree.flatten(batch)
    if not b_leaves:
      raise RoutingError("the batch has no array leaves; pass examples with a leading batch axis")
    size = jnp.shape(b_leaves[0])[0]
    if any(jnp.shape(b)[0] != size for b in b_leaves):
      raise RoutingError("every batch leaf needs the same leading batch axis")
    w_flat = p_def.flatten_up_to(leaf_weights)
    weights, is_slice = (
      zip(*(per_example_weights(w, p, size) for w, p in zip(w_flat, p_leaves)))
      if p_leaves
      else ((), ())
    )
    slice_leaves = frozenset(i for i, s in enumerate(is_slice) if s)
    axes = {i: slice_axis(weights[i].shape[1:], jnp.shape(p_leaves[i])) for i in slice_leaves}
    axes = {i: a for i, a in axes.items() if a is not None}
    ex_structs = tuple(jax.ShapeDtypeStruct(jnp.shape(b)[1:], jnp.result_type(b)) for b in b_leaves)
    vis_key, seen = _visibility_keys(p_def, visibility)
    key = (
      p_def,
      tuple(struct(p) for p in p_leaves),
      b_def,
      ex_structs,
      slice_leaves,
      tuple(sorted(axes.items())),
      has_aux,
      vis_key,
    )
    plan = cache.get(key)
    if plan is None:
      plan = make_plan(
        loss_fn,
        p_leaves,
        p_def,
        ex_structs,
        b_def,
        slice_leaves,
        has_aux,
        vis_key,
        axes,
        norms=spec or site_stats.NormSpec(),
        sketch=sketch,
      )
      if not any(isinstance(c, jc.Tracer) for c in plan.closed.consts):
        cache[key] = plan
    seen = [jnp.broadcast_to(jnp.asarray(s, bool), (size,)) for s in seen]
    with_norms = spec is not None
    return _run(plan, p_leaves, p_def, b_leaves, weights, size, has_aux, with_norms, seen, sketch)

  return fn


def _sliced_axes(plan: Plan, weights, p_leaves) -> dict:
  """leaf -> sliced axis of every leaf whose weight varies along one axis (fast or not)."""
  out = dict(plan.slice_axes)
  for i in plan.slice_leaves:
    axis = slice_axis(weights[i].shape[1:], jnp.shape(p_leaves[i]))
    if axis is not None:
      out[i] = axis
  return out


def _zero_grad(p):
  """The gradient of a leaf that is not differentiable (integer counters, PRNG keys)."""
  if jax.dtypes.issubdtype(jnp.result_type(p), jax.dtypes.extended):
    return jnp.zeros(jnp.shape(p), jax.dtypes.float0)
  return jnp.zeros_like(p)


def _run(
  plan: Plan,
  p_leaves,
  p_def,
  b_leaves,
  weights,
  size: int,
  has_aux: bool,
  with_norms: bool,
  seen: list = (),
  sketch: sketches.SketchSpec | None = None,
):
  """`(loss_mean, grads)` (with `has_aux` `((loss_mean, aux), grads)`; with `with_norms` a
  trailing params-shaped pytree of [B] squared norms; with `sketch` trailing per-leaf sketches)
  for one batch under `plan`."""
  probed = with_norms or sketch is not None
  materialised = plan.materialised if probed else frozenset()
  sites = plan.sites if probed else {}
  diff = plan.diff_leaves
  sketch_sites = plan.sketch_sites if sketch is not None else {}
  probes = norms.leaf_probes(materialised, p_leaves, size)
  gprobes = norms.site_probes(sites, size)
  kprobes = norms.site_probes(sketch_sites, size)
  n_p = plan.n_params

  def per_example(diff_vals, probes_i, gprobes_i, kprobes_i, ex_vals, w_i, seen_i):
    leaves = list(p_leaves)
    for i, v in zip(diff, diff_vals):
      leaves[i] = v
    branch = {i: leaves[i] + probes_i[i] if i in probes_i else leaves[i] for i in diff}
    values = list(leaves)
    for i in plan.slice_leaves:
      b = branch[i]
      values[i] = _sg(leaves[i]) + weigh(b - _sg(b), w_i[i])
      if plan.vis_key[i] is not None:  # a slice-weighted leaf is batched already: mask it directly
        values[i] = jnp.where(seen_i[plan.vis_key[i]], values[i], jnp.zeros_like(values[i]))
    ctx = Ctx(
      weights=w_i,
      leaf_branch=branch,
      materialised=materialised,
      site_probes={k: (*sites[k], v) for k, v in gprobes_i.items()},
      vis_key=plan.vis_key,
      seen=dict(enumerate(seen_i)),
      slice_axes=plan.slice_axes,
      sketch_probes={k: (*sketch_sites[k], v) for k, v in kprobes_i.items()},
    )
    env = Env(ctx)
    for v, val, k in zip(
      plan.closed.jaxpr.invars,
      values + list(ex_vals),
      in_kinds(p_leaves, len(ex_vals), plan.slice_leaves),
    ):
      env.write(v, val, k)
    outvars = emit(plan.closed, env, ())
    loss_atom = outvars[0]
    loss = env.lift(loss_atom) if is_param(env.kind(loss_atom)) else env.read(loss_atom)
    aux = [_sg(env.read(a)) for a in outvars[1:]]
    return loss, aux

  def total(diff_vals, probes, gprobes, kprobes):
    w_dict = {i: weights[i] for i in range(n_p)}
    losses, aux = jax.vmap(per_example, in_axes=(None, 0, 0, 0, 0, 0, 0))(
      diff_vals, probes, gprobes, kprobes, list(b_leaves), w_dict, list(seen)
    )
    # the sum, not the mean: each example's cotangent starts at 1, exactly as in brute force, so
    # custom rules that are not linear in their cotangent (gradient clipping) see their own
    return jnp.sum(losses), aux

  diff_vals = [p_leaves[i] for i in diff]
  (loss_sum, aux), (g_diff, g_probes, g_sites, g_sk) = jax.value_and_grad(
    total, argnums=(0, 1, 2, 3), has_aux=True
  )(diff_vals, probes, gprobes, kprobes)
  loss = loss_sum / jnp.asarray(size, loss_sum.dtype)
  grads = [_zero_grad(p) for p in p_leaves]
  for i, g in zip(diff, g_diff):
    grads[i] = unsigned_zeros(g / jnp.asarray(size, g.dtype))
  grads = jax.tree.unflatten(p_def, grads)
  head = loss
  if has_aux:
    out = jax.tree.unflatten(plan.out_tree, [loss] + list(aux))
    head = (loss, out[1])
  out = (head, grads)
  if with_norms:
    sq = norms.sq_norms(sites, p_leaves, size, g_probes, g_sites)
    for i, axis in _sliced_axes(plan, weights, p_leaves).items():  # kept per position of the axis
      sq[i] = slices.positional_sq_norms(g_probes[i], axis)
    out += (jax.tree.unflatten(p_def, sq),)
  if sketch is not None:
    out += (_leaf_sketches(sketch, plan.sketch_sites, p_leaves, weights, diff, g_probes, g_sk),)
  return out


def _leaf_sketches(spec, sketch_sites, p_leaves, weights, diff, g_probes, g_sk) -> list:
  """Per leaf, [B, dim] sketches of the weighted per-example gradients (None: not differentiable):
  a materialised leaf's gradient projected, a site's sketch from its probe's gradient."""
  out: list = [None] * len(p_leaves)
  size = jnp.shape(weights[0])[0] if weights else 0
  for i in diff:  # a differentiable leaf the loss does not use: a zero gradient
    out[i] = jnp.zeros((size, spec.dim), jnp.float32)
  for i, g in g_probes.items():
    proj = sketches.projections(spec, i, jnp.shape(p_leaves[i]))
    out[i] = sketches.project(proj, g)
  for path, (site, _) in sketch_sites.items():
    out[site.leaf] = g_sk[path]
  return [s if s is None else sketches.routed_only(s, weights[i]) for i, s in enumerate(out)]
