"""Routed gradients from a per-example loss, by the fastest strategy that is exact.

`routed_value_and_grad(loss_fn, compiled)(params, batch, labels)` returns the batch-mean loss and
`g_leaf = (1/B) sum_i w_i[leaf] * grad_leaf L_i` with `w = compiled.leaf_weights(labels)`, i.e.
the same result as `route(compiled)` applied to per-example gradients. Strategies:

- `"per_example"`: the reference. `vmap(grad)` per example, weighted sum; `microbatch=k` runs
  chunks of k examples under `lax.scan` so at most k per-example gradients exist at a time.
- `"cotangent"`: per-use cotangent scaling (`aqgov.routing`), about the cost of a plain step.
- `"auto"`: `"cotangent"` when it covers every construct of the loss, else `"per_example"` with
  one warning line naming what is not covered.

Both refuse batch-coupled losses (`BatchCouplingError`): BatchNorm in training mode, writes to
Linen `batch_stats`, collectives over named axes. Per-example routing of such a loss would not be
the gradient of the model being trained.
"""

from __future__ import annotations

import inspect
import re
import sys
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from aqgov.routing import _cotangent as cotangent
from aqgov.errors import BatchCouplingError, RoutingError, UnsupportedPrimitiveError
from aqgov.routing._transforms import broadcast_weight, weighted_sum

PyTree = Any
STRATEGIES = ("auto", "per_example", "cotangent")

# Primitives that communicate across a named (mapped) axis: inside a per-example loss they mix
# examples (or shards of the batch) and break per-example semantics.
COLLECTIVES = frozenset({
    "psum", "pmax", "pmin", "ppermute", "pbroadcast", "all_gather", "all_gather_invariant",
    "all_to_all", "ragged_all_to_all", "reduce_scatter", "axis_index", "psum_invariant",
    "psend", "precv", "unreduced_psum",
})

_REMEDY = ("Per-example routing needs each example's loss to depend on that example alone. Use "
           "BatchNorm with use_running_average=True for routed steps, or a per-example "
           "normalisation (LayerNorm, GroupNorm, RMSNorm) instead.")


# ---------------------------------------------------------------------------------------------
# Batch-coupling detection


class _CouplingWatch:
  """A profile hook active while the per-example loss is traced once: it notes batch-coupled
  layers (BatchNorm computing batch statistics, Linen writes to `batch_stats`) as they run."""

  def __init__(self):
    self.found: list[str] = []
    self._codes = _coupling_codes()
    self._previous = None

  def _hook(self, frame, event, arg):
    kind = self._codes.get(frame.f_code)
    if kind is None:
      return
    if kind == "put_variable" and event == "call" and frame.f_locals.get("col") == "batch_stats":
      self.found.append("a Linen module writes the 'batch_stats' collection")
    elif kind != "put_variable" and event == "return":
      if frame.f_locals.get("use_running_average") is False:
        module = type(frame.f_locals.get("self")).__name__
        self.found.append(f"{kind} {module} runs in training mode (use_running_average=False)")

  def __enter__(self):
    self._previous = sys.getprofile()
    sys.setprofile(self._hook)
    return self

  def __exit__(self, *exc):
    sys.setprofile(self._previous)
    return False


_CODES: dict | None = None


def _coupling_codes() -> dict:
  """Code objects of the Flax functions that reveal batch coupling, found once."""
  global _CODES
  if _CODES is None:
    from flax import linen, nnx
    from flax.core import scope

    _CODES = {
        inspect.unwrap(nnx.BatchNorm.__call__).__code__: "flax.nnx",
        inspect.unwrap(linen.BatchNorm.__call__).__code__: "flax.linen",
        inspect.unwrap(scope.Scope.put_variable).__code__: "put_variable",
    }
  return _CODES


def _named_axes(params: dict) -> list[str]:
  names = []
  for key in ("axes", "axis_name"):
    value = params.get(key)
    values = value if isinstance(value, (tuple, list)) else (value,)
    names += [str(v) for v in values if v is not None and not isinstance(v, int)]
  return names


