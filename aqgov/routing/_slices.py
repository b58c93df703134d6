"""Slice weights on the fast path: a weight per position of one axis of a parameter leaf.

A sliced leaf (attention heads, experts: `CompiledPolicy.leaf_weights` gives it [B, n, 1, ..., 1])
is not batched at the leaf when every use of it lets the per-example weight ride on something
already batched. At a use `op(a, p)` of the raw leaf `p`, sliced along its axis `k`:

- `k` is a free axis of a matmul's parameter operand, or an axis of an elementwise op's operand
  (which has the output's shape): output position `j` along the matching output axis depends on
  `p` only through position `j` of axis `k`, so the output cotangent is scaled along that axis by
  `w_i[j]`: each position of `p`'s gradient gets exactly its own weight.
- `k` is a contracting or batch axis of a matmul: `op` is linear in `a`, and `p[.., j, ..]` meets
  only `a`'s matching position `j`, so `a` is scaled along that axis by `w_i[j]` on the parameter
  side (a head's slice of the input of an output projection, an expert's rows).

Both give `(1/B) Σ_i w_i[j] ∇L_i` at every position `j`, at the cost of one elementwise multiply.
A sliced leaf with any other use (a reshape or slice of the parameter itself, a use inside scan,
cond or remat, a loss of parameters alone) is scaled at the leaf instead, which batches it.
Norms of sliced leaves are kept per position of the sliced axis, [B, n], so that
`group_norms` can sum each part into its group.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from aqgov.errors import RoutingError
from aqgov.routing import _jax_compat as jc
from aqgov.routing._analysis import Uses, is_param

ELEMENTWISE = frozenset({"add", "add_any", "sub", "mul", "div", "max", "min"})


def slice_axis(weight_shape: tuple[int, ...], leaf_shape: tuple[int, ...]) -> int | None:
  """The one axis of the leaf a per-example weight of shape [*leaf rank] varies along, if one."""
  varying = [k for k, n in enumerate(weight_shape) if n != 1]
  if len(varying) == 1 and weight_shape[varying[0]] == leaf_shape[varying[0]]:
    return varying[0]
  return None


def scaling(eqn, ins, leaf: int, axis: int) -> tuple | None:
  """How a use of sliced leaf `leaf` carries its weight: ("operand", j, d) to scale operand j
  along its axis d, ("output", o) to scale the output cotangent along axis o; None if neither."""
  if eqn is None or jc.multiple_results(eqn):
    return None
  params = [j for j, k in enumerate(ins) if is_param(k)]
  if len(params) != 1 or ins[params[0]].raw != leaf or ins[params[0]].role is not None:
    return None  # several parameter operands, a derived value, or a use inside a scan body
  q = params[0]
  name = jc.name(eqn)
  if name == jc.DOT_GENERAL and len(ins) == 2:
    (lc, rc), (lb, rb) = jc.dot_dimension_numbers(eqn)
    pc, pb, oc, ob = (lc, lb, rc, rb) if q == 0 else (rc, rb, lc, lb)
    if axis in pc:
      return ("operand", 1 - q, oc[list(pc).index(axis)])
    if axis in pb:
      return ("operand", 1 - q, ob[list(pb).index(axis)])
    rank = [len(v.aval.shape) for v in eqn.invars]
    free = [d for d in range(rank[q]) if d not in pc and d not in pb]
    lhs_free = rank[0] - len(lc) - len(lb)
    return ("output", len(lb) + (0 if q == 0 else lhs_free) + free.index(axis))
  if name in ELEMENTWISE and eqn.invars[q].aval.shape == eqn.outvars[0].aval.shape:
    return ("output", axis)
  return None


def fast_leaves(uses: Uses, axes: dict) -> frozenset:
  """The sliced leaves (`axes`: leaf -> sliced axis) every use of which carries its weight."""
  slow = set()
  for leaves, eqn, ins in uses.eqns:
    for leaf in leaves & axes.keys():
      if scaling(eqn, ins, leaf, axes[leaf]) is None:
        slow.add(leaf)
  return frozenset(axes) - slow


def _along(w: jax.Array, rank: int, axis: int) -> jax.Array:
  """The per-example weight vector of a sliced leaf shaped to broadcast along `axis` of `rank`."""
  vec = jnp.reshape(w, (-1,))
  return vec.reshape((1,) * axis + (vec.shape[0],) + (1,) * (rank - axis - 1))


def scale(eqn, ins, leaf: int, axis: int, args: list, w, weigh) -> tuple[list, object]:
  """The parameter-side operands of one use of a sliced leaf and the weight its cotangent gets
  (None when the weight rides on an operand)."""
  how = scaling(eqn, ins, leaf, axis)
  if how is None:
    raise RoutingError("internal: a sliced leaf reached a use that cannot carry its weight")
  if how[0] == "operand":
    _, j, d = how
    args = list(args)
    args[j] = weigh(args[j], _along(w, jnp.ndim(args[j]), d))
    return args, None
  return args, _along(w, len(eqn.outvars[0].aval.shape), how[1])


def positional_sq_norms(per_example: jax.Array, axis: int) -> jax.Array:
  """float32 [B, n]: squared norms of per-example gradients [B, *leaf] per position of `axis`."""
  g = jnp.square(per_example.astype(jnp.float32))
  return jnp.sum(g, axis=tuple(d for d in range(1, g.ndim) if d != axis + 1))


def part_sq_norms(compiled, squared_norms) -> list[jax.Array]:
  """Per part of `compiled` (its `parts_list`), float32 [B] squared norms, from per-leaf squared
  norms that are [B], or [B, n] per position of a sliced leaf's axis."""
  leaves = jax.tree.leaves(squared_norms)
  if len(leaves) != compiled.num_leaves:
    raise RoutingError(
      f"got squared norms for {len(leaves)} leaves but the policy was compiled for "
      f"{compiled.num_leaves}; compile it with the parameter pytree you differentiate"
    )
  out = []
  for part in compiled.parts_list:
    x = jnp.asarray(leaves[part.leaf], jnp.float32)
    if part.axis is None:
      out.append(x if x.ndim == 1 else jnp.sum(x.reshape(x.shape[0], -1), axis=1))
    elif x.ndim == 2 and x.shape[1] == compiled.leaf_shapes[part.leaf][part.axis]:
      out.append(jnp.sum(x[:, part.start : part.stop], axis=1))
    else:
      raise RoutingError(
        f"the squared norms of sliced leaf {compiled.leaf_paths[part.leaf]!r} have shape "
        f"{x.shape}; a sliced leaf needs them per position of its axis, [B, {math.prod(x.shape[1:]) or 'n'}]"
      )
  return out
