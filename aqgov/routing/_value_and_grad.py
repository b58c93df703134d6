"""Routed gradients from a per-example loss, by the fastest strategy that is exact.

`routed_value_and_grad(loss_fn, compiled)(params, batch, labels)` returns the batch-mean loss and
`g_leaf = (1/B) sum_i w_i[leaf] * grad_leaf L_i` with `w = compiled.leaf_weights(labels)`, i.e.
the same result as `route(compiled)` applied to per-example gradients. Strategies:

- `"per_example"`: the reference. `vmap(grad)` per example, weighted sum; `microbatch=k` runs
  chunks of k examples under `lax.scan` so at most k per-example gradients exist at a time.
- `"cotangent"`: per-use cotangent scaling (`aqgov.routing`), about the cost of a plain step.
- `"auto"`: `"cotangent"` when it covers every construct of the loss, else `"per_example"` with
  one warning line naming what is not covered.

Both refuse batch-coupled losses (`BatchCouplingError`, see `_coupling` for what is and is not
detected): BatchNorm in training mode, writes to Linen `batch_stats`, collectives over named
axes. Per-example routing of such a loss would not be the gradient of the model being trained.
`per_example=True` asserts the loss is per-example and skips these checks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aqgov.errors import BatchCouplingError, RoutingError, UnsupportedPrimitiveError
from aqgov.policy._compile import CompiledPolicy
from aqgov.routing import _cotangent as cotangent
from aqgov.routing import _sketch as sketches
from aqgov.routing import _slices as slices
from aqgov.routing import _subspace as subspace
from aqgov.routing._coupling import check_per_example
from aqgov.routing._plan import check_output
from aqgov.routing._site_stats import NormSpec, norm_spec
from aqgov.routing._slices import slice_axis
from aqgov.routing._transforms import broadcast_weight, weighted_sum

PyTree = Any
STRATEGIES = ("auto", "per_example", "cotangent")


def _abstract(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)


def example_spec(batch: PyTree) -> PyTree:
  """Shapes and dtypes of one example of `batch` (leaves lose their leading batch axis)."""

  def one(x):
    if jnp.ndim(x) == 0:
      raise RoutingError("every batch leaf needs a leading batch axis; got a scalar leaf")
    return jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x))

  return jax.tree.map(one, batch)


# ---------------------------------------------------------------------------------------------
# Strategies


def _squared_norms(leaf_weights: PyTree, per_example: PyTree) -> PyTree:
  """Per leaf, float32 [B]: `|| w_i * g_i ||^2` over the leaf ([B, n] per position of the axis
  of a sliced leaf's weight)."""

  def one(w, g):
    w = broadcast_weight(w, g)
    scaled = jnp.where(w != 0, w.astype(jnp.float32) * g.astype(jnp.float32), jnp.float32(0))
    axis = slice_axis(w.shape[1:], g.shape[1:])
    if axis is not None:
      return slices.positional_sq_norms(scaled, axis)
    return jnp.sum(jnp.square(scaled), axis=tuple(range(1, g.ndim)))

  return jax.tree.map(one, leaf_weights, per_example)


def _batch_size(batch: PyTree) -> int:
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise RoutingError("the batch has no array leaves")
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
  if len(sizes) != 1 or None in sizes:
    raise RoutingError(
      f"batch leaves disagree on the leading batch axis: sizes {sorted(map(str, sizes))}"
    )
  return sizes.pop()


def hide(params: PyTree, seen: PyTree) -> PyTree:
  """`params` as one example sees them: a leaf whose `seen` is False acts as zero (`seen` is
  params-shaped, None where the leaf is always seen, else a bool scalar)."""
  p_leaves, p_def = jax.tree.flatten(params)
  flags = p_def.flatten_up_to(seen)
  return jax.tree.unflatten(
    p_def,
    [
      p
      if s is None or not jnp.issubdtype(jnp.result_type(p), jnp.inexact)
      else jnp.where(s, p, jnp.zeros_like(p))
      for p, s in zip(p_leaves, flags)
    ],
  )


def per_example_value_and_grad(
  loss_fn: Callable,
  *,
  has_aux: bool = False,
  with_norms: bool = False,
  microbatch: int | None = None,
  sketch: sketches.SketchSpec | None = None,
) -> Callable:
  """The reference strategy: `fn(params, batch, leaf_weights, visibility=None)`.

  With `visibility` (params-shaped; None or bool [B] per leaf, see `CompiledPolicy.leaf_visibility`)
  each example's loss and gradient are taken at `hide(params, seen_i)`: its hidden leaves zeroed.
  Returns `(loss_mean, grads)` (`((loss_mean, aux[B, ...]), grads)` with `has_aux`), plus, with
  `with_norms`, a params-shaped pytree of float32 [B] squared norms `|| w_i * grad L_i ||^2` per
  leaf, and with `sketch` a trailing list of per-leaf [B, dim] float32 sketches of
  `w_i * grad L_i` (see `aqgov.routing._sketch`). `microbatch=k` bounds memory to k materialised
  per-example gradients.
  """

  def seen_loss(params, example_seen):
    example, seen = example_seen
    return loss_fn(hide(params, seen), example)

  vg = jax.value_and_grad(seen_loss, has_aux=has_aux)

  def chunk(params, examples, weights):
    out, grads = jax.vmap(vg, in_axes=(None, 0))(params, examples)
    sums = weighted_sum(weights, grads)
    sq = _squared_norms(weights, grads) if with_norms else None
    sk = None
    if sketch is not None:
      w_flat = jax.tree.structure(grads).flatten_up_to(weights)
      sk = sketches.per_example_sketches(sketch, w_flat, jax.tree.leaves(grads))
    return out, sums, (sq, sk)

  def fn(params, batch, leaf_weights, visibility=None):
    size = _batch_size(batch)
    p_def = jax.tree.structure(params)
    flags = [None] * p_def.num_leaves if visibility is None else p_def.flatten_up_to(visibility)
    # None stays a static leaf (no batch axis); flags become [B] arrays carried with the examples
    flags = [None if s is None else jnp.broadcast_to(jnp.asarray(s, bool), (size,)) for s in flags]
    batch = (batch, jax.tree.unflatten(p_def, flags))
    if microbatch is None or microbatch >= size:
      out, sums, (sq, sk) = chunk(params, batch, leaf_weights)
    else:
      out, sums, (sq, sk) = _microbatched(chunk, params, batch, leaf_weights, size, microbatch)
    losses, aux = out if has_aux else (out, None)
    loss = jnp.mean(losses)
    grads = jax.tree.map(lambda s: s / jnp.asarray(size, s.dtype), sums)
    head = (loss, aux) if has_aux else loss
    return (head, grads) + ((sq,) if with_norms else ()) + ((sk,) if sketch is not None else ())

  return fn


def _microbatched(chunk, params, batch, leaf_weights, size: int, k: int):
  """`chunk` over consecutive slices of k examples (a `lax.scan`) plus one shorter tail slice."""
  n = size // k
  head = n * k
  split = lambda t: jax.tree.map(lambda x: x[:head].reshape((n, k) + x.shape[1:]), t)
  merge = lambda t: jax.tree.map(lambda x: x.reshape((head,) + x.shape[2:]), t)

  def body(acc, xs):
    examples, weights = xs
    out, sums, sq = chunk(params, examples, weights)
    return optax.tree.add(acc, sums), (out, sq)

  acc0 = optax.tree.zeros_like(params)
  sums, (out, sq) = jax.lax.scan(body, acc0, (split(batch), split(leaf_weights)))
  out, sq = merge(out), merge(sq)
  if head < size:
    tail = lambda t: jax.tree.map(lambda x: x[head:], t)
    t_out, t_sums, t_sq = chunk(params, tail(batch), tail(leaf_weights))
    sums = optax.tree.add(sums, t_sums)
    cat = lambda a, b: jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)
    out, sq = cat(out, t_out), cat(sq, t_sq)
  return out, sums, sq