def _collectives(jaxpr) -> list[str]:
  """`primitive over axes` for every collective anywhere in `jaxpr` (recursing into sub-jaxprs)."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in COLLECTIVES:
      axes = _named_axes(eqn.params)
      out.append(f"{eqn.primitive.name} over {axes}" if axes else eqn.primitive.name)
  for sub in jex_core.subjaxprs(jaxpr):
    out += _collectives(sub)
  return out


def _abstract(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)


def example_spec(batch: PyTree) -> PyTree:
  """Shapes and dtypes of one example of `batch` (leaves lose their leading batch axis)."""
  def one(x):
    if jnp.ndim(x) == 0:
      raise RoutingError("every batch leaf needs a leading batch axis; got a scalar leaf")
    return jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x))
  return jax.tree.map(one, batch)


def check_per_example(loss_fn: Callable, params: PyTree, example: PyTree, *,
                      has_aux: bool = False) -> None:
  """Raise `BatchCouplingError` when the per-example loss mixes examples.

  Traces `value_and_grad(loss_fn)` once on abstract values (`params`, `example` may be arrays or
  `jax.ShapeDtypeStruct`s) and refuses: BatchNorm in training mode (Flax NNX or Linen), writes to
  Linen's `batch_stats` collection, and collectives over named axes (`psum`, `all_gather`, ...),
  including ones whose axis is not bound because they expect a batch axis that per-example
  evaluation does not have.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=has_aux)
  error = None
  with _CouplingWatch() as watch:
    try:
      closed = jax.make_jaxpr(grad_fn)(_abstract(params), _abstract(example))
    except NameError as exc:  # an unbound axis name: the loss expects to run over a batch axis
      closed, error = None, exc
    except Exception:  # noqa: BLE001 - a coupled layer may fail to trace; report it first
      if not watch.found:
        raise
      closed = None
  if watch.found:
    raise BatchCouplingError(
        f"the loss is batch-coupled: {'; '.join(dict.fromkeys(watch.found))}. Its statistics mix "
        f"the examples of a batch, so per-example routed gradients would not hold. {_REMEDY}")
  if error is not None:
    raise BatchCouplingError(
        f"the per-example loss uses a collective over a batch axis ({str(error).split('.')[0]}); a loss that "
        f"communicates across examples cannot be routed per example. {_REMEDY}") from None
  found = _collectives(closed.jaxpr)
  if found:
    raise BatchCouplingError(
        f"the per-example loss communicates across a mapped axis ({', '.join(dict.fromkeys(found))});"
        f" per-example routing would be wrong. {_REMEDY}")


# ---------------------------------------------------------------------------------------------
# Strategies


def _squared_norms(leaf_weights: PyTree, per_example: PyTree) -> PyTree:
  """Per leaf, float32 [B]: `|| w_i * g_i ||^2` over the leaf."""
  def one(w, g):
    scaled = broadcast_weight(w, g).astype(jnp.float32) * g.astype(jnp.float32)
    return jnp.sum(jnp.square(scaled), axis=tuple(range(1, g.ndim)))
  return jax.tree.map(one, leaf_weights, per_example)


def _batch_size(batch: PyTree) -> int:
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise RoutingError("the batch has no array leaves")
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
  if len(sizes) != 1 or None in sizes:
    raise RoutingError(f"batch leaves disagree on the leading batch axis: sizes {sorted(map(str, sizes))}")
  return sizes.pop()


def hide(params: PyTree, seen: PyTree) -> PyTree:
  """`params` as one example sees them: a leaf whose `seen` is False acts as zero (`seen` is
  params-shaped, None where the leaf is always seen, else a bool scalar)."""
  p_leaves, p_def = jax.tree.flatten(params)
  flags = p_def.flatten_up_to(seen)
  return jax.tree.unflatten(p_def, [p if s is None or not jnp.issubdtype(jnp.result_type(p), jnp.inexact)
                                    else jnp.where(s, p, jnp.zeros_like(p)) for p, s in zip(p_leaves, flags)])


