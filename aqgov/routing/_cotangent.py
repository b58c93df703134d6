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

Forward visibility. A leaf may be *hidden* from some examples (its group is `visible = "routed"`
and the example's weight in it is 0): for them the leaf acts as zero in the forward pass. At each
use of such a leaf the output is `where(seen_i, op(a, p), op(a, p0))`, with `p0` the parameter-side
value recomputed with the hidden leaves zeroed (parameter-only, so computed once, not per
example). For a matmul, convolution or product of a leaf (or a linear view of it: reshape,
transpose, cast, ...), `op(a, 0) = 0`, so the use's output is just multiplied by `seen_i`. A use
that mixes hidden leaves with leaves of another visibility, or sits inside `scan`/`cond`/`remat`,
raises `UnsupportedPrimitiveError` (the per_example strategy then zeroes the leaves per example).

The transformation recurses into nested `jit`, `checkpoint`/`remat`, `scan` and `cond`; custom
JVP/VJP calls are handled whole, honouring their rules. Anything else that contains a jaxpr raises
`UnsupportedPrimitiveError` so callers can fall back to per-example gradients; collectives over a
named axis raise `BatchCouplingError`, since they mix examples.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from aqgov.routing import _ghost_norms as ghost_norms
from aqgov.errors import BatchCouplingError, RoutingError, UnsupportedPrimitiveError
from aqgov.routing._transforms import unsigned_zeros

PyTree = Any
_sg = jax.lax.stop_gradient

_INLINE = frozenset({"jit", "pjit", "closed_call", "core_call"})
_REMAT = frozenset({"remat2", "checkpoint", "remat"})
_WHOLE = frozenset({"custom_jvp_call", "custom_vjp_call"})
_COLLECTIVES = frozenset({
    "psum", "pmax", "pmin", "pmean", "all_gather", "all_to_all", "ppermute", "axis_index",
    "psum_scatter", "reduce_scatter", "pbroadcast", "ragged_all_to_all", "psum_invariant",
    "all_gather_invariant", "pgather"})
_PER_OPERAND = frozenset({"optimization_barrier"})  # identity on each operand separately
_FALLBACK = "the per_example strategy will be used"


class _Kind(NamedTuple):
  """What a value depends on: the example (batched under vmap) and which parameter leaves."""
  ex: bool
  leaves: frozenset
  raw: int | None = None   # the value *is* parameter leaf `raw`, unmodified


_CONST = _Kind(False, frozenset())


def _union(kinds) -> _Kind:
  kinds = list(kinds)
  return _Kind(any(k.ex for k in kinds), frozenset().union(*(k.leaves for k in kinds)))


def _is_param(k: _Kind) -> bool:
  return bool(k.leaves) and not k.ex


def _mixes(kinds) -> bool:
  return any(_is_param(k) for k in kinds) and any(k.ex for k in kinds)


def _inexact(aval) -> bool:
  dtype = getattr(aval, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def _differentiable(kind: _Kind, aval) -> _Kind:
  return kind if _inexact(aval) else _Kind(kind.ex, frozenset())


def _strip(kinds) -> list[_Kind]:
  return [_Kind(k.ex, k.leaves) for k in kinds]


# ---------------------------------------------------------------------------------------------
# Analysis: kinds, supported constructs, and every place a parameter's gradient is scaled.


class _Uses:
  """Per leaf, every place its cotangent is scaled: (inlining path or None, _Site or None).

  The path (equation indices through inlined `jit`s) is None inside loops, branches and remat;
  a _Site marks an equation whose per-example gradient norm can be had from its operands."""

  def __init__(self):
    self.by_leaf: dict[int, list[tuple[tuple | None, _Site | None]]] = {}
    self.operands: list[tuple[tuple | None, frozenset]] = []   # parameter leaves of each use

  def add(self, path: tuple | None, leaves, site=None) -> None:
    self.operands.append((path, frozenset(leaves)))
    for leaf in leaves:
      self.by_leaf.setdefault(leaf, []).append((path, site))


def _unsupported(name: str, why: str) -> UnsupportedPrimitiveError:
  err = UnsupportedPrimitiveError(
      f"the cotangent strategy does not transform `{name}`{why}; {_FALLBACK}")
  err.primitive = name
  return err


def _check_eqn(eqn) -> None:
  name = eqn.primitive.name
  if name not in _INLINE | _REMAT | _WHOLE | {"scan", "cond", "while"} and (
      any(True for _ in jcore.jaxprs_in_params(eqn.params))):
    raise _unsupported(name, "")
  axes = eqn.params.get("axes", ())
  named_axes = isinstance(axes, tuple) and any(not isinstance(a, numbers.Integral) for a in axes)
  if name in _COLLECTIVES or "axis_name" in eqn.params or named_axes:
    raise BatchCouplingError(
        f"the loss uses the collective `{name}` over a named axis, which mixes examples; "
        "per-example routing would be wrong: compute batch statistics outside the loss "
        "(e.g. BatchNorm in inference mode) or make the loss depend on one example only")


def _closed(eqn, key: str):
  inner = eqn.params[key]
  return inner if isinstance(inner, jcore.ClosedJaxpr) else jcore.ClosedJaxpr(inner, ())


def _inner_jaxpr(eqn):
  return _closed(eqn, "jaxpr" if "jaxpr" in eqn.params else "call_jaxpr")


def _analyze(closed, in_kinds, uses: _Uses | None = None, path: tuple | None = ()) -> list[_Kind]:
  """Kinds of `closed`'s outputs given its inputs' kinds; records scaling sites into `uses`."""
  env: dict = {}
  read = lambda a: _CONST if isinstance(a, jcore.Literal) else env[a]
  for v in closed.jaxpr.constvars:
    env[v] = _CONST
  for v, k in zip(closed.jaxpr.invars, in_kinds):
    env[v] = k
  for i, eqn in enumerate(closed.jaxpr.eqns):
    ins = [read(a) for a in eqn.invars]
    sub = None if path is None else path + (i,)
    outs = _eqn_kinds(eqn, ins, uses, sub)
    for v, k in zip(eqn.outvars, outs):
      env[v] = _differentiable(k, v.aval)
  return [read(a) for a in closed.jaxpr.outvars]


class _Site(NamedTuple):
  """An equation where one raw parameter leaf meets example-dependent operands, used once.

  Its per-example gradient norm is computed after the step from the other operands and the
  output cotangent: by the ghost form for a matmul, from input patches for a convolution kernel,
  else by that equation's own VJP per example."""
  leaf: int
  eqn: Any
  param_pos: int                       # operand index of the parameter leaf
  dot: ghost_norms.DotSite | None      # set for dot_general
  conv: bool                           # a convolution kernel with a patch form
  out_shape: tuple[int, ...]


def _site(eqn, ins) -> _Site | None:
  if eqn.primitive.multiple_results or not any(k.ex for k in ins):
    return None
  params = [j for j, k in enumerate(ins) if _is_param(k)]
  if len(params) != 1 or ins[params[0]].raw is None:
    return None
  pos = params[0]
  out_shape = tuple(eqn.outvars[0].aval.shape)
  dot = None
  if eqn.primitive.name == "dot_general":
    act = eqn.invars[1 - pos]
    dot = ghost_norms.DotSite(
        leaf=ins[pos].raw, param_is_rhs=pos == 1, dimension_numbers=eqn.params["dimension_numbers"],
        act_shape=tuple(act.aval.shape), out_shape=out_shape)
  conv = (eqn.primitive.name == "conv_general_dilated" and pos == 1
          and ghost_norms.conv_supported(eqn.params))
  return _Site(ins[pos].raw, eqn, pos, dot, conv, out_shape)


def _eqn_kinds(eqn, ins: list[_Kind], uses: _Uses | None, path: tuple | None) -> list[_Kind]:
  """Output kinds of one equation (mirrors how vmap batches it); records scaling sites."""
  _check_eqn(eqn)
  name = eqn.primitive.name
  n_out = len(eqn.outvars)
  if name == "stop_gradient":
    return [_Kind(ins[0].ex, frozenset())]
  if name in _PER_OPERAND:
    return _strip(ins)
  if name in _INLINE:
    inner_path = path if _mixes(ins) else None
    return _analyze(_inner_jaxpr(eqn), ins, uses if _mixes(ins) else None, inner_path)
  if name in _REMAT:
    return _analyze(_inner_jaxpr(eqn), _strip(ins), uses, None)
  if name == "scan":
    return _scan_kinds(eqn, ins, uses)
  if name == "cond":
    return _cond_kinds(eqn, ins, uses)
  if name == "while":
    return _while_kinds(eqn, ins)
  if name in _WHOLE:
    outs = _analyze(_closed(eqn, "call_jaxpr"), _strip(ins))
  else:
    outs = [_union(ins)] * n_out
  if _mixes(ins) and uses is not None:
    leaves = frozenset().union(*(k.leaves for k in ins if _is_param(k)))
    uses.add(path, leaves, None if path is None else _site(eqn, ins))
  return outs


def _scan_carry_kinds(eqn, ins: list[_Kind]) -> list[_Kind]:
  """Fixpoint kinds of a scan's carries. Parameter-derived carries of a scan that sees the
  example are forced to be example-dependent (lifted at entry), so no carry is parameter-only."""
  nc, nk = eqn.params["num_consts"], eqn.params["num_carry"]
  ins = _strip(ins)
  consts, carry, xs = ins[:nc], ins[nc:nc + nk], ins[nc + nk:]
  force = any(k.ex for k in ins)
  while True:
    if force:
      carry = [_Kind(True, k.leaves) if k.leaves else k for k in carry]
    outs = _analyze(eqn.params["jaxpr"], consts + carry + xs)
    new = [_union([c, o]) for c, o in zip(carry, outs[:nk])]
    if force:
      new = [_Kind(True, k.leaves) if k.leaves else k for k in new]
    if new == carry:
      return carry
    carry = new


def _scan_kinds(eqn, ins, uses):
  nc, nk = eqn.params["num_consts"], eqn.params["num_carry"]
  carry = _scan_carry_kinds(eqn, ins)
  body_in = _strip(ins[:nc]) + carry + _strip(ins[nc + nk:])
  outs = _analyze(eqn.params["jaxpr"], body_in, uses, None)
  if uses is not None:
    for init, c, out in zip(ins[nc:nc + nk], carry, outs[:nk]):
      if c.ex:
        uses.add(None, init.leaves if _is_param(init) else ())
        uses.add(None, out.leaves if _is_param(out) else ())
  return carry + outs[nk:]


def _cond_kinds(eqn, ins, uses):
  index, ops = ins[0], _strip(ins[1:])
  per_branch = [_analyze(b, ops, uses, None) for b in eqn.params["branches"]]
  outs = [_union(ks) for ks in zip(*per_branch)]
  if index.ex:
    outs = [_Kind(True, k.leaves) for k in outs]
  if uses is not None:
    for branch_outs in per_branch:
      for k, final in zip(branch_outs, outs):
        if final.ex and _is_param(k):
          uses.add(None, k.leaves)
  return outs


def _while_kinds(eqn, ins):
  if any(k.leaves for k in ins):
    raise _unsupported("while", " (a while_loop whose inputs depend on parameters is not "
                       "reverse-differentiable)")
  p = eqn.params
  nc, nb = p["cond_nconsts"], p["body_nconsts"]
  cond_consts, body_consts, carry = ins[:nc], ins[nc:nc + nb], _strip(ins[nc + nb:])
  while True:  # as vmap batches it: a carry is batched if the body makes it so, or all are if
    pred = _analyze(p["cond_jaxpr"], cond_consts + carry)[0]  # the predicate is batched
    if pred.ex:
      return [_Kind(True, frozenset())] * len(carry)
    outs = _analyze(p["body_jaxpr"], body_consts + carry)
    new = [_union([c, o]) for c, o in zip(carry, outs)]
    if new == carry:
      return carry
    carry = new


# ---------------------------------------------------------------------------------------------
# The scaling primitive.


@jax.custom_vjp
def _join(y_a, y_ps, ws):
  """Identity in `y_a`; backward gives `y_a` the cotangent and each `y_ps[k]` cotangent * ws[k]
  (the cotangent unchanged where ws[k] is None: the weight already rides on an operand)."""
  return y_a


def _join_fwd(y_a, y_ps, ws):
  return y_a, ws


def _join_bwd(ws, ct):
  scaled = tuple(ct if w is None else (ct * w.astype(ct.dtype)).astype(ct.dtype) for w in ws)
  return ct, scaled, tuple(None if w is None else jnp.zeros_like(w) for w in ws)


_join.defvjp(_join_fwd, _join_bwd)


def _bind(eqn, invals):
  out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
  return list(out) if eqn.primitive.multiple_results else [out]


# ---------------------------------------------------------------------------------------------
# Emission: evaluate the rewritten jaxpr on (vmapped, differentiated) tracers.


class _Ctx(NamedTuple):
  """What every environment of one per-example evaluation shares."""
  weights: dict            # leaf -> per-example scalar weight
  leaf_branch: dict        # leaf -> value used on the parameter side (leaf, or leaf + probe)
  materialised: frozenset  # leaves whose per-example gradient is materialised via a probe
  site_probes: dict        # inlining path -> (_Site, zero probe added to its parameter side)
  site_acts: dict          # inlining path -> recorded non-parameter operands (output)
  vis_key: tuple = ()      # leaf -> visibility key (None: seen by every example)
  seen: dict = {}          # visibility key -> per-example bool: the example sees those leaves


class _Env:
  """Values and kinds of one jaxpr evaluation, with per-leaf isolated parameter values."""

  def __init__(self, ctx: _Ctx):
    self.ctx = ctx
    self.vals: dict = {}
    self.kinds: dict = {}
    self.producer: dict = {}
    self.links: dict = {}
    self.iso_memo: dict = {}
    self.zero_memo: dict = {}

  def read(self, a):
    return a.val if isinstance(a, jcore.Literal) else self.vals[a]

  def kind(self, a) -> _Kind:
    return _CONST if isinstance(a, jcore.Literal) else self.kinds[a]

  def write(self, v, val, kind: _Kind) -> None:
    if isinstance(v, jcore.DropVar):
      return
    self.vals[v] = val
    self.kinds[v] = _differentiable(kind, v.aval)

  def needs_iso(self, kind: _Kind, leaf: int) -> bool:
    return len(kind.leaves) > 1 or leaf in self.ctx.materialised

  def iso(self, a, leaf: int):
    """`a`'s value with its gradient flowing to parameter leaf `leaf` only."""
    if isinstance(a, jcore.Literal):
      return a.val
    kind = self.kinds[a]
    if leaf not in kind.leaves:
      return _sg(self.vals[a])
    if (a, leaf) in self.iso_memo:
      return self.iso_memo[a, leaf]
    if kind.raw == leaf:
      val = self.ctx.leaf_branch[leaf]
    elif a in self.links:
      env, b = self.links[a]
      val = env.iso(b, leaf)
    elif not self.needs_iso(kind, leaf):
      val = self.vals[a]
    elif a in self.producer:
      eqn = self.producer[a]
      outs = _bind(eqn, [self._iso_input(b, leaf) for b in eqn.invars])
      for v, o in zip(eqn.outvars, outs):
        if not isinstance(v, jcore.DropVar):
          self.iso_memo[v, leaf] = o
      return self.iso_memo[a, leaf]
    else:
      raise RoutingError(f"internal: no leaf-{leaf} view of a parameter-derived value")
    self.iso_memo[a, leaf] = val
    return val

  def zeroed(self, a) -> tuple[Any, bool]:
    """`a`'s value with its hidden leaves zeroed, and whether that value is exactly zero.

    Only for parameter-only values all of whose leaves share one visibility key (the plan
    refuses any other use), so the result is a constant of the step."""
    if isinstance(a, jcore.Literal):
      return a.val, False
    kind = self.kinds[a]
    if not kind.leaves:
      return self.vals[a], False
    if a in self.zero_memo:
      return self.zero_memo[a]
    if kind.raw is not None:
      out = (jnp.zeros_like(self.vals[a]), True)
    elif a in self.links:
      env, b = self.links[a]
      out = env.zeroed(b)
    elif a in self.producer:
      eqn = self.producer[a]
      ins = [self.zeroed(b) for b in eqn.invars]
      vals = _bind(eqn, [v for v, _ in ins])
      zero = _keeps_zero(eqn, [z for _, z in ins])
      for v, o in zip(eqn.outvars, vals):
        if not isinstance(v, jcore.DropVar):
          self.zero_memo[v] = (o, zero)
      return self.zero_memo[a]
    else:
      raise RoutingError("internal: no zeroed view of a parameter-derived value")
    self.zero_memo[a] = out
    return out

  def _iso_input(self, a, leaf):
    kind = self.kind(a)
    if kind.ex:
      return _sg(self.read(a))
    return self.iso(a, leaf) if kind.leaves else self.read(a)

  def lift(self, a):
    """A parameter-only value entering an example-dependent position: exact value, batched, with
    each leaf's cotangent scaled by its weight."""
    val = self.read(a)
    if _visibility_key(self.ctx, self.kind(a).leaves) is not None:
      raise RoutingError("internal: a hidden parameter reached an example-dependent position unmasked")
    out = _sg(val)
    for leaf in sorted(self.kind(a).leaves):
      view = self.iso(a, leaf)
      w = self.ctx.weights[leaf].astype(val.dtype)
      out = out + w * (view - _sg(view))
    return out

  def seed(self, v, val, kind: _Kind, iso_vals: dict) -> None:
    self.write(v, val, kind)
    for leaf, iv in iso_vals.items():
      self.iso_memo[v, leaf] = iv


def _iso_seeds(env: _Env, atoms) -> list[dict]:
  """Per atom, the leaf views a sub-jaxpr needs (only those that differ from the value)."""
  out = []
  for a in atoms:
    kind = env.kind(a)
    views = {}
    if _is_param(kind):
      for leaf in sorted(kind.leaves):
        if env.needs_iso(kind, leaf):
          views[leaf] = env.iso(a, leaf)
    out.append(views)
  return out


def _emit(closed, env: _Env, path: tuple | None) -> list:
  """Evaluate `closed` (inputs already written into `env`) with per-use cotangent scaling."""
  for v, c in zip(closed.jaxpr.constvars, closed.consts):
    env.write(v, c, _CONST)
  for i, eqn in enumerate(closed.jaxpr.eqns):
    sub = None if path is None else path + (i,)
    ins = [env.kind(a) for a in eqn.invars]
    name = eqn.primitive.name
    if name in _INLINE and _mixes(ins):
      outs, kinds = _emit_inline(eqn, env, ins, sub)
    elif name in _REMAT and _mixes(ins):
      outs, kinds = _emit_remat(eqn, env, ins)
    elif name == "scan" and _mixes(ins):
      outs, kinds = _emit_scan(eqn, env, ins)
    elif name == "cond" and _mixes(ins):
      outs, kinds = _emit_cond(eqn, env, ins)
    else:
      kinds = _eqn_kinds(eqn, ins, None, sub)
      if _mixes(ins) and name not in _PER_OPERAND:
        outs = _emit_mixing(eqn, env, ins, kinds, sub)
      else:
        outs = _bind(eqn, [env.read(a) for a in eqn.invars])
    for v, o, k in zip(eqn.outvars, outs, kinds):
      env.write(v, o, k)
      if not isinstance(v, jcore.DropVar):
        env.producer[v] = eqn
  return list(closed.jaxpr.outvars)


def _scaled_operand(eqn, ins) -> int | None:
  """The example-dependent operand of a matmul/convolution when it is not larger than the output.

  The op is linear in it, so `op(w·a, p)` carries the weight into p's cotangent as `w·ct` would,
  at the cost of scaling the smaller tensor (in the forward pass, where it fuses)."""
  if eqn.primitive.name not in ("dot_general", "conv_general_dilated") or len(ins) != 2:
    return None
  ex = [j for j, k in enumerate(ins) if k.ex]
  if len(ex) != 1 or not _is_param(ins[1 - ex[0]]):
    return None
  aval, out = eqn.invars[ex[0]].aval, eqn.outvars[0].aval
  small = math.prod(aval.shape) <= math.prod(out.shape)
  return ex[0] if small and _inexact(aval) else None


# Linear in each operand, or zero when one operand is: a zero parameter side stays zero through them.
_ZERO_PRESERVING = frozenset({
    "convert_element_type", "reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims",
    "slice", "dynamic_slice", "neg", "copy", "copy_p", "reduce_sum", "rev", "reduce_precision"})
_ZERO_ANNIHILATING = frozenset({"mul", "dot_general", "conv_general_dilated"})


def _keeps_zero(eqn, zero: list[bool]) -> bool:
  """Whether `eqn`'s output is exactly zero given which of its inputs are."""
  name = eqn.primitive.name
  if name in _ZERO_ANNIHILATING:
    return any(zero)
  if name in _ZERO_PRESERVING:
    return bool(zero) and zero[0]
  return False


def _visibility_key(ctx: _Ctx, leaves) -> Any:
  """The one visibility key of `leaves` that may be hidden, or None if all are always seen."""
  keys = {ctx.vis_key[leaf] for leaf in leaves if ctx.vis_key and ctx.vis_key[leaf] is not None}
  if len(keys) > 1:
    raise RoutingError("internal: a use mixes parameters of different visibility")
  return next(iter(keys), None)


def _emit_mixing(eqn, env: _Env, ins, kinds, path):
  """A mixing equation, masked per example where it uses parameters the example may not see."""
  outs = _emit_scaled(eqn, env, ins, kinds, path)
  leaves = frozenset().union(*(k.leaves for k in ins if _is_param(k)))
  key = _visibility_key(env.ctx, leaves)
  if key is None:
    return outs
  seen = env.ctx.seen[key]
  zeroed = [env.zeroed(a) if _is_param(k) else None for a, k in zip(eqn.invars, ins)]
  if eqn.primitive.name in _ZERO_ANNIHILATING and any(z is not None and z[1] for z in zeroed):
    return [o * seen.astype(o.dtype) if _inexact(v.aval) else jnp.where(seen, o, jnp.zeros_like(o))
            for o, v in zip(outs, eqn.outvars)]
  unseen = _bind(eqn, [env.read(a) if z is None else z[0] for a, z in zip(eqn.invars, zeroed)])
  return [jnp.where(seen, o, u) for o, u in zip(outs, unseen)]


def _emit_scaled(eqn, env: _Env, ins, kinds, path):
  """`join(op(a, sg(p)), [op(sg(a), p_l)], [w_l])` for a first-order or custom-rule equation."""
  vals = [env.read(a) for a in eqn.invars]
  y_a = _bind(eqn, [_sg(v) if _is_param(k) else v for v, k in zip(vals, ins)])
  leaves = sorted(frozenset().union(*(k.leaves for k in ins if _is_param(k))))
  scaled_pos = _scaled_operand(eqn, ins)
  side = [_sg(v) if k.ex else v for v, k in zip(vals, ins)]
  y_ps, ws = [], []
  for leaf in leaves:
    args = [env.iso(a, leaf) if _is_param(k) else v for a, v, k in zip(eqn.invars, side, ins)]
    w = env.ctx.weights[leaf]
    if scaled_pos is not None:
      args[scaled_pos] = args[scaled_pos] * w.astype(args[scaled_pos].dtype)
      w = None
    if path is not None and path in env.ctx.site_probes:  # a site has exactly one leaf
      site, probe = env.ctx.site_probes[path]
      env.ctx.site_acts[path] = [v for j, v in enumerate(args) if j != site.param_pos]
      y_ps.append([_bind(eqn, args)[0] + probe.astype(eqn.outvars[0].aval.dtype)])
    else:
      y_ps.append(_bind(eqn, args))
    ws.append(w)
  ws = tuple(ws)
  outs = []
  for j, (v, k) in enumerate(zip(eqn.outvars, kinds)):
    if k.ex and _inexact(v.aval):
      outs.append(_join(y_a[j], tuple(y[j] for y in y_ps), ws))
    else:
      outs.append(y_a[j])
  return outs


def _emit_inline(eqn, env: _Env, ins, path):
  closed = _inner_jaxpr(eqn)
  sub = _Env(env.ctx)
  for v, a, k in zip(closed.jaxpr.invars, eqn.invars, ins):
    sub.write(v, env.read(a), k)
    if k.leaves:
      sub.links[v] = (env, a)
  outvars = _emit(closed, sub, path)
  outs, kinds = [sub.read(a) for a in outvars], [sub.kind(a) for a in outvars]
  for v, a in zip(eqn.outvars, outvars):
    if not isinstance(v, jcore.DropVar) and not isinstance(a, jcore.Literal):
      env.links[v] = (sub, a)
  return outs, kinds


def _run_sub(env: _Env, closed, invars_kinds, vals, seeds, lift_to=None):
  """Evaluate a sub-jaxpr (scan body, branch, remat body) in a fresh environment."""
  sub = _Env(env.ctx)
  for v, val, k, s in zip(closed.jaxpr.invars, vals, invars_kinds, seeds):
    sub.seed(v, val, k, s)
  outvars = _emit(closed, sub, None)
  outs = []
  for j, a in enumerate(outvars):
    kind = sub.kind(a)
    if lift_to is not None and lift_to[j] and _is_param(kind):
      outs.append(sub.lift(a))
    else:
      outs.append(sub.read(a))
  return outs, [sub.kind(a) for a in outvars]


def _pack_seeds(seeds: list[dict]):
  keys = [(j, leaf) for j, s in enumerate(seeds) for leaf in sorted(s)]
  return keys, [seeds[j][leaf] for j, leaf in keys]


def _unpack_seeds(n: int, keys, vals) -> list[dict]:
  seeds = [{} for _ in range(n)]
  for (j, leaf), v in zip(keys, vals):
    seeds[j][leaf] = v
  return seeds


def _emit_remat(eqn, env: _Env, ins):
  closed = _inner_jaxpr(eqn)
  kinds_in = _strip(ins)
  keys, extra = _pack_seeds(_iso_seeds(env, eqn.invars))
  n = len(eqn.invars)
  out_kinds = []

  def body(*args):
    outs, kinds = _run_sub(env, closed, kinds_in, args[:n], _unpack_seeds(n, keys, args[n:]))
    out_kinds[:] = kinds
    return outs

  fn = jax.checkpoint(body, prevent_cse=eqn.params.get("prevent_cse", True),
                      policy=eqn.params.get("policy"))
  outs = fn(*[env.read(a) for a in eqn.invars], *extra)
  return outs, out_kinds


def _emit_scan(eqn, env: _Env, ins):
  p = eqn.params
  nc, nk = p["num_consts"], p["num_carry"]
  carry_kinds = _scan_carry_kinds(eqn, ins)
  const_atoms, init_atoms, xs_atoms = (
      eqn.invars[:nc], eqn.invars[nc:nc + nk], eqn.invars[nc + nk:])
  consts = [env.read(a) for a in const_atoms]
  const_seeds = _iso_seeds(env, const_atoms)
  init = [env.lift(a) if c.ex and _is_param(env.kind(a)) else env.read(a)
          for a, c in zip(init_atoms, carry_kinds)]
  xs_keys, xs_extra = _pack_seeds(_iso_seeds(env, xs_atoms))
  xs = [env.read(a) for a in xs_atoms]
  kinds_in = _strip(ins[:nc]) + carry_kinds + _strip(ins[nc + nk:])
  lift_to = [c.ex for c in carry_kinds] + [False] * (len(eqn.outvars) - nk)
  out_kinds = []

  def body(carry, x):
    x_main, x_extra = x
    seeds = const_seeds + [{} for _ in carry] + _unpack_seeds(len(xs), xs_keys, x_extra)
    outs, kinds = _run_sub(env, p["jaxpr"], kinds_in, [*consts, *carry, *x_main], seeds, lift_to)
    out_kinds[:] = kinds
    return outs[:nk], outs[nk:]

  carry_out, ys = jax.lax.scan(body, init, (xs, xs_extra), length=p["length"],
                               reverse=p["reverse"], unroll=p["unroll"])
  ys_kinds = out_kinds[nk:]
  return [*carry_out, *ys], carry_kinds + ys_kinds


def _emit_cond(eqn, env: _Env, ins):
  branches = eqn.params["branches"]
  ops_atoms = eqn.invars[1:]
  out_kinds = _eqn_kinds(eqn, ins, None, None)
  kinds_in = _strip(ins[1:])
  keys, extra = _pack_seeds(_iso_seeds(env, ops_atoms))
  n = len(ops_atoms)
  lift_to = [k.ex for k in out_kinds]

  def make(branch):
    def fn(*args):
      outs, _ = _run_sub(env, branch, kinds_in, args[:n], _unpack_seeds(n, keys, args[n:]), lift_to)
      return outs
    return fn

  outs = jax.lax.switch(env.read(eqn.invars[0]), [make(b) for b in branches],
                        *[env.read(a) for a in ops_atoms], *extra)
  return list(outs), out_kinds


# ---------------------------------------------------------------------------------------------
# Planning (trace + analysis, cached by shapes) and the public entry points.


class _Plan(NamedTuple):
  closed: Any                   # ClosedJaxpr of loss_fn(param leaves, example leaves)
  out_tree: Any                 # pytree structure of loss_fn's output
  n_params: int
  slice_leaves: frozenset       # leaves weighted per slice (scaled at the leaf)
  diff_leaves: tuple            # indices of inexact parameter leaves
  sites: dict                   # inlining path -> _Site (norms from operands + cotangent)
  materialised: frozenset       # leaves whose per-example gradients are materialised for norms
  vis_key: tuple = ()           # leaf -> visibility key, None when every example sees it


def _struct(x) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))