def group_norms(compiled: CompiledPolicy, squared_norms: PyTree) -> jax.Array:
  """float32 [B, G]: per-example per-group contribution norms from per-leaf squared norms [B]
  ([B, n] per position of a sliced leaf's axis: each part counts in its own group)."""
  stacked = jnp.stack(slices.part_sq_norms(compiled, squared_norms))  # [U, B]
  per_group = jax.ops.segment_sum(
    stacked, jnp.asarray(compiled.part_group, jnp.int32), num_segments=len(compiled.group_names)
  )
  return jnp.sqrt(per_group).T


def scaled_leaf_weights(compiled: CompiledPolicy, leaf_weights: PyTree, scale: jax.Array) -> PyTree:
  """`leaf_weights` ([B], or [B, n, 1, ...] for a sliced leaf) times the per-example group `scale`
  [B, G] placed on each leaf; 0 stays an exact 0. Whole leaves that shared one weight array and
  one group still share one (the routing strategies group leaves by it)."""
  scale = jnp.asarray(scale, jnp.float32)
  leaves, treedef = jax.tree.flatten(leaf_weights)
  placed = jax.tree.leaves(jax.vmap(compiled.per_leaf)(scale)) if compiled.has_slices else None
  cache: dict = {}
  out = []
  for i, (w, g) in enumerate(zip(leaves, compiled.leaf_group)):
    s = scale[:, g] if placed is None else placed[i]
    key = (id(w), int(g)) if jnp.ndim(s) == 1 else (id(w), -1 - i)
    if key not in cache:
      cache[key] = jnp.where(s == 0, jnp.float32(0), w * s)
    out.append(cache[key])
  return jax.tree.unflatten(treedef, out)