def per_example_value_and_grad(loss_fn: Callable, *, has_aux: bool = False,
                               with_norms: bool = False, microbatch: int | None = None) -> Callable:
  """The reference strategy: `fn(params, batch, leaf_weights, visibility=None)`.

  With `visibility` (params-shaped; None or bool [B] per leaf, see `CompiledPolicy.leaf_visibility`)
  each example's loss and gradient are taken at `hide(params, seen_i)`: its hidden leaves zeroed.
  Returns `(loss_mean, grads)` (`((loss_mean, aux[B, ...]), grads)` with `has_aux`), plus, with
  `with_norms`, a params-shaped pytree of float32 [B] squared norms `|| w_i * grad L_i ||^2` per
  leaf. `microbatch=k` bounds memory to k materialised per-example gradients.
  """
  def seen_loss(params, example_seen):
    example, seen = example_seen
    return loss_fn(hide(params, seen), example)

  vg = jax.value_and_grad(seen_loss, has_aux=has_aux)

  def chunk(params, examples, weights):
    out, grads = jax.vmap(vg, in_axes=(None, 0))(params, examples)
    sums = weighted_sum(weights, grads)
    sq = _squared_norms(weights, grads) if with_norms else None
    return out, sums, sq

  def fn(params, batch, leaf_weights, visibility=None):
    size = _batch_size(batch)
    p_def = jax.tree.structure(params)
    flags = [None] * p_def.num_leaves if visibility is None else p_def.flatten_up_to(visibility)
    # None stays a static leaf (no batch axis); flags become [B] arrays carried with the examples
    flags = [None if s is None else jnp.broadcast_to(jnp.asarray(s, bool), (size,)) for s in flags]
    batch = (batch, jax.tree.unflatten(p_def, flags))
    if microbatch is None or microbatch >= size:
      out, sums, sq = chunk(params, batch, leaf_weights)
    else:
      out, sums, sq = _microbatched(chunk, params, batch, leaf_weights, size, microbatch)
    losses, aux = out if has_aux else (out, None)
    loss = jnp.mean(losses)
    grads = jax.tree.map(lambda s: s / jnp.asarray(size, s.dtype), sums)
    head = (loss, aux) if has_aux else loss
    return (head, grads, sq) if with_norms else (head, grads)

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
    return jax.tree.map(jnp.add, acc, sums), (out, sq)

  acc0 = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.result_type(p)), params)
  sums, (out, sq) = jax.lax.scan(body, acc0, (split(batch), split(leaf_weights)))
  out, sq = merge(out), merge(sq)
  if head < size:
    tail = lambda t: jax.tree.map(lambda x: x[head:], t)
    t_out, t_sums, t_sq = chunk(params, tail(batch), tail(leaf_weights))
    sums = jax.tree.map(jnp.add, sums, t_sums)
    cat = lambda a, b: jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)
    out, sq = cat(out, t_out), cat(sq, t_sq)
  return out, sums, sq


def group_norms(compiled, squared_norms: PyTree) -> jax.Array:
  """float32 [B, G]: per-example per-group contribution norms from per-leaf squared norms [B]."""
  leaves = jax.tree.leaves(squared_norms)
  if len(leaves) != len(compiled.leaf_group):
    raise RoutingError(
        f"got squared norms for {len(leaves)} leaves but the policy was compiled for "
        f"{len(compiled.leaf_group)}; compile it with the parameter pytree you differentiate")
  stacked = jnp.stack([jnp.asarray(x, jnp.float32) for x in leaves])  # [L, B]
  per_group = jax.ops.segment_sum(
      stacked, jnp.asarray(compiled.leaf_group, jnp.int32), num_segments=len(compiled.group_names))
  return jnp.sqrt(per_group).T


class _Plan(NamedTuple):
  strategy: str
  reason: str


