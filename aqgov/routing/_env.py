"""The environment of one per-example evaluation under per-use cotangent scaling.

`Env` holds a jaxpr evaluation's values and kinds, and derives the views emission needs of a
parameter-derived value: with its gradient flowing to one leaf only (`iso`), with its hidden
leaves zeroed (`zeroed`), lifted into an example-dependent position (`lift`), or with its
gradient stopped (`stop`). `Ctx` is what every environment of one example shares.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from aqgov.errors import RoutingError
from aqgov.routing import _jax_compat as jc
from aqgov.routing._analysis import CONST, Kind, differentiable, is_param

_sg = jax.lax.stop_gradient


def weigh(x: jax.Array, w: jax.Array) -> jax.Array:
  """`w * x`, but exactly zero where `w` is 0 (a select, not a multiply): an example routed away
  from a parameter contributes nothing to it even when its own values are inf or NaN."""
  w = jnp.asarray(w)
  return jnp.where(w != 0, x * w.astype(x.dtype), jnp.zeros((), x.dtype)).astype(x.dtype)


class Ctx(NamedTuple):
  """What every environment of one per-example evaluation shares."""

  weights: dict  # leaf -> per-example scalar weight
  leaf_branch: dict  # leaf -> value used on the parameter side (leaf, or leaf + probe)
  materialised: frozenset  # leaves whose per-example gradient is materialised via a probe
  site_probes: dict  # path -> (Site, SiteStat, zero probe tapped on its parameter side)
  vis_key: tuple = ()  # leaf -> visibility key (None: seen by every example)
  seen: dict = {}  # visibility key -> per-example bool: the example sees those leaves
  slice_axes: dict = {}  # sliced leaf scaled at its uses -> its sliced axis (`_slices`)
  sketch_probes: dict = {}  # path -> (Site, SiteStat, zero probe) of a gradient sketch (a site)


class Env:
  """Values and kinds of one jaxpr evaluation, with per-leaf isolated parameter values."""

  def __init__(self, ctx: Ctx):
    self.ctx = ctx
    self.stopped: dict = {}  # var -> its value with the gradient stopped, made outside a scan
    self.vals: dict = {}
    self.kinds: dict = {}
    self.producer: dict = {}
    self.links: dict = {}
    self.iso_memo: dict = {}
    self.zero_memo: dict = {}

  def read(self, a):
    return jc.literal_value(a) if jc.is_literal(a) else self.vals[a]

  def kind(self, a) -> Kind:
    return CONST if jc.is_literal(a) else self.kinds[a]

  def write(self, v, val, kind: Kind) -> None:
    if jc.is_dropped(v):
      return
    self.vals[v] = val
    self.kinds[v] = differentiable(kind, v.aval)

  def needs_iso(self, kind: Kind, leaf: int) -> bool:
    return len(kind.leaves) > 1 or leaf in self.ctx.materialised

  def iso(self, a, leaf: int):
    """`a`'s value with its gradient flowing to parameter leaf `leaf` only."""
    if jc.is_literal(a):
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
      outs = jc.bind(eqn, [self._iso_input(b, leaf) for b in eqn.invars])
      for v, o in zip(eqn.outvars, outs):
        if not jc.is_dropped(v):
          self.iso_memo[v, leaf] = o
      return self.iso_memo[a, leaf]
    else:
      raise RoutingError(f"internal: no leaf-{leaf} view of a parameter-derived value")
    self.iso_memo[a, leaf] = val
    return val

  def zeroed(self, a) -> tuple:
    """`a`'s value with its hidden leaves zeroed, and whether that value is exactly zero.

    Only for parameter-only values whose leaves share one visibility (the plan refuses any other
    use), so the result is a constant of the step."""
    if jc.is_literal(a):
      return jc.literal_value(a), False
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
      zero = keeps_zero(eqn, [z for _, z in ins])
      for v, o in zip(eqn.outvars, jc.bind(eqn, [v for v, _ in ins])):
        if not jc.is_dropped(v):
          self.zero_memo[v] = (o, zero)
      return self.zero_memo[a]
    else:
      raise RoutingError("internal: no zeroed view of a parameter-derived value")
    self.zero_memo[a] = out
    return out

  def stop(self, a):
    """`a`'s value with its gradient stopped. A scanned-over input's comes from outside the scan:
    inside, `stop_gradient` would make a new value that the backward keeps as one more stacked
    residual instead of reading the scanned-over input itself."""
    if not jc.is_literal(a) and a in self.stopped:
      return self.stopped[a]
    return _sg(self.read(a))

  def _iso_input(self, a, leaf):
    kind = self.kind(a)
    if kind.ex:
      return self.stop(a)
    return self.iso(a, leaf) if kind.leaves else self.read(a)

  def lift(self, a):
    """A parameter-only value entering an example-dependent position: exact value, batched, with
    each leaf's cotangent scaled by its weight."""
    val = self.read(a)
    if visibility_key(self.ctx, self.kind(a).leaves) is not None:
      raise RoutingError(
        "internal: a hidden parameter reached an example-dependent position unmasked"
      )
    out = _sg(val)
    for leaf in sorted(self.kind(a).leaves):
      view = self.iso(a, leaf)
      out = out + weigh(view - _sg(view), self.ctx.weights[leaf])
    return out

  def seed(self, v, val, kind: Kind, iso_vals: dict) -> None:
    self.write(v, val, kind)
    for leaf, iv in iso_vals.items():
      self.iso_memo[v, leaf] = iv


def iso_seeds(env: Env, atoms) -> list[dict]:
  """Per atom, the leaf views a sub-jaxpr needs (only those that differ from the value)."""
  out = []
  for a in atoms:
    kind = env.kind(a)
    views = {}
    if is_param(kind):
      for leaf in sorted(kind.leaves):
        if env.needs_iso(kind, leaf):
          views[leaf] = env.iso(a, leaf)
    out.append(views)
  return out


def keeps_zero(eqn, zero: list[bool]) -> bool:
  """Whether `eqn`'s output is exactly zero given which of its inputs are."""
  if jc.name(eqn) in jc.ZERO_ANNIHILATING:
    return any(zero)
  if jc.name(eqn) in jc.ZERO_PRESERVING:
    return bool(zero) and zero[0]
  return False


def visibility_key(ctx: Ctx, leaves):
  """The one visibility key of `leaves` that may be hidden, or None if all are always seen."""
  keys = {ctx.vis_key[leaf] for leaf in leaves if ctx.vis_key and ctx.vis_key[leaf] is not None}
  if len(keys) > 1:
    raise RoutingError("internal: a use mixes parameters of different visibility")
  return next(iter(keys), None)