class _Plan(NamedTuple):
  strategy: str
  reason: str


def routed_value_and_grad(
  loss_fn: Callable,
  compiled: CompiledPolicy,
  strategy: str = "auto",
  *,
  has_aux: bool = False,
  with_norms: bool | str = False,
  sketch_dim: int = 64,
  sketch_seed: int = 0,
  microbatch: int | None = None,
  per_example: bool = False,
  sketch: sketches.SketchSpec | None = None,
) -> Callable:
  """Routed gradients of the per-example `loss_fn(params, example)`.

  Args:
    loss_fn: the loss of ONE example (`(loss, aux)` with `has_aux`); the batch is a pytree whose
      leaves have a leading batch axis.
    compiled: the `CompiledPolicy` bound to `params`.
    strategy: `"auto"` (default), `"cotangent"` or `"per_example"`.
    has_aux: `loss_fn` returns `(loss, aux)`; aux comes back stacked over the batch.
    with_norms: also return float32 [B, G] per-example per-group contribution norms
      `|| w_i[g] * grad_g L_i ||_2` over each group's leaves: `True` or `"exact"` for exact
      norms; `"sketch"` for estimates whose squares are unbiased, from `sketch_dim` random
      projections per matmul or convolution kernel (relative standard deviation about
      `sqrt(2 / sketch_dim)`, at most `sqrt(8 / sketch_dim)`), seeded by `sketch_seed`; other
      leaves, and every leaf under the `per_example` strategy, exact. See `norm_methods`.
    sketch_dim, sketch_seed: the sketch's projections per kernel and their seed.
    microbatch: examples per chunk of the `per_example` strategy (bounds its memory); not
      accepted with `strategy="cotangent"`, which never materialises per-example gradients.
    per_example: "I assert the loss is per-example; skip the checks". The batch-coupling checks
      (BatchNorm in training mode, `batch_stats` writes, collectives) are not run; a collective
      the cotangent strategy cannot transform then makes `"auto"` use `"per_example"`.
    sketch: a `SketchSpec`: also return [B, G, dim] sketches (in `sketch.dtype`) of each example's
      routed gradient `w_i[g] * grad_g L_i`, seeded projections summed over each group's leaves
      (`aqgov.routing._sketch`); exactly zero where the example is routed away from the group.

  Returns:
    `fn(params, batch, labels)` returning `(mean_loss, grads)`; with `has_aux`
    `((mean_loss, aux), grads)`; with `with_norms` a trailing `norms`, then with `sketch` a
    trailing `sketches`. Works under `jax.jit` and
    with the batch and labels sharded over devices. `fn.strategy(params, batch)` says which
    strategy it uses for these shapes.

  Raises:
    BatchCouplingError: the loss mixes examples (never fallen back from); see
      `aqgov.routing._coupling` for what is detected and what is not.
    UnsupportedPrimitiveError: `strategy="cotangent"` and the loss uses a construct it cannot
      transform (`"auto"` falls back to `"per_example"` instead).
  """
  if strategy not in STRATEGIES:
    raise RoutingError(f"unknown routing strategy {strategy!r}; choose one of {STRATEGIES}")
  if microbatch is not None and (
    isinstance(microbatch, bool) or not isinstance(microbatch, int) or microbatch < 1
  ):
    raise RoutingError(f"microbatch must be a positive int, got {microbatch!r}")
  if strategy == "cotangent" and microbatch is not None:
    raise RoutingError(
      "microbatch bounds the memory of the per_example strategy; the cotangent strategy does not "
      "materialise per-example gradients. Drop microbatch or use strategy='per_example'/'auto'"
    )
  spec = norm_spec(with_norms, sketch_dim, sketch_seed)
  return _Routed(
    loss_fn,
    compiled,
    strategy,
    has_aux=has_aux,
    norms=spec,
    microbatch=microbatch,
    asserted=per_example,
    sketch=sketch,
  )


