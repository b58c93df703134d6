"""Refusing per-example losses that mix the examples of a batch.

Per-example routing is exact only when each example's loss depends on that example alone. Three
checks, on one abstract trace of the per-example `value_and_grad`:

- Flax Linen, through its public method interception (`flax.linen.intercept_methods`): a
  `BatchNorm` applied with `use_running_average=False` (as an attribute or a call argument), and
  any module call that writes the `batch_stats` collection.
- Flax NNX, by iterating the module graphs reachable from the loss function (its closure, the
  globals it names, `functools.partial` arguments, a bound method's object, including
  `nnx.GraphDef`s there) and from `params`: an `nnx.BatchNorm` whose `use_running_average` is
  False.
- Collectives over a named axis in the traced jaxpr (`psum`, `pmean`, `all_gather`, ...), and
  ones whose axis is unbound because they expect a batch axis that per-example evaluation lacks.
  This is how a per-example loss reaches the rest of its batch at all, so it also catches a
  mixture-of-experts router with an expert capacity shared by the batch (tokens dropped by
  competing with other examples' tokens).

Not detected: an NNX `BatchNorm` put in training mode by a call argument
(`bn(x, use_running_average=False)`) or built inside the loss from nothing reachable; Haiku's
`hk.BatchNorm(is_training=True)` (on one example it computes statistics over that example only and
communicates with no other); any hand-written cross-example statistic passed in through the batch
or closed over. Flax is never imported here: its checks run only when the loss could use it
(`flax.linen` / `flax.nnx` already imported).
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

from aqgov.errors import BatchCouplingError
from aqgov.routing import _jax_compat as jc
from aqgov.routing._plan import check_output

PyTree = Any

REMEDY = (
  "Per-example routing needs each example's loss to depend on that example alone. Run "
  "BatchNorm in inference mode for routed steps (Flax: use_running_average=True; Equinox: "
  "inference=True; Haiku: is_training=False), or use a per-example normalisation "
  "(LayerNorm, GroupNorm, RMSNorm) instead."
)
COLLECTIVE_REMEDY = (
  "Batch statistics (BatchNorm in training mode) and a mixture-of-experts router whose expert "
  "capacity is shared by the batch (tokens dropped by competing with other examples' tokens) "
  "communicate this way. Per-example routing needs each example's loss to depend on that example "
  "alone: compute statistics outside the loss, and route experts per example (top-k token choice "
  "with no capacity, or a capacity counted over the example's own tokens)."
)
_SEARCH_DEPTH = 3  # how many references deep the NNX search follows from the loss function
_SEARCH_WIDTH = 256  # at most this many items of one container are looked at
_SEARCH_LIMIT = 10_000  # at most this many objects are looked at in all


class _LinenWatch:
  """A Linen method interceptor that notes batch-coupled module calls as they are traced."""

  def __init__(self, linen):
    self.linen = linen
    self.found: list[str] = []

  def __call__(self, next_fun: Callable, args: tuple, kwargs: dict, context) -> Any:
    module = context.module
    if isinstance(module, self.linen.BatchNorm) and context.method_name == "__call__":
      if _linen_running_average(module, args, kwargs) is False:
        self.found.append(
          f"flax.linen {type(module).__name__} runs in training mode (use_running_average=False)"
        )
    before = _batch_stats(module)
    out = next_fun(*args, **kwargs)
    if before is not None and _changed(before, _batch_stats(module)):
      self.found.append("a Linen module writes the 'batch_stats' collection")
    return out


def _linen_running_average(module, args: tuple, kwargs: dict) -> bool | None:
  """The `use_running_average` a Linen BatchNorm call resolves to (call argument, else field)."""
  try:
    bound = inspect.signature(type(module).__call__).bind(module, *args, **kwargs)
    value = bound.arguments.get("use_running_average")
  except TypeError:
    value = kwargs.get("use_running_average")
  return module.use_running_average if value is None else value


def _batch_stats(module) -> list | None:
  """The leaves of a bound module's mutable `batch_stats` collection, else None."""
  try:
    if not module.is_mutable_collection("batch_stats"):
      return None
    return jax.tree.leaves(module.variables.get("batch_stats", {}))
  except (AttributeError, ValueError):  # not bound to a scope
    return None


def _changed(before: list, after: list | None) -> bool:
  return after is not None and (
    len(before) != len(after) or any(a is not b for a, b in zip(before, after))
  )


def _references(root: Any) -> Iterator[Any]:
  """Objects reachable from `root` through closures, named globals, partials, bound methods,
  defaults and containers (a bounded search: it does not enter modules or classes)."""
  seen: set[int] = set()
  stack = [(root, _SEARCH_DEPTH)]
  while stack and len(seen) < _SEARCH_LIMIT:
    obj, depth = stack.pop()
    if id(obj) in seen:
      continue
    seen.add(id(obj))
    yield obj
    if depth > 0:
      stack += [(child, depth - 1) for child in _children(obj)]


