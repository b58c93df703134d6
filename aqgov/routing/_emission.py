"""Emission: the per-example loss re-evaluated with per-use cotangent scaling.

Each equation where a parameter-only value `p` meets an example-dependent value `a` is re-emitted
as

    join(op(a, sg(p)), [op(sg(a), p_l) for each leaf l of p], [w_i[l]])

where `sg` is stop_gradient, `p_l` is `p` with its gradient flowing to leaf `l` only, and `join` is
the identity forward whose backward passes the cotangent unchanged to the first argument and
multiplied by `w_i[l]` to the others. For a matmul or convolution, which is linear in `a`, the
weight scales `a` instead of the output cotangent when `a` is not larger (`op(sg(a)·w_i, p)`): the
multiply fuses into the forward pass. A parameter-only value entering an example-dependent
position (a scan carry, a branch output, the loss itself) is lifted: `sg(p) + Σ_l w_i[l]·(p_l -
sg(p_l))`. Nested `jit`s are inlined; remat, `scan` and `cond` are re-emitted as themselves, their
bodies evaluated the same way.

Forward visibility. A leaf may be *hidden* from some examples (its group is `visible = "routed"`
and the example's weight in it is 0): for them it acts as zero in the forward pass. At each use of
such a leaf the output is `where(seen_i, op(a, p), op(a, p0))`, with `p0` the parameter side
recomputed with the hidden leaves zeroed (parameter-only, so computed once, not per example). For
a matmul, convolution or product of a leaf or of a linear view of it (reshape, transpose, cast,
...), `op(a, 0) = 0`, so the output is just multiplied by `seen_i`. The plan refuses uses it cannot
mask this way (`_analysis.check_visibility`).

`emit` evaluates a jaxpr this way on the tracers of one example (under the caller's `vmap` and
`grad`), given an `Env` holding its inputs and a `Ctx` with the example's weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from aqgov.routing import _jax_compat as jc
from aqgov.routing import _site_stats as site_stats
from aqgov.routing import _slices as slices
from aqgov.routing._analysis import (
  CONST,
  Kind,
  eqn_kinds,
  inexact,
  is_param,
  mixes,
  scan_carry_kinds,
  strip,
)
from aqgov.routing._env import Ctx, Env, iso_seeds, visibility_key, weigh

_sg = jax.lax.stop_gradient


# ---------------------------------------------------------------------------------------------
# The scaling construct.


@jax.custom_vjp
def _join(y_a, y_ps, ws):
  """Identity in `y_a`; backward gives `y_a` the cotangent and each `y_ps[k]` cotangent * ws[k]
  (the cotangent unchanged where ws[k] is None: the weight already rides on an operand)."""
  return y_a


def _join_fwd(y_a, y_ps, ws):
  return y_a, ws


def _join_bwd(ws, ct):
  # a multiply: a select here costs a cotangent-sized buffer (measured +14% on a CNN). Where the
  # weight rides on the operand instead (`weigh` in `_emit_scaled`) an excluded example is selected out.
  scaled = tuple(ct if w is None else (ct * w.astype(ct.dtype)).astype(ct.dtype) for w in ws)
  return ct, scaled, tuple(None if w is None else jnp.zeros_like(w) for w in ws)


_join.defvjp(_join_fwd, _join_bwd)


def emit(closed, env: Env, path: tuple | None) -> list:
  """Evaluate `closed` (inputs already written into `env`) with per-use cotangent scaling."""
  for v, c in zip(closed.jaxpr.constvars, closed.consts):
    env.write(v, c, CONST)
  for i, eqn in enumerate(closed.jaxpr.eqns):
    sub = None if path is None else path + (i,)
    ins = [env.kind(a) for a in eqn.invars]
    name = jc.name(eqn)
    if name in jc.INLINE and mixes(ins):
      outs, kinds = _emit_inline(eqn, env, ins, sub)
    elif name in jc.REMAT and mixes(ins):
      outs, kinds = _emit_remat(eqn, env, ins)
    elif name == jc.SCAN and mixes(ins):
      outs, kinds = _emit_scan(eqn, env, ins, sub)
    elif name == jc.COND and mixes(ins):
      outs, kinds = _emit_cond(eqn, env, ins)
    else:
      kinds = eqn_kinds(eqn, ins, None, sub)
      if mixes(ins) and name not in jc.PER_OPERAND:
        outs = _emit_mixing(eqn, env, ins, kinds, sub)
      else:
        outs = jc.bind(eqn, [env.read(a) for a in eqn.invars])
    for v, o, k in zip(eqn.outvars, outs, kinds):
      env.write(v, o, k)
      if not jc.is_dropped(v):
        env.producer[v] = eqn
  return list(closed.jaxpr.outvars)


def _scaled_operand(eqn, ins) -> int | None:
  """The example-dependent operand of a matmul/convolution when it is not larger than the output.

  The op is linear in it, so `op(w·a, p)` carries the weight into p's cotangent as `w·ct` would,
  at the cost of scaling the smaller tensor (in the forward pass, where it fuses)."""
  if jc.name(eqn) not in (jc.DOT_GENERAL, jc.CONV) or len(ins) != 2:
    return None
  ex = [j for j, k in enumerate(ins) if k.ex]
  if len(ex) != 1 or not is_param(ins[1 - ex[0]]):
    return None
  aval, out = eqn.invars[ex[0]].aval, eqn.outvars[0].aval
  small = math.prod(aval.shape) <= math.prod(out.shape)
  return ex[0] if small and inexact(aval) else None


def _emit_mixing(eqn, env: Env, ins, kinds, path):
  """A mixing equation, masked per example where it uses parameters the example may not see."""
  outs = _emit_scaled(eqn, env, ins, kinds, path)
  key = visibility_key(env.ctx, frozenset().union(*(k.leaves for k in ins if is_param(k))))
  if key is None:
    return outs
  seen = env.ctx.seen[key]
  zeroed = [env.zeroed(a) if is_param(k) else None for a, k in zip(eqn.invars, ins)]
  if jc.name(eqn) in jc.ZERO_ANNIHILATING and any(z is not None and z[1] for z in zeroed):
    return [jnp.where(seen, o, jnp.zeros_like(o)) for o in outs]
  unseen = jc.bind(eqn, [env.read(a) if z is None else z[0] for a, z in zip(eqn.invars, zeroed)])
  return [jnp.where(seen, o, u) for o, u in zip(outs, unseen)]


def _emit_scaled(eqn, env: Env, ins, kinds, path):
  """`join(op(a, sg(p)), [op(sg(a), p_l)], [w_l])` for a first-order or custom-rule equation."""
  vals = [env.read(a) for a in eqn.invars]
  y_a = jc.bind(eqn, [_sg(v) if is_param(k) else v for v, k in zip(vals, ins)])
  leaves = sorted(frozenset().union(*(k.leaves for k in ins if is_param(k))))
  scaled_pos = _scaled_operand(eqn, ins)
  if scaled_pos is not None and eqn.invars[scaled_pos] in env.stopped:
    # a scan's input read as it is needs no residual of its own; scaled it would be one more
    # stacked residual: scale the cotangent instead
    scaled_pos = None
  side = [env.stop(a) if k.ex else v for a, v, k in zip(eqn.invars, vals, ins)]
  y_ps, ws = [], []
  for leaf in leaves:
    args = [env.iso(a, leaf) if is_param(k) else v for a, v, k in zip(eqn.invars, side, ins)]
    w = env.ctx.weights[leaf]
    if leaf in env.ctx.slice_axes:
      args, w = slices.scale(eqn, ins, leaf, env.ctx.slice_axes[leaf], args, w, weigh)
    elif scaled_pos is not None:
      args[scaled_pos] = weigh(args[scaled_pos], w)
      w = None
    if path is not None and path in env.ctx.site_probes:  # a site has exactly one leaf
      site, stat, probe = env.ctx.site_probes[path]
      y = jc.bind(eqn, args)[0]
      y = site_stats.tap(stat, y, site_stats.operands(site, stat, args), probe)
      if path in env.ctx.sketch_probes:
        _, sketch, probe = env.ctx.sketch_probes[path]
        y = site_stats.tap(sketch, y, [_sg(a) for a in args], probe)
      y_ps.append([y])
    else:
      y_ps.append(jc.bind(eqn, args))
    ws.append(w)
  ws = tuple(ws)
  outs = []
  for j, (v, k) in enumerate(zip(eqn.outvars, kinds)):
    if k.ex and inexact(v.aval):
      outs.append(_join(y_a[j], tuple(y[j] for y in y_ps), ws))
    else:
      outs.append(y_a[j])
  return outs


def _emit_inline(eqn, env: Env, ins, path):
  closed = jc.inner_jaxpr(eqn)
  sub = Env(env.ctx)
  for v, a, k in zip(closed.jaxpr.invars, eqn.invars, ins):
    sub.write(v, env.read(a), k)
    if k.leaves:
      sub.links[v] = (env, a)
    if not jc.is_literal(a) and a in env.stopped:
      sub.stopped[v] = env.stopped[a]
  outvars = emit(closed, sub, path)
  outs, kinds = [sub.read(a) for a in outvars], [sub.kind(a) for a in outvars]
  for v, a in zip(eqn.outvars, outvars):
    if not jc.is_dropped(v) and not jc.is_literal(a):
      env.links[v] = (sub, a)
  return outs, kinds


def _run_sub(
  env: Env, closed, invars_kinds, vals, seeds, lift_to=None, ctx=None, path=None, stopped=None
):
  """Evaluate a sub-jaxpr (scan body, branch, remat body) in a fresh environment; `stopped`
  (input index -> value): a scan body's example-dependent inputs with their gradient stopped."""
  sub = Env(env.ctx if ctx is None else ctx)
  for v, val, k, s in zip(closed.jaxpr.invars, vals, invars_kinds, seeds):
    sub.seed(v, val, k, s)
  for j, val in (stopped or {}).items():
    sub.stopped[closed.jaxpr.invars[j]] = val
  outvars = emit(closed, sub, path)
  outs = []
  for j, a in enumerate(outvars):
    kind = sub.kind(a)
    if lift_to is not None and lift_to[j] and is_param(kind):
      outs.append(sub.lift(a))
    else:
      outs.append(sub.read(a))
  return outs, [sub.kind(a) for a in outvars]