class _Routed:
  """The function `routed_value_and_grad` returns: plans a strategy once per shapes, then runs it."""

  def __init__(
    self,
    loss_fn: Callable,
    compiled,
    strategy: str,
    *,
    has_aux: bool,
    norms: NormSpec | None,
    microbatch: int | None,
    asserted: bool,
    sketch: sketches.SketchSpec | None = None,
  ):
    self.loss_fn, self.compiled, self.requested = loss_fn, compiled, strategy
    self.has_aux, self.norms, self.asserted = has_aux, norms, asserted
    self.with_norms = norms is not None
    self.sketch = sketch
    self.confined = subspace.confined(compiled)  # subspace routes: the loss sees p + U z
    if sketch is not None and (self.confined or compiled.has_slices):
      raise RoutingError(
        "gradient sketches are taken per parameter leaf, and this policy has slice or subspace "
        "groups (a head, an expert or a subspace of a leaf); record sketches with whole-leaf "
        "groups, or drop sketch= for this policy"
      )
    self.inner = subspace.extended_loss(loss_fn, self.confined) if self.confined else loss_fn
    self.per_example = per_example_value_and_grad(
      self.inner,
      has_aux=has_aux,
      with_norms=self.with_norms,
      microbatch=microbatch,
      sketch=sketch,
    )
    self.plans: dict[Any, _Plan] = {}
    self.warned = False
    self._cotangent: Callable | None = None

  def __call__(self, params, batch, labels, example_scale=None):
    """`example_scale` (float32 [B, G], optional) multiplies each example's policy weight per group
    before the gradient: 0 routes the example away from the group exactly (as the policy's 0)."""
    compiled = self.compiled
    if jax.tree.structure(params) != compiled.treedef:
      raise RoutingError(
        f"params do not have the structure the policy was compiled for:\n  compiled for: "
        f"{compiled.treedef}\n  got: {jax.tree.structure(params)}\ncompile the policy with the "
        "parameter pytree you differentiate (aqgov.compile_policy(policy, params, taxonomy))"
      )
    _check_labels(labels, batch)
    weights = compiled.leaf_weights(labels)
    if example_scale is not None:
      weights = scaled_leaf_weights(compiled, weights, example_scale)
    visibility = compiled.leaf_visibility(labels) if compiled.has_visibility else None
    impl = self.per_example if self.strategy(params, batch) == "per_example" else self.cotangent
    if self.confined:
      extended, weights, visibility = subspace.extend(
        self.confined, params, weights, visibility, compiled.route_class(labels)
      )
      out = impl(extended, batch, weights, visibility)
      out = (out[0], subspace.fold_grads(self.confined, out[1]), *out[2:])
      if self.with_norms:
        out = (*out[:2], subspace.fold_norms(self.confined, out[2]), *out[3:])
    else:
      out = impl(params, batch, weights, visibility)
    head, grads, rest = out[0], out[1], list(out[2:])
    if self.with_norms:
      rest[0] = group_norms(compiled, rest[0])
    if self.sketch is not None:
      size = _batch_size(batch)
      rest[-1] = sketches.group_sketches(
        self.sketch, rest[-1], compiled.leaf_group, compiled.num_groups, size
      )
    return (head, grads, *rest)

  def strategy(self, params, batch) -> str:
    """The strategy used for these shapes: "cotangent" or "per_example"."""
    return self._plan(params, batch).strategy

  @property
  def cotangent(self) -> Callable:
    if self._cotangent is None:
      spec = self.norms or NormSpec()
      self._cotangent = cotangent.cotangent_value_and_grad(
        self.inner,
        has_aux=self.has_aux,
        with_norms=spec.kind if self.with_norms else False,
        sketch_dim=spec.sketch_dim,
        sketch_seed=spec.seed,
        sketch=self.sketch,
      )
    return self._cotangent

  def _plan(self, params, batch) -> _Plan:
    p_leaves, p_def = jax.tree.flatten(params)
    b_leaves, b_def = jax.tree.flatten(batch)
    key = (p_def, b_def, tuple((jnp.shape(x), jnp.result_type(x)) for x in p_leaves + b_leaves))
    if key not in self.plans:
      self.plans[key] = self._choose(params, example_spec(batch))
    return self.plans[key]

  def _choose(self, params, example) -> _Plan:
    if self.asserted:
      check_output(jax.eval_shape(self.loss_fn, _abstract(params), example), self.has_aux)
    else:  # its one trace also checks the output
      check_per_example(self.loss_fn, params, example, has_aux=self.has_aux)
    if self.requested == "per_example":
      return _Plan("per_example", "requested")
    try:
      cotangent.check_supported(
        _loss_only(self.loss_fn, self.has_aux),
        _abstract(params),
        example,
        visibility=_static_visibility(self.compiled),
      )
      return _Plan("cotangent", "supported")
    except (UnsupportedPrimitiveError, BatchCouplingError) as exc:
      coupled = isinstance(exc, BatchCouplingError)
      if self.requested == "cotangent" or (coupled and not self.asserted):
        raise
      plan = _Plan("per_example", "a collective over a named axis" if coupled else _uncovered(exc))
    if not self.warned:
      self.warned = True
      warnings.warn(
        f"aqgov: cotangent routing does not cover {plan.reason}; using per_example",
        UserWarning,
        stacklevel=5,
      )
    return plan