def _children(obj: Any) -> list:
  if isinstance(obj, functools.partial):
    return [obj.func, *obj.args, *obj.keywords.values()]
  if inspect.ismethod(obj):
    return [obj.__func__, obj.__self__]
  if inspect.isfunction(obj):
    try:
      refs = inspect.getclosurevars(obj)
    except (TypeError, ValueError):
      return []
    return [
      *refs.nonlocals.values(),
      *refs.globals.values(),
      *(obj.__defaults__ or ()),
      *(obj.__kwdefaults__ or {}).values(),
    ]
  if isinstance(obj, (list, tuple, set, frozenset)):
    return list(obj)[:_SEARCH_WIDTH]
  if isinstance(obj, dict):
    return list(obj.values())[:_SEARCH_WIDTH]
  return []


def _nnx_graphs(nnx, roots) -> Iterator[Any]:
  """NNX modules among the references of `roots`; a GraphDef is rebuilt with placeholder leaves
  (only its static configuration is read)."""
  for root in roots:
    for obj in _references(root):
      if isinstance(obj, nnx.Module):
        yield obj
      elif isinstance(obj, nnx.GraphDef):
        try:
          yield nnx.merge(obj, [None] * obj.num_leaves)
        except Exception:  # noqa: BLE001 - a graph that cannot be rebuilt is not inspected
          continue


def _nnx_coupling(loss_fn: Callable, params: PyTree) -> list[str]:
  nnx = sys.modules.get("flax.nnx")
  if nnx is None:
    return []
  found = []
  params_nodes = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Module))
  for graph in _nnx_graphs(nnx, [loss_fn, *params_nodes]):
    for path, node in nnx.iter_graph(graph):
      if isinstance(node, nnx.BatchNorm) and node.use_running_average is False:
        where = "/".join(map(str, path)) or type(graph).__name__
        found.append(
          f"flax.nnx {type(node).__name__} at {where} runs in training mode "
          "(use_running_average=False)"
        )
  return found


def _abstract(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)


def _value_and_grad(loss_fn: Callable, has_aux: bool) -> Callable:
  """`value_and_grad(loss_fn)`, refusing a loss that is not one float scalar (`RoutingError` with
  the reason, not JAX's TypeError) before differentiating it."""

  def fn(params, example):
    if has_aux:
      loss, vjp, aux = jax.vjp(lambda p: loss_fn(p, example), params, has_aux=True)
      check_output((loss, aux), has_aux)
      return (loss, aux), vjp(jnp.ones_like(loss))[0]
    loss, vjp = jax.vjp(lambda p: loss_fn(p, example), params)
    check_output(loss, has_aux)
    return loss, vjp(jnp.ones_like(loss))[0]

  return fn


def _trace(grad_fn: Callable, params: PyTree, example: PyTree, found: list[str]):
  """(jaxpr or None, unbound-axis NameError or None) of `grad_fn`, noting Linen coupling."""
  linen = sys.modules.get("flax.linen")
  watch = _LinenWatch(linen) if linen is not None else None
  try:
    if watch is None:
      return jax.make_jaxpr(grad_fn)(_abstract(params), _abstract(example)), None
    with linen.intercept_methods(watch):
      return jax.make_jaxpr(grad_fn)(_abstract(params), _abstract(example)), None
  except NameError as exc:  # an unbound axis name: the loss expects to run over a batch axis
    if not jc.unbound_axis(exc):
      raise
    return None, exc
  except Exception:  # noqa: BLE001 - a coupled layer may fail to trace; report it first
    if not found and not (watch and watch.found):
      raise
    return None, None
  finally:
    if watch is not None:
      found += watch.found


def check_per_example(
  loss_fn: Callable, params: PyTree, example: PyTree, *, has_aux: bool = False
) -> None:
  """Raise `BatchCouplingError` when the per-example loss mixes examples.

  Traces `value_and_grad(loss_fn)` once on abstract values (`params`, `example` may be arrays or
  `jax.ShapeDtypeStruct`s). Refuses BatchNorm in training mode (Flax Linen, or Flax NNX modules
  reachable from `loss_fn` or `params`), writes to Linen's `batch_stats` collection, and
  collectives over named axes (`psum`, `all_gather`, ...), including ones whose axis is not bound
  because they expect a batch axis that per-example evaluation does not have. Haiku's
  `hk.BatchNorm(is_training=True)`, an NNX BatchNorm switched to training mode by a call
  argument, and cross-example statistics computed outside the loss are not detected.
  """
  found = _nnx_coupling(loss_fn, params)
  closed, error = _trace(_value_and_grad(loss_fn, has_aux), params, example, found)
  if found:
    raise BatchCouplingError(
      f"the loss is batch-coupled: {'; '.join(dict.fromkeys(found))}. Its statistics mix "
      f"the examples of a batch, so per-example routed gradients would not hold. {REMEDY}"
    )
  if error is not None:
    raise BatchCouplingError(
      f"the per-example loss uses a collective over a batch axis ({str(error).split('.')[0]}); "
      f"a loss that communicates across examples cannot be routed per example. {COLLECTIVE_REMEDY}"
    ) from None
  collectives = jc.collectives(closed.jaxpr)
  if collectives:
    raise BatchCouplingError(
      "the per-example loss communicates across a mapped axis "
      f"({', '.join(dict.fromkeys(collectives))}); per-example routing would be wrong. "
      f"{COLLECTIVE_REMEDY}"
    )
