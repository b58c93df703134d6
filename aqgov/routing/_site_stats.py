"""Per-site per-example gradient statistics, computed in the backward pass from a use's operands
and its output cotangent.

A *site* is an equation where one parameter leaf, used nowhere else, meets example-dependent
operands (`_analysis.Site`). Its per-example gradient is a function of the other operands and the
(weighted) output cotangent, so any statistic of it can be had without forming it: `tap` is the
identity on the use's output whose backward rule computes `statistic(operands, cotangent)` and
returns it as the cotangent of a zero *probe*. Under `vmap` the probe is per example, so the
gradient of the summed loss with respect to the probes is the per-example statistics, made where
the cotangent is (no cotangent or activation is kept for later). Inside a `lax.scan` the probe is
scanned over (one statistic per iteration) or a constant of the scan (the statistics of the
iterations add up, which is right for anything linear in the gradient, such as a sketch).

`SiteStat` says what a site computes: its shape per example and iteration, the statistic, and
`finish`, which turns the probes' gradients [B, ...] into [B] squared contribution norms. The
statistics here are exact squared norms (`exact`) and random projections (`sketch`); another
statistic of the per-example gradient at the same sites only needs another `SiteStat`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from aqgov.errors import RoutingError
from aqgov.routing import _ghost_norms as ghost_norms
from aqgov.routing import _jax_compat as jc
from aqgov.routing import _sketch as sketches
from aqgov.routing import _sketch_norms as sketch_norms
from aqgov.routing._analysis import Site

Array = jax.Array
NORM_KINDS = ("exact", "sketch")


class NormSpec(NamedTuple):
  """Which per-example contribution norms to compute."""

  kind: str = "exact"  # "exact" or "sketch"
  sketch_dim: int = 64  # projections per site (sketch only)
  seed: int = 0  # seed of the projections (sketch only)
  # "cheaper": sketch a matmul or convolution where that costs less than its exact form (the
  # exact norm is the better estimate at a lower cost elsewhere); "all": sketch every one
  where: str = "cheaper"


EXACT = NormSpec()


def norm_spec(with_norms: bool | str | NormSpec, sketch_dim: int, seed: int) -> NormSpec | None:
  """The `NormSpec` a `with_norms` argument asks for (None: no norms); refuses anything else."""
  if with_norms is False or with_norms is None:
    return None
  if isinstance(with_norms, NormSpec):
    if with_norms.where not in ("cheaper", "all"):
      raise RoutingError(f"NormSpec.where must be 'cheaper' or 'all'; got {with_norms.where!r}")
    return norm_spec(with_norms.kind, with_norms.sketch_dim, with_norms.seed)._replace(
      where=with_norms.where
    )
  kind = "exact" if with_norms is True else with_norms
  if kind not in NORM_KINDS:
    raise RoutingError(f"with_norms must be True, False, 'exact' or 'sketch'; got {with_norms!r}")
  if isinstance(sketch_dim, bool) or not isinstance(sketch_dim, int) or sketch_dim < 1:
    raise RoutingError(f"sketch_dim must be a positive int, got {sketch_dim!r}")
  if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
    raise RoutingError(f"sketch_seed must be a non-negative int, got {seed!r}")
  return NormSpec(kind, sketch_dim, seed)


class SiteStat(NamedTuple):
  method: str  # as `norm_methods` reports it
  shape: tuple  # one example's statistic at one use (one iteration inside a scan)
  per_iteration: bool  # inside a scan: the probe is scanned over (else a constant of the scan)
  stat: Callable  # (operands, cotangent) -> float32 statistic of `shape`, for one example
  finish: Callable  # float32 [B, *probe shape] -> [B] squared contribution norms


def _sum_sq(x: Array) -> Array:
  return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def _vjp_sq_norm(site: Site, operands: list, cot: Array) -> Array:
  """The squared norm of one example's gradient at `site` by the equation's own VJP (for a
  convolution kernel under `vmap`: the per-example kernel gradients as one grouped convolution)."""

  def op(p):
    args = list(operands)
    args[site.param_pos] = p
    return jc.bind(site.eqn, args)[0]

  _, vjp = jax.vjp(op, operands[site.param_pos])
  (g,) = vjp(cot.astype(site.eqn.outvars[0].aval.dtype))
  return jnp.sum(jnp.square(g.astype(jnp.float32)))


def site_stat(site: Site, spec: NormSpec, index: int) -> SiteStat | None:
  """What `site` computes for `spec`, or None when its leaf's per-example gradient must be
  materialised instead (a leaf shared by a scan's iterations whose exact norm is not a sum of
  per-iteration terms and has no cheaper form here). `index` decorrelates sketch projections."""
  stacked, shared = site.role == "stacked", site.role == "shared"
  kernel = tuple(site.eqn.invars[site.param_pos].aval.shape)
  sketchable = site.dot is not None or site.conv
  if (
    spec.kind == "sketch"
    and sketchable
    and (spec.where == "all" or _sketch_is_cheaper(site, kernel, spec.sketch_dim))
  ):
    seed = int(np.random.SeedSequence([spec.seed, index]).generate_state(1)[0] >> 1)
    if site.dot is not None:
      stat = lambda ops, ct: sketch_norms.dot_sketch(site.dot, spec.sketch_dim, seed, ops[0], ct)
    else:
      stat = lambda ops, ct: sketch_norms.conv_sketch(
        site.eqn.params, kernel, spec.sketch_dim, seed, ops[0], ct
      )
    return SiteStat("sketch", (spec.sketch_dim,), stacked, stat, sketch_norms.sketch_sq_norms)
  if site.dot is not None and not shared:
    return SiteStat(
      "ghost" if ghost_norms.ghost_is_cheaper(site.dot) else "direct",
      (),
      stacked,
      lambda ops, ct: ghost_norms.dot_sq_norm(site.dot, ops[0], ct),
      _sum_sq,
    )
  if site.dot is not None and ghost_norms.shared_ghost_is_cheaper(site.dot, site.length):
    rows = ghost_norms.dot_rows  # each iteration's rows; the Gram form over all of them
    shape = jax.eval_shape(lambda a, g: rows(site.dot, a, g), *_avals(site)).shape
    finish = jax.vmap(functools.partial(ghost_norms.shared_rows_sq_norm, site.dot))
    return SiteStat("ghost", shape, True, lambda ops, ct: rows(site.dot, ops[0], ct), finish)
  if shared:
    return None
  if site.conv and ghost_norms.conv_gram_is_cheaper(site.eqn.params, kernel, site.out_shape):
    stat = lambda ops, ct: ghost_norms.conv_sq_norm(site.eqn.params, kernel, ops[0], ct)
    return SiteStat("patches", (), stacked, stat, _sum_sq)
  return SiteStat("vjp", (), stacked, functools.partial(_vjp_sq_norm, site), _sum_sq)


def _sketch_is_cheaper(site: Site, kernel: tuple, k: int) -> bool:
  """Whether `k` projections cost less than the exact norm's cheapest form. A leaf shared by a
  scan's iterations is always sketched: its projections add up over the iterations, where the
  exact norm keeps every iteration's rows or the whole per-example gradient."""
  if site.role == "shared":
    return True
  if site.dot is not None:
    _, nf, nc, nw = ghost_norms.sizes(site.dot)
  else:
    dn = jc.conv_params(site.eqn.params).dimension_numbers
    nw = kernel[dn.rhs_spec[0]]
    nc, nf = math.prod(kernel) // nw, math.prod(site.out_shape) // nw
  # exact: min(F²(C + W), F·C·W); sketch: F·k·(C + W)
  return k < nf and k * (nc + nw) < nc * nw