def _trace(loss_fn, p_leaves, p_def, ex_structs, ex_def):
  def flat(p_flat, ex_flat):
    return loss_fn(jax.tree.unflatten(p_def, p_flat), jax.tree.unflatten(ex_def, ex_flat))
  try:
    closed, shape = jax.make_jaxpr(flat, return_shape=True)(
        [_struct(p) for p in p_leaves], list(ex_structs))
  except NameError as e:
    if "axis name" not in str(e):
      raise
    raise BatchCouplingError(
        f"the loss uses a collective over a named axis ({e}); that mixes examples, so "
        "per-example routing would be wrong: make the loss depend on one example only") from e
  return closed, jax.tree.structure(shape)


def _in_kinds(p_leaves, n_ex: int, slice_leaves) -> list[_Kind]:
  kinds = []
  for i, p in enumerate(p_leaves):
    if not jnp.issubdtype(jnp.result_type(p), jnp.inexact):
      kinds.append(_CONST)
    elif i in slice_leaves:
      kinds.append(_Kind(True, frozenset({i})))
    else:
      kinds.append(_Kind(False, frozenset({i}), i))
  return kinds + [_Kind(True, frozenset())] * n_ex


def _check_visibility(uses: _Uses, vis_key: tuple) -> None:
  """Refuse uses of hidden leaves the emission cannot mask exactly (see the module doc)."""
  if not any(k is not None for k in vis_key):
    return
  for path, leaves in uses.operands:
    keys = {vis_key[leaf] for leaf in leaves}
    if keys == {None}:
      continue
    if len(keys) > 1:
      raise _unsupported("visibility", " for a value computed from parameters of groups with different "
                         "visibility (e.g. a hidden adapter's weight times a shared one)")
    if path is None:
      raise _unsupported("visibility", " inside scan, cond, while or remat, or for a loss that depends "
                         "on hidden parameters alone")