def _check_labels(labels, batch) -> None:
  """Labels and batch must describe the same examples: one label row per batch row."""
  sizes = {jnp.shape(x)[0] for x in jax.tree.leaves(labels) if jnp.ndim(x)}
  batch_size = _batch_size(batch)
  if sizes and sizes != {batch_size}:
    raise RoutingError(
      f"the labels describe {sorted(sizes)} examples but the batch has {batch_size}: pass the label "
      "arrays admission produced for this batch (one row per example, in batch order)"
    )


def _static_visibility(compiled) -> PyTree | None:
  """Leaf visibility with one shared placeholder per visibility (all the analysis needs)."""
  if not compiled.has_visibility:
    return None
  columns, which = np.unique(compiled.leaf_hidden, axis=1, return_inverse=True)
  marks = [
    None if not columns[:, j].any() else np.ones((1,), bool) for j in range(columns.shape[1])
  ]
  return jax.tree.unflatten(compiled.treedef, [marks[j] for j in np.ravel(which)])


def _loss_only(loss_fn: Callable, has_aux: bool) -> Callable:
  if not has_aux:
    return loss_fn
  return lambda params, example: loss_fn(params, example)[0]


def _uncovered(exc: UnsupportedPrimitiveError) -> str:
  """The construct named by an `UnsupportedPrimitiveError`, for the one-line fallback notice."""
  if exc.primitive:
    return exc.primitive
  return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def gradient_sketches(
  loss_fn: Callable,
  sketch: sketches.SketchSpec,
  leaf_group,
  num_groups: int,
  *,
  has_aux: bool = False,
  strategy: str = "auto",
) -> Callable:
  """`fn(params, batch, group_weights=None)` -> [B, G, dim] sketches of `w_i[g] * grad_g L_i`.

  The same projections as a routed step with the same `sketch` uses, without a policy: what a
  probe's gradient (all weights 1) or a recorded example's (its recorded weights [B, G]) is
  projected with at attribution time. `leaf_group` maps `tree_leaves(params)` to groups."""
  loss_only = _loss_only(loss_fn, has_aux)
  groups = jnp.asarray(leaf_group, jnp.int32)
  chosen: dict = {}

  def fn(params, batch, group_weights=None):
    size = _batch_size(batch)
    w = jnp.ones((size, num_groups), jnp.float32) if group_weights is None else group_weights
    w = jnp.asarray(w, jnp.float32)
    p_def = jax.tree.structure(params)
    leaf_weights = jax.tree.unflatten(p_def, [w[:, g] for g in np.asarray(groups)])
    key = (p_def, tuple(jnp.shape(x) for x in jax.tree.leaves(params)))
    if key not in chosen:
      impl = "per_example"
      if strategy != "per_example":
        try:
          cotangent.check_supported(loss_only, _abstract(params), example_spec(batch))
          impl = "cotangent"
        except (UnsupportedPrimitiveError, BatchCouplingError):
          if strategy == "cotangent":
            raise
      maker = (
        cotangent.cotangent_value_and_grad if impl == "cotangent" else per_example_value_and_grad
      )
      chosen[key] = maker(loss_only, sketch=sketch)
    _, _, leaf_sketches = chosen[key](params, batch, leaf_weights)
    return sketches.group_sketches(sketch, leaf_sketches, leaf_group, num_groups, size)

  return fn