class _KindRecorder:
  """A traceable sub-jaxpr evaluation that keeps the kinds of its outputs from the last trace
  (`jax.checkpoint` and `lax.scan` trace it; the kinds are read after)."""

  def __init__(self, fn: Callable):
    self.fn = fn
    self.kinds: list[Kind] = []

  def __call__(self, *args):
    outs, self.kinds = self.fn(*args)
    return outs


def _pack_seeds(seeds: list[dict]):
  keys = [(j, leaf) for j, s in enumerate(seeds) for leaf in sorted(s)]
  return keys, [seeds[j][leaf] for j, leaf in keys]


def _unpack_seeds(n: int, keys, vals) -> list[dict]:
  seeds = [{} for _ in range(n)]
  for (j, leaf), v in zip(keys, vals):
    seeds[j][leaf] = v
  return seeds


def _emit_remat(eqn, env: Env, ins):
  closed = jc.inner_jaxpr(eqn)
  kinds_in = strip(ins)
  keys, extra = _pack_seeds(iso_seeds(env, eqn.invars))
  n = len(eqn.invars)
  body = _KindRecorder(
    lambda *args: _run_sub(env, closed, kinds_in, args[:n], _unpack_seeds(n, keys, args[n:]))
  )
  outs = jax.checkpoint(body, **jc.remat_options(eqn))(*[env.read(a) for a in eqn.invars], *extra)
  return outs, body.kinds