def _make_plan(loss_fn, p_leaves, p_def, ex_structs, ex_def, slice_leaves, has_aux,
               vis_key: tuple = ()) -> _Plan:
  closed, out_tree = _trace(loss_fn, p_leaves, p_def, ex_structs, ex_def)
  loss_aval = closed.jaxpr.outvars[0].aval
  shaped = jax.tree.unflatten(out_tree, range(out_tree.num_leaves))
  well_formed = (isinstance(shaped, tuple) and len(shaped) == 2 and shaped[0] == 0) if has_aux \
      else out_tree.num_leaves == 1
  if not well_formed or getattr(loss_aval, "shape", None) != () or not _inexact(loss_aval):
    expected = "(scalar loss, aux pytree)" if has_aux else "one float scalar"
    raise RoutingError(
        f"loss_fn must return {expected} per example; got structure {out_tree} with first leaf "
        f"{loss_aval}: reduce the loss over the example's own axes (tokens, pixels) inside loss_fn")
  uses = _Uses()
  outs = _analyze(closed, _in_kinds(p_leaves, len(ex_structs), slice_leaves), uses, ())
  if _is_param(outs[0]):
    uses.add(None, outs[0].leaves)
  _check_visibility(uses, vis_key or (None,) * len(p_leaves))
  sites, materialised = {}, set(slice_leaves)
  for leaf, recorded in uses.by_leaf.items():
    path, site = recorded[0]
    if len(recorded) == 1 and site is not None and (
        site.dot is None or ghost_norms.ghost_is_cheaper(site.dot)):
      sites[path] = site
    else:  # several uses, or a matmul whose per-example product is cheapest inside the backward
      materialised.add(leaf)
  diff = tuple(i for i, p in enumerate(p_leaves)
               if jnp.issubdtype(jnp.result_type(p), jnp.inexact))
  return _Plan(closed, out_tree, len(p_leaves), frozenset(slice_leaves), diff, sites,
               frozenset(materialised), tuple(vis_key) or (None,) * len(p_leaves))


