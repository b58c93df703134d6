"""The JAX internals routing reads: primitive names, equation parameters, `jax.extend` types.

None of these is a stable JAX API: primitives are renamed, split or added, and equation
parameters change keys between JAX versions. Every other routing module reaches them through
the names and accessors below, so following a JAX release means editing this one file.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
from jax.extend import core as jex_core

Literal = jex_core.Literal
DropVar = jex_core.DropVar
ClosedJaxpr = jex_core.ClosedJaxpr
Tracer = jax.core.Tracer

# Call-like primitives whose body is evaluated in place (inlined by the transformation).
INLINE = frozenset({"jit", "pjit", "closed_call", "core_call"})
# Rematerialisation (`jax.checkpoint`): re-emitted under `jax.checkpoint` with the same options.
REMAT = frozenset({"remat2", "checkpoint", "remat"})
# Custom JVP/VJP calls: treated as one operation so their rules are honoured.
WHOLE = frozenset({"custom_jvp_call", "custom_vjp_call"})
# Identity on each operand separately.
PER_OPERAND = frozenset({"optimization_barrier"})
SCAN, COND, WHILE = "scan", "cond", "while"
STOP_GRADIENT = "stop_gradient"
DOT_GENERAL = "dot_general"
CONV = "conv_general_dilated"
# Control flow whose sub-jaxprs the routing core handles itself.
# Linear in each operand (a zero parameter side stays zero through them), and products (zero when
# one operand is): what lets a hidden parameter's use be masked without recomputing it.
ZERO_PRESERVING = frozenset(
  {
    "convert_element_type",
    "reshape",
    "transpose",
    "broadcast_in_dim",
    "squeeze",
    "expand_dims",
    "slice",
    "dynamic_slice",
    "neg",
    "copy",
    "copy_p",
    "reduce_sum",
    "rev",
    "reduce_precision",
  }
)
ZERO_ANNIHILATING = frozenset({"mul", DOT_GENERAL, CONV})
STRUCTURED = INLINE | REMAT | WHOLE | {SCAN, COND, WHILE}

# Primitives that communicate across a named (mapped) axis: inside a per-example loss they mix
# examples (or shards of the batch), so per-example semantics do not hold.
COLLECTIVES = frozenset(
  {
    "psum",
    "pmax",
    "pmin",
    "pmean",
    "ppermute",
    "pbroadcast",
    "all_gather",
    "all_gather_invariant",
    "all_to_all",
    "ragged_all_to_all",
    "reduce_scatter",
    "psum_scatter",
    "axis_index",
    "psum_invariant",
    "pgather",
    "psend",
    "precv",
    "unreduced_psum",
  }
)


def name(eqn) -> str:
  """The primitive name of an equation."""
  return eqn.primitive.name


def multiple_results(eqn) -> bool:
  return eqn.primitive.multiple_results


def bind(eqn, invals) -> list:
  """Apply `eqn`'s primitive, with its parameters, to new operands; always a list of outputs."""
  out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
  return list(out) if eqn.primitive.multiple_results else [out]


def is_literal(atom) -> bool:
  return isinstance(atom, Literal)


def is_dropped(var) -> bool:
  return isinstance(var, DropVar)


def literal_value(atom) -> Any:
  return atom.val


def has_sub_jaxprs(eqn) -> bool:
  return any(True for _ in jex_core.jaxprs_in_params(eqn.params))


def sub_jaxprs(jaxpr):
  """The jaxprs nested directly in `jaxpr`'s equations."""
  return jex_core.subjaxprs(jaxpr)


def _closed(eqn, key: str):
  inner = eqn.params[key]
  return inner if isinstance(inner, ClosedJaxpr) else ClosedJaxpr(inner, ())


def inner_jaxpr(eqn):
  """The body of a call-like or remat equation, as a ClosedJaxpr."""
  return _closed(eqn, "jaxpr" if "jaxpr" in eqn.params else "call_jaxpr")


def custom_call_jaxpr(eqn):
  """The primal body of a custom JVP/VJP call, as a ClosedJaxpr."""
  return _closed(eqn, "call_jaxpr")


def named_axes(eqn) -> list[str]:
  """The named (mapped) axes an equation reduces or communicates over."""
  names = []
  for key in ("axes", "axis_name"):
    value = eqn.params.get(key)
    values = value if isinstance(value, (tuple, list)) else (value,)
    names += [str(v) for v in values if v is not None and not isinstance(v, numbers.Integral)]
  return names


def is_collective(eqn) -> bool:
  """Whether an equation communicates across a named axis (and so mixes mapped examples)."""
  return name(eqn) in COLLECTIVES or "axis_name" in eqn.params or bool(named_axes(eqn))


def collectives(jaxpr) -> list[str]:
  """`primitive over axes` for every collective anywhere in `jaxpr` (recursing into sub-jaxprs)."""
  out = []
  for eqn in jaxpr.eqns:
    if is_collective(eqn):
      axes = named_axes(eqn)
      out.append(f"{name(eqn)} over {axes}" if axes else name(eqn))
  for sub in sub_jaxprs(jaxpr):
    out += collectives(sub)
  return out


def unbound_axis(exc: BaseException) -> bool:
  """Whether `exc` is JAX's error for a collective over an axis name no transform binds."""
  return isinstance(exc, NameError) and "axis name" in str(exc)


class ScanParams(NamedTuple):
  num_consts: int
  num_carry: int
  jaxpr: Any  # ClosedJaxpr of the body
  length: int
  reverse: bool
  unroll: Any


def scan_params(eqn) -> ScanParams:
  p = eqn.params
  return ScanParams(
    p["num_consts"], p["num_carry"], p["jaxpr"], p["length"], p["reverse"], p["unroll"]
  )


def cond_branches(eqn) -> tuple:
  """The branches of a `cond` (ClosedJaxprs); its first operand is the branch index."""
  return tuple(eqn.params["branches"])


class WhileParams(NamedTuple):
  cond_nconsts: int
  body_nconsts: int
  cond_jaxpr: Any
  body_jaxpr: Any


def while_params(eqn) -> WhileParams:
  p = eqn.params
  return WhileParams(p["cond_nconsts"], p["body_nconsts"], p["cond_jaxpr"], p["body_jaxpr"])


def remat_options(eqn) -> dict:
  """Keyword arguments of `jax.checkpoint` that re-create a remat equation."""
  return {"prevent_cse": eqn.params.get("prevent_cse", True), "policy": eqn.params.get("policy")}


def dot_dimension_numbers(eqn) -> tuple:
  return eqn.params["dimension_numbers"]


class ConvParams(NamedTuple):
  """What a convolution's per-example kernel-gradient norm needs of its parameters."""

  dimension_numbers: Any  # ConvDimensionNumbers(lhs_spec, rhs_spec, out_spec)
  padding: tuple
  lhs_dilation: tuple
  rhs_dilation: tuple
  window_strides: tuple
  feature_group_count: int
  batch_group_count: int


def conv_params(params: dict) -> ConvParams:
  """The parameters of a `conv_general_dilated` equation (`eqn.params`)."""
  return ConvParams(
    params["dimension_numbers"],
    params["padding"],
    params["lhs_dilation"],
    params["rhs_dilation"],
    params["window_strides"],
    params.get("feature_group_count", 1),
    params.get("batch_group_count", 1),
  )