def _body_probes(ctx: Ctx, path: tuple | None) -> tuple[dict, list]:
  """The site probes of a scan body at `path`: (path -> entry for probes fixed across the
  iterations, [(path, entry)] for probes scanned over, one slice per iteration)."""
  if path is None:
    return {}, []
  inner = {
    k: v for k, v in ctx.site_probes.items() if len(k) > len(path) and k[: len(path)] == path
  }
  fixed = {k: v for k, v in inner.items() if not v[1].per_iteration}
  return fixed, [(k, v) for k, v in sorted(inner.items()) if v[1].per_iteration]


def _emit_scan(eqn, env: Env, ins, path):
  p = jc.scan_params(eqn)
  nc, nk = p.num_consts, p.num_carry
  carry_kinds = scan_carry_kinds(eqn, ins)
  const_atoms, init_atoms, xs_atoms = (
    eqn.invars[:nc],
    eqn.invars[nc : nc + nk],
    eqn.invars[nc + nk :],
  )
  consts = [env.read(a) for a in const_atoms]
  const_seeds = iso_seeds(env, const_atoms)
  init = [
    env.lift(a) if c.ex and is_param(env.kind(a)) else env.read(a)
    for a, c in zip(init_atoms, carry_kinds)
  ]
  xs_keys, xs_extra = _pack_seeds(iso_seeds(env, xs_atoms))
  xs = [env.read(a) for a in xs_atoms]
  xs_stopped = {j: _sg(x) for j, (x, k) in enumerate(zip(xs, ins[nc + nk :])) if k.ex}
  consts_stopped = {j: _sg(c) for j, (c, k) in enumerate(zip(consts, ins[:nc])) if k.ex}
  kinds_in = strip(ins[:nc]) + carry_kinds + strip(ins[nc + nk :])
  lift_to = [c.ex for c in carry_kinds] + [False] * (len(eqn.outvars) - nk)
  fixed, scanned = _body_probes(env.ctx, path)
  body_path = path if fixed or scanned else None

  def step(carry, x):
    x_main, x_extra, x_probes, x_stopped = x
    seeds = const_seeds + [{} for _ in carry] + _unpack_seeds(len(xs), xs_keys, x_extra)
    probes = {k: (site, stat, xp) for (k, (site, stat, _)), xp in zip(scanned, x_probes)}
    ctx = env.ctx._replace(site_probes={**fixed, **probes}) if body_path else None
    vals = [*consts, *carry, *x_main]
    stopped = {**consts_stopped, **{nc + nk + j: v for j, v in x_stopped.items()}}
    outs, kinds = _run_sub(env, p.jaxpr, kinds_in, vals, seeds, lift_to, ctx, body_path, stopped)
    return (outs[:nk], outs[nk:]), kinds

  body = _KindRecorder(step)
  x_probes = [v[2] for _, v in scanned]
  carry_out, ys = jax.lax.scan(
    body,
    init,
    (xs, xs_extra, x_probes, xs_stopped),
    length=p.length,
    reverse=p.reverse,
    unroll=p.unroll,
  )
  ys_kinds = body.kinds[nk:]
  return [*carry_out, *ys], carry_kinds + ys_kinds


def _emit_cond(eqn, env: Env, ins):
  branches = jc.cond_branches(eqn)
  ops_atoms = eqn.invars[1:]
  out_kinds = eqn_kinds(eqn, ins, None, None)
  kinds_in = strip(ins[1:])
  keys, extra = _pack_seeds(iso_seeds(env, ops_atoms))
  n = len(ops_atoms)
  lift_to = [k.ex for k in out_kinds]

  def make(branch):
    def fn(*args):
      outs, _ = _run_sub(env, branch, kinds_in, args[:n], _unpack_seeds(n, keys, args[n:]), lift_to)
      return outs

    return fn

  outs = jax.lax.switch(
    env.read(eqn.invars[0]), [make(b) for b in branches], *[env.read(a) for a in ops_atoms], *extra
  )
  return list(outs), out_kinds