def check_supported(loss_fn: Callable, params: PyTree, example: PyTree, *,
                    visibility: PyTree | None = None) -> None:
  """Raise `UnsupportedPrimitiveError` / `BatchCouplingError` if the cotangent strategy cannot
  transform `loss_fn(params, example)` (one example, no batch axis); return None if it can.

  `visibility` is as for `cotangent_value_and_grad` (leaves None or per-example bool arrays)."""
  p_leaves, p_def = jax.tree.flatten(params)
  ex_leaves, ex_def = jax.tree.flatten(example)
  closed, _ = _trace(loss_fn, p_leaves, p_def, [_struct(x) for x in ex_leaves], ex_def)
  uses = _Uses()
  outs = _analyze(closed, _in_kinds(p_leaves, len(ex_leaves), frozenset()), uses, ())
  if _is_param(outs[0]):
    uses.add(None, outs[0].leaves)
  _check_visibility(uses, _visibility_keys(p_def, visibility)[0])


def norm_methods(loss_fn: Callable, params: PyTree, example: PyTree, *,
                 has_aux: bool = False) -> PyTree:
  """How `with_norms` gets each leaf's per-example contribution norm (params-shaped strings).

  "ghost": Gram-matrix form of a matmul (no per-example gradient); "patches": input patches of
  a convolution kernel; "vjp": that one equation's VJP per example; "materialised": per-example
  gradients formed in the backward pass (several uses, e.g. tied weights, or a matmul whose
  per-example product is cheaper than its Gram form); "none": the loss does not depend on it."""
  p_leaves, p_def = jax.tree.flatten(params)
  ex_leaves, ex_def = jax.tree.flatten(example)
  plan = _make_plan(loss_fn, p_leaves, p_def, tuple(_struct(x) for x in ex_leaves), ex_def,
                    frozenset(), has_aux)
  methods = ["none"] * len(p_leaves)
  for i in plan.materialised:
    methods[i] = "materialised"
  for site in plan.sites.values():
    methods[site.leaf] = "ghost" if site.dot else "patches" if site.conv else "vjp"
  return jax.tree.unflatten(p_def, methods)


