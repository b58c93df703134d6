"""Forward dependency analysis of a per-example loss's jaxpr, for per-use cotangent scaling.

Every value gets a `Kind`: whether it depends on the example (so it is batched under `vmap`) and
on which parameter leaves. The analysis also decides what the transformation supports (nested
`jit`, remat, `scan`, `cond`, custom JVP/VJP calls, `while` loops that do not see parameters),
refuses collectives over named axes as batch coupling, and records every place a parameter's
cotangent is scaled (`Uses`), with the equations whose per-example gradient norm can be had from
their operands (`Site`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp

from aqgov.errors import BatchCouplingError, UnsupportedPrimitiveError
from aqgov.routing import _ghost_norms as ghost_norms
from aqgov.routing import _jax_compat as jc

FALLBACK = "the per_example strategy will be used"


class Kind(NamedTuple):
  """What a value depends on: the example (batched under vmap) and which parameter leaves."""

  ex: bool
  leaves: frozenset
  raw: int | None = None  # the value *is* parameter leaf `raw`, unmodified
  # inside a scan body, how a raw leaf enters it: "shared" (a constant, the same every
  # iteration) or "stacked" (scanned over: each iteration sees one slice along axis 0)
  role: str | None = None


CONST = Kind(False, frozenset())


def union(kinds) -> Kind:
  kinds = list(kinds)
  return Kind(any(k.ex for k in kinds), frozenset().union(*(k.leaves for k in kinds)))


def is_param(k: Kind) -> bool:
  """A value that depends on parameters and not on the example."""
  return bool(k.leaves) and not k.ex


def mixes(kinds) -> bool:
  """Whether a parameter-only value meets an example-dependent one."""
  return any(is_param(k) for k in kinds) and any(k.ex for k in kinds)


def inexact(aval) -> bool:
  dtype = getattr(aval, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def differentiable(kind: Kind, aval) -> Kind:
  return kind if inexact(aval) else Kind(kind.ex, frozenset())


def strip(kinds) -> list[Kind]:
  """The kinds without `raw`: inside a sub-jaxpr no value is the leaf itself."""
  return [Kind(k.ex, k.leaves) for k in kinds]


class Site(NamedTuple):
  """An equation where one raw parameter leaf meets example-dependent operands, used once.

  Its per-example gradient statistic is computed in the backward pass from the other operands
  and the output cotangent (`_site_stats`). Inside a scan (`role` set) the equation runs once
  per iteration, `length` times."""

  leaf: int
  eqn: Any
  param_pos: int  # operand index of the parameter leaf
  dot: ghost_norms.DotSite | None  # set for dot_general
  conv: bool  # a convolution kernel with a patch form
  out_shape: tuple[int, ...]
  role: str | None = None  # None, or "shared" / "stacked" inside a scan (see `Kind.role`)
  length: int = 1  # iterations of the enclosing scan


class Uses:
  """Per leaf, every place its cotangent is scaled: (inlining path or None, Site or None).

  The path (equation indices through inlined `jit`s) is None inside loops, branches and remat;
  a Site marks an equation whose per-example gradient norm can be had from its operands."""

  def __init__(self):
    self.by_leaf: dict[int, list[tuple[tuple | None, Site | None]]] = {}
    self.operands: list[tuple[tuple | None, frozenset]] = []  # parameter leaves of each use
    self.eqns: list[tuple[frozenset, Any, Any]] = []  # (leaves, equation or None, input kinds)
    self.scan_length: int | None = None  # set while a scan body with a path is analysed

  def add(self, path: tuple | None, leaves, site: Site | None = None, eqn=None, ins=None) -> None:
    # for visibility, a use inside a loop counts as one without a path (it cannot be masked)
    self.operands.append((None if self.scan_length else path, frozenset(leaves)))
    self.eqns.append((frozenset(leaves), eqn, ins))
    for leaf in leaves:
      self.by_leaf.setdefault(leaf, []).append((path, site))


def unsupported(name: str, why: str) -> UnsupportedPrimitiveError:
  return UnsupportedPrimitiveError(
    f"the cotangent strategy does not transform `{name}`{why}; {FALLBACK}", primitive=name
  )


def check_eqn(eqn) -> None:
  """Refuse an equation the transformation cannot handle, or one that mixes examples."""
  name = jc.name(eqn)
  if name not in jc.STRUCTURED and jc.has_sub_jaxprs(eqn):
    raise unsupported(name, "")
  if jc.is_collective(eqn):
    raise BatchCouplingError(
      f"the loss uses the collective `{name}` over a named axis, which mixes examples; "
      "per-example routing would be wrong: compute batch statistics outside the loss "
      "(e.g. BatchNorm in inference mode) or make the loss depend on one example only"
    )


def analyze(closed, in_kinds, uses: Uses | None = None, path: tuple | None = ()) -> list[Kind]:
  """Kinds of `closed`'s outputs given its inputs' kinds; records scaling sites into `uses`."""
  env: dict = {}
  read = lambda a: CONST if jc.is_literal(a) else env[a]
  for v in closed.jaxpr.constvars:
    env[v] = CONST
  for v, k in zip(closed.jaxpr.invars, in_kinds):
    env[v] = k
  for i, eqn in enumerate(closed.jaxpr.eqns):
    ins = [read(a) for a in eqn.invars]
    sub = None if path is None else path + (i,)
    outs = eqn_kinds(eqn, ins, uses, sub)
    for v, k in zip(eqn.outvars, outs):
      env[v] = differentiable(k, v.aval)
  return [read(a) for a in closed.jaxpr.outvars]


def _site(eqn, ins, length: int | None) -> Site | None:
  if jc.multiple_results(eqn) or not any(k.ex for k in ins):
    return None
  params = [j for j, k in enumerate(ins) if is_param(k)]
  if len(params) != 1 or ins[params[0]].raw is None:
    return None
  pos = params[0]
  if (ins[pos].role is None) != (length is None):
    return None
  length = length or 1
  out_shape = tuple(eqn.outvars[0].aval.shape)
  dot = None
  if jc.name(eqn) == jc.DOT_GENERAL:
    act = eqn.invars[1 - pos]
    dot = ghost_norms.DotSite(
      leaf=ins[pos].raw,
      param_is_rhs=pos == 1,
      dimension_numbers=jc.dot_dimension_numbers(eqn),
      act_shape=tuple(act.aval.shape),
      out_shape=out_shape,
    )
  conv = jc.name(eqn) == jc.CONV and pos == 1 and ghost_norms.conv_supported(eqn.params)
  return Site(ins[pos].raw, eqn, pos, dot, conv, out_shape, ins[pos].role, length)


def eqn_kinds(eqn, ins: list[Kind], uses: Uses | None, path: tuple | None) -> list[Kind]:
  """Output kinds of one equation (mirrors how vmap batches it); records scaling sites."""
  check_eqn(eqn)
  name = jc.name(eqn)
  n_out = len(eqn.outvars)
  if name == jc.STOP_GRADIENT:
    return [Kind(ins[0].ex, frozenset())]
  if name in jc.PER_OPERAND:
    return strip(ins)
  if name in jc.INLINE:
    inner_path = path if mixes(ins) else None
    return analyze(jc.inner_jaxpr(eqn), ins, uses if mixes(ins) else None, inner_path)
  if name in jc.REMAT:
    return analyze(jc.inner_jaxpr(eqn), strip(ins), uses, None)
  if name == jc.SCAN:
    return _scan_kinds(eqn, ins, uses, path)
  if name == jc.COND:
    return _cond_kinds(eqn, ins, uses)
  if name == jc.WHILE:
    return _while_kinds(eqn, ins)
  if name in jc.WHOLE:
    outs = analyze(jc.custom_call_jaxpr(eqn), strip(ins))
  else:
    outs = [union(ins)] * n_out
  if mixes(ins) and uses is not None:
    leaves = frozenset().union(*(k.leaves for k in ins if is_param(k)))
    site = None if path is None else _site(eqn, ins, uses.scan_length)
    uses.add(path, leaves, site, eqn, ins)
  return outs


def scan_carry_kinds(eqn, ins: list[Kind]) -> list[Kind]:
  """Fixpoint kinds of a scan's carries. Parameter-derived carries of a scan that sees the
  example are forced to be example-dependent (lifted at entry), so no carry is parameter-only."""
  p = jc.scan_params(eqn)
  nc, nk = p.num_consts, p.num_carry
  ins = strip(ins)
  consts, carry, xs = ins[:nc], ins[nc : nc + nk], ins[nc + nk :]
  force = any(k.ex for k in ins)
  while True:
    if force:
      carry = [Kind(True, k.leaves) if k.leaves else k for k in carry]
    outs = analyze(p.jaxpr, consts + carry + xs)
    new = [union([c, o]) for c, o in zip(carry, outs[:nk])]
    if force:
      new = [Kind(True, k.leaves) if k.leaves else k for k in new]
    if new == carry:
      return carry
    carry = new


def scan_body_path(uses: Uses | None, path: tuple | None) -> tuple | None:
  """The path of a scan's body equations: the scan's own path, unless the scan is nested in
  another scan's body (only the outermost scan's iterations are accounted per site)."""
  return None if uses is None or path is None or uses.scan_length else path


def _scan_kinds(eqn, ins, uses, path):
  p = jc.scan_params(eqn)
  nc, nk = p.num_consts, p.num_carry
  carry = scan_carry_kinds(eqn, ins)
  body_path = scan_body_path(uses, path)
  if body_path is None:
    body_in = strip(ins[:nc]) + carry + strip(ins[nc + nk :])
    outs = analyze(p.jaxpr, body_in, uses, None)
  else:  # raw leaves entering the body keep their identity, with how they enter
    role = lambda ks, r: [Kind(k.ex, k.leaves, k.raw, r) if k.raw is not None else k for k in ks]
    body_in = role(ins[:nc], "shared") + carry
    body_in += role(ins[nc + nk :], "stacked")
    uses.scan_length = p.length
    try:
      outs = analyze(p.jaxpr, body_in, uses, body_path)
    finally:
      uses.scan_length = None
  if uses is not None:
    for init, c, out in zip(ins[nc : nc + nk], carry, outs[:nk]):
      if c.ex:
        uses.add(None, init.leaves if is_param(init) else ())
        uses.add(None, out.leaves if is_param(out) else ())
  return carry + outs[nk:]


def _cond_kinds(eqn, ins, uses):
  index, ops = ins[0], strip(ins[1:])
  per_branch = [analyze(b, ops, uses, None) for b in jc.cond_branches(eqn)]
  outs = [union(ks) for ks in zip(*per_branch)]
  if index.ex:
    outs = [Kind(True, k.leaves) for k in outs]
  if uses is not None:
    for branch_outs in per_branch:
      for k, final in zip(branch_outs, outs):
        if final.ex and is_param(k):
          uses.add(None, k.leaves)
  return outs


def _while_kinds(eqn, ins):
  if any(k.leaves for k in ins):
    raise unsupported(
      jc.WHILE, " (a while_loop whose inputs depend on parameters is not reverse-differentiable)"
    )
  p = jc.while_params(eqn)
  nc, nb = p.cond_nconsts, p.body_nconsts
  cond_consts, body_consts, carry = ins[:nc], ins[nc : nc + nb], strip(ins[nc + nb :])
  while True:  # as vmap batches it: a carry is batched if the body makes it so, or all are if
    pred = analyze(p.cond_jaxpr, cond_consts + carry)[0]  # the predicate is batched
    if pred.ex:
      return [Kind(True, frozenset())] * len(carry)
    outs = analyze(p.body_jaxpr, body_consts + carry)
    new = [union([c, o]) for c, o in zip(carry, outs)]
    if new == carry:
      return carry
    carry = new


def check_visibility(uses: Uses, vis_key: tuple) -> None:
  """Refuse uses of hidden leaves that emission cannot mask exactly: a value computed from leaves
  of different visibility, or a use inside scan/cond/while/remat (or a loss of hidden leaves alone)."""
  if not any(k is not None for k in vis_key):
    return
  for path, leaves in uses.operands:
    keys = {vis_key[leaf] for leaf in leaves}
    if keys == {None}:
      continue
    if len(keys) > 1:
      raise unsupported(
        "visibility",
        " for a value computed from parameters of groups with different "
        "visibility (e.g. a hidden adapter's weight times a shared one)",
      )
    if path is None:
      raise unsupported(
        "visibility",
        " inside scan, cond, while or remat, or for a loss that depends on hidden parameters alone",
      )