def routed_value_and_grad(loss_fn: Callable, compiled, strategy: str = "auto", *,
                          has_aux: bool = False, with_norms: bool = False,
                          microbatch: int | None = None) -> Callable:
  """Routed gradients of the per-example `loss_fn(params, example)`.

  Args:
    loss_fn: the loss of ONE example (`(loss, aux)` with `has_aux`); the batch is a pytree whose
      leaves have a leading batch axis.
    compiled: the `CompiledPolicy` bound to `params`.
    strategy: `"auto"` (default), `"cotangent"` or `"per_example"`.
    has_aux: `loss_fn` returns `(loss, aux)`; aux comes back stacked over the batch.
    with_norms: also return float32 [B, G] per-example per-group contribution norms
      `|| w_i[g] * grad_g L_i ||_2` over each group's leaves.
    microbatch: examples per chunk of the `per_example` strategy (bounds its memory); not
      accepted with `strategy="cotangent"`, which never materialises per-example gradients.

  Returns:
    `fn(params, batch, labels)` returning `(mean_loss, grads)`; with `has_aux`
    `((mean_loss, aux), grads)`; with `with_norms` a trailing `norms`. Works under `jax.jit` and
    with the batch and labels sharded over devices. `fn.strategy(params, batch)` says which
    strategy it uses for these shapes.

  Raises:
    BatchCouplingError: the loss mixes examples (never fallen back from).
    UnsupportedPrimitiveError: `strategy="cotangent"` and the loss uses a construct it cannot
      transform (`"auto"` falls back to `"per_example"` instead).
  """
  if strategy not in STRATEGIES:
    raise RoutingError(f"unknown routing strategy {strategy!r}; choose one of {STRATEGIES}")
  if microbatch is not None and (isinstance(microbatch, bool) or not isinstance(microbatch, int)
                                 or microbatch < 1):
    raise RoutingError(f"microbatch must be a positive int, got {microbatch!r}")
  if strategy == "cotangent" and microbatch is not None:
    raise RoutingError(
        "microbatch bounds the memory of the per_example strategy; the cotangent strategy does not "
        "materialise per-example gradients. Drop microbatch or use strategy='per_example'/'auto'")

  per_example = per_example_value_and_grad(
      loss_fn, has_aux=has_aux, with_norms=with_norms, microbatch=microbatch)
  plans: dict[Any, _Plan] = {}
  warned = []
  cotangent_fn = []

  def plan_for(params, batch) -> _Plan:
    p_leaves, p_def = jax.tree.flatten(params)
    b_leaves, b_def = jax.tree.flatten(batch)
    key = (p_def, b_def, tuple((jnp.shape(x), jnp.result_type(x)) for x in p_leaves + b_leaves))
    if key in plans:
      return plans[key]
    example = example_spec(batch)
    check_per_example(loss_fn, params, example, has_aux=has_aux)
    if strategy == "per_example":
      plan = _Plan("per_example", "requested")
    else:
      try:
        cotangent.check_supported(_loss_only(loss_fn, has_aux), _abstract(params), example,
                                  visibility=_static_visibility(compiled))
        plan = _Plan("cotangent", "supported")
      except UnsupportedPrimitiveError as exc:
        if strategy == "cotangent":
          raise
        plan = _Plan("per_example", _uncovered(exc))
        if not warned:
          warned.append(True)
          warnings.warn(f"aqgov: cotangent routing does not cover {plan.reason}; using per_example",
                        UserWarning, stacklevel=3)
    plans[key] = plan
    return plan

  def cotangent_impl():
    if not cotangent_fn:
      cotangent_fn.append(cotangent.cotangent_value_and_grad(
          loss_fn, has_aux=has_aux, with_norms=with_norms))
    return cotangent_fn[0]

  def fn(params, batch, labels):
    if jax.tree.structure(params) != compiled.treedef:
      raise RoutingError(
          f"params do not have the structure the policy was compiled for:\n  compiled for: "
          f"{compiled.treedef}\n  got: {jax.tree.structure(params)}\ncompile the policy with the "
          "parameter pytree you differentiate (aqgov.compile_policy(policy, params, taxonomy))")
    weights = compiled.leaf_weights(labels)
    visibility = compiled.leaf_visibility(labels) if compiled.has_visibility else None
    impl = per_example if plan_for(params, batch).strategy == "per_example" else cotangent_impl()
    out = impl(params, batch, weights, visibility)
    if with_norms:
      head, grads, sq = out
      return head, grads, group_norms(compiled, sq)
    return out

  fn.strategy = lambda params, batch: plan_for(params, batch).strategy
  return fn


def _static_visibility(compiled) -> PyTree | None:
  """Leaf visibility with one shared placeholder per visibility (all the analysis needs)."""
  if not compiled.has_visibility:
    return None
  columns, which = np.unique(compiled.leaf_hidden, axis=1, return_inverse=True)
  marks = [None if not columns[:, j].any() else np.ones((1,), bool) for j in range(columns.shape[1])]
  return jax.tree.unflatten(compiled.treedef, [marks[j] for j in np.ravel(which)])


def _loss_only(loss_fn: Callable, has_aux: bool) -> Callable:
  if not has_aux:
    return loss_fn
  return lambda params, example: loss_fn(params, example)[0]


def _uncovered(exc: UnsupportedPrimitiveError) -> str:
  """The construct named by an `UnsupportedPrimitiveError`, for the one-line fallback notice."""
  name = getattr(exc, "primitive", None)
  if name:
    return str(name)
  quoted = re.search(r"`([^`]+)`", str(exc))
  if quoted:
    return quoted.group(1)
  return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