def _per_example_weights(w, leaf, batch: int) -> tuple[jax.Array, bool]:
  """(weights, is_slice): [B] for a whole-leaf weight, [B, *broadcastable] for a slice weight."""
  w = jnp.asarray(w, jnp.float32)
  shape = jnp.shape(leaf)
  if w.ndim == 0 or w.shape[0] != batch:
    raise RoutingError(
        f"leaf weights must have a leading batch axis of size {batch}; got shape {w.shape}")
  rest = w.shape[1:]
  try:
    jnp.broadcast_shapes(rest, shape)
  except ValueError as e:
    raise RoutingError(
        f"leaf weights of shape {w.shape} do not broadcast to the leaf's shape {shape}") from e
  if math.prod(rest) == 1:
    return w.reshape(batch), False
  return w.reshape((batch,) + (1,) * (len(shape) - len(rest)) + rest), True


def _visibility_keys(p_def, visibility: PyTree | None) -> tuple[tuple, list]:
  """(leaf -> key or None, key -> per-example bool array): leaves sharing one array share a key."""
  n = p_def.num_leaves
  if visibility is None:
    return (None,) * n, []
  flat = p_def.flatten_up_to(visibility)
  keys, arrays, index = [], [], {}
  for v in flat:
    if v is None:
      keys.append(None)
      continue
    if id(v) not in index:
      index[id(v)] = len(arrays)
      arrays.append(v)
    keys.append(index[id(v)])
  return tuple(keys), arrays