def _avals(site: Site) -> tuple:
  act = site.eqn.invars[1 - site.param_pos].aval
  out = site.eqn.outvars[0].aval
  return jax.ShapeDtypeStruct(act.shape, act.dtype), jax.ShapeDtypeStruct(out.shape, out.dtype)


def probe_shape(site: Site, stat: SiteStat) -> tuple:
  """One example's probe: the statistic, per iteration when the site is scanned over."""
  return ((site.length,) if site.role and stat.per_iteration else ()) + stat.shape


def operands(site: Site, stat: SiteStat, args: list) -> list:
  """What `stat` reads of a use's operands: the activation of a matmul or convolution (unless
  its VJP is used), else every operand, the parameter with its gradient stopped."""
  if stat.method != "vjp" or site.dot is not None:
    return [args[1 - site.param_pos]]
  return [jax.lax.stop_gradient(a) for a in args]


def _zero_cotangent(x):
  if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(jnp.shape(x), jax.dtypes.float0)


def tap(stat: SiteStat, y: Array, ops: list, probe: Array) -> Array:
  """`y`, whose backward also gives `probe` the cotangent `stat.stat(ops, cotangent of y)`."""

  @jax.custom_vjp
  def identity(y, ops, probe):
    return y

  def fwd(y, ops, probe):
    return y, ops

  def bwd(ops, ct):
    out = stat.stat(ops, ct).astype(jnp.float32)
    return ct, [_zero_cotangent(o) for o in ops], out

  identity.defvjp(fwd, bwd)
  return identity(y, ops, probe)


def sketch_stat(site: Site, spec: sketches.SketchSpec) -> SiteStat:
  """A site's gradient sketch (`_sketch.site_sketch`) for one example, from every operand of the
  use (the parameter's with its gradient stopped) and the output cotangent. Only for a site
  outside any scan: a leaf's projection is of the whole leaf."""
  pos = site.param_pos

  def stat(ops, ct):
    others = [o[None] for j, o in enumerate(ops) if j != pos]
    return sketches.site_sketch(spec, site, ops[pos], others, ct[None])[0]

  return SiteStat("sketch", (spec.dim,), False, stat, lambda g: g)