def cotangent_value_and_grad(loss_fn: Callable, *, has_aux: bool = False,
                             with_norms: bool = False) -> Callable:
  """`fn(params, batch, leaf_weights, visibility=None)` -> `(loss_mean, grads)` with
  `grads_l = (1/B) Σ_i w_i[l] ∇_l loss_fn(params ⊙ seen_i, example_i)`.

  `visibility` (optional) is params-shaped: a leaf is None (every example sees it) or a bool [B]
  array, False where the leaf acts as zero in that example's forward pass; leaves given the same
  array object share a visibility (one group), which lets a use combine them.

  `leaf_weights` is params-shaped; each leaf is [B] or [B, *shape broadcastable to the leaf].
  With `has_aux`, `loss_fn` returns `(loss, aux)` and the result is `((loss_mean, aux[B,...]),
  grads)`. With `with_norms` a trailing params-shaped pytree of [B] squared per-example
  contribution norms `||w_i[l] ⊙ ∇_l L_i||²` is added. Jit-able; traced jaxprs are cached by
  shapes. Raises `UnsupportedPrimitiveError` / `BatchCouplingError` as `check_supported`.
  """
  cache: dict = {}

  def fn(params, batch, leaf_weights, visibility=None):
    p_leaves, p_def = jax.tree.flatten(params)
    b_leaves, b_def = jax.tree.flatten(batch)
    if not b_leaves:
      raise RoutingError("the batch has no array leaves; pass examples with a leading batch axis")
    size = jnp.shape(b_leaves[0])[0]
    if any(jnp.shape(b)[0] != size for b in b_leaves):
      raise RoutingError("every batch leaf needs the same leading batch axis")
    w_flat = p_def.flatten_up_to(leaf_weights)
    weights, slices = zip(*(_per_example_weights(w, p, size) for w, p in zip(w_flat, p_leaves))) \
        if p_leaves else ((), ())
    slice_leaves = frozenset(i for i, s in enumerate(slices) if s)
    ex_structs = tuple(jax.ShapeDtypeStruct(jnp.shape(b)[1:], jnp.result_type(b))
                       for b in b_leaves)
    vis_key, seen = _visibility_keys(p_def, visibility)
    key = (p_def, tuple(_struct(p) for p in p_leaves), b_def, ex_structs, slice_leaves, has_aux, vis_key)
    plan = cache.get(key)
    if plan is None:
      plan = _make_plan(loss_fn, p_leaves, p_def, ex_structs, b_def, slice_leaves, has_aux, vis_key)
      if not any(isinstance(c, jax.core.Tracer) for c in plan.closed.consts):
        cache[key] = plan
    seen = [jnp.broadcast_to(jnp.asarray(s, bool), (size,)) for s in seen]
    return _run(plan, p_leaves, p_def, b_leaves, weights, size, has_aux, with_norms, seen)

  return fn


def _site_sq_norms(site: _Site, leaf, acts: list, cots) -> jax.Array:
  """[B] squared norms of per-example gradients at a site, from its operands and cotangents."""
  if site.dot is not None:
    return ghost_norms.batched_dot_sq_norms(site.dot, acts[0], cots)
  if site.conv:
    return jax.vmap(lambda lhs, cot: ghost_norms.conv_sq_norm(
        site.eqn.params, jnp.shape(leaf), lhs, cot))(acts[0], cots)

  def one(others, cot):
    def op(p):
      operands = list(others)
      operands.insert(site.param_pos, p)
      return _bind(site.eqn, operands)[0]
    _, vjp = jax.vjp(op, leaf)
    (g,) = vjp(cot.astype(site.eqn.outvars[0].aval.dtype))
    return jnp.sum(jnp.square(g.astype(jnp.float32)))

  return jax.vmap(one)(acts, cots)


def _zero_grad(p):
  """The gradient of a leaf that is not differentiable (integer counters, PRNG keys)."""
  if jax.dtypes.issubdtype(jnp.result_type(p), jax.dtypes.extended):
    return jnp.zeros(jnp.shape(p), jax.dtypes.float0)
  return jnp.zeros_like(p)


def _run(plan: _Plan, p_leaves, p_def, b_leaves, weights, size, has_aux, with_norms, seen=()):
  materialised = plan.materialised if with_norms else frozenset()
  sites = plan.sites if with_norms else {}
  diff = plan.diff_leaves
  probes = {i: jnp.zeros((size,) + jnp.shape(p_leaves[i]), jnp.result_type(p_leaves[i]))
            for i in sorted(materialised)}
  gprobes = {path: jnp.zeros((size,) + site.out_shape, jnp.float32) for path, site in sites.items()}
  n_p = plan.n_params

  def per_example(diff_vals, probes_i, gprobes_i, ex_vals, w_i, seen_i):
    leaves = list(p_leaves)
    for i, v in zip(diff, diff_vals):
      leaves[i] = v
    branch = {i: leaves[i] + probes_i[i] if i in probes_i else leaves[i] for i in diff}
    values = list(leaves)
    for i in plan.slice_leaves:
      b = branch[i]
      values[i] = _sg(leaves[i]) + w_i[i].astype(b.dtype) * (b - _sg(b))
      if plan.vis_key[i] is not None:  # a slice-weighted leaf is batched already: mask it directly
        values[i] = jnp.where(seen_i[plan.vis_key[i]], values[i], jnp.zeros_like(values[i]))
    ctx = _Ctx(weights=w_i, leaf_branch=branch, materialised=materialised,
               site_probes={k: (sites[k], v) for k, v in gprobes_i.items()}, site_acts={},
               vis_key=plan.vis_key, seen=dict(enumerate(seen_i)))
    env = _Env(ctx)
    for v, val, k in zip(plan.closed.jaxpr.invars, values + list(ex_vals),
                         _in_kinds(p_leaves, len(ex_vals), plan.slice_leaves)):
      env.write(v, val, k)
    outvars = _emit(plan.closed, env, ())
    loss_atom = outvars[0]
    loss = env.lift(loss_atom) if _is_param(env.kind(loss_atom)) else env.read(loss_atom)
    aux = [_sg(env.read(a)) for a in outvars[1:]]
    return loss, (aux, dict(ctx.site_acts))

  def total(diff_vals, probes, gprobes):
    w_dict = {i: weights[i] for i in range(n_p)}
    losses, (aux, acts) = jax.vmap(per_example, in_axes=(None, 0, 0, 0, 0, 0))(
        diff_vals, probes, gprobes, list(b_leaves), w_dict, list(seen))
    return jnp.mean(losses), (aux, acts)

  diff_vals = [p_leaves[i] for i in diff]
  (loss, (aux, acts)), (g_diff, g_probes, g_sites) = jax.value_and_grad(
      total, argnums=(0, 1, 2), has_aux=True)(diff_vals, probes, gprobes)
  grads = [_zero_grad(p) for p in p_leaves]
  for i, g in zip(diff, g_diff):
    grads[i] = unsigned_zeros(g)
  grads = jax.tree.unflatten(p_def, grads)
  head = loss
  if has_aux:
    out = jax.tree.unflatten(plan.out_tree, [loss] + list(aux))
    head = (loss, out[1])
  if not with_norms:
    return head, grads
  sq = [jnp.zeros((size,), jnp.float32) for _ in p_leaves]
  for i, g in g_probes.items():
    sq[i] = ghost_norms.materialised_sq_norms(g * size)
  for path, site in sites.items():
    sq[site.leaf] = _site_sq_norms(site, p_leaves[site.leaf], acts[path], g_sites[path] * size)
  return head, grads, jax.tree.unflatten(p_def, sq)
