"""Entropy profiles enforced inside the jitted step, as an Optax wrapper.

`enforce(profile, compiled, inner)` wraps an inner optimizer (like `optax.apply_if_finite` or
`optax.MultiSteps` wrap theirs). Its `update(grads, state, params, measurements=...)` compares the
step's measurements (`aqgov.entropy.measure`) with the bounds that hold at the current step and
applies the actions of the broken bounds:

* `pause`: the step's update is skipped. The returned updates are all `-0.0`, so
  `optax.apply_updates` leaves every parameter bitwise unchanged (`x + -0.0 == x` for every float,
  signed zeros included), and the inner optimizer state is kept bitwise as it was.
* `reroute`: the group's routed gradient is multiplied by the bound's `fallback` before the inner
  optimizer, for `duration` steps starting with the violating one (re-armed while it keeps
  violating). A group at fallback 0 is frozen: its updates are `-0.0` and, with the profile's
  default `optimizer_state = "hold"`, the inner state's params-shaped leaves of that group are
  selected unchanged, so neither momentum nor weight decay moves it (`"advance"`: its state keeps
  stepping, and only `strict=True` stops its updates).
* `route`: a fallback route. For the `duration` steps after the violating one, the examples of the
  bound's route `classes` may reach only the groups in `to`: `route_weights(state, compiled,
  labels)` is the [B, G] factor (0 or 1) to multiply the policy weights by before the gradient.
* `escalate`: the update is skipped as for a pause, `state.escalated` is set, and the step counter
  does not advance. The host calls `check_escalation(opt_state, profile, compiled)` after each
  step; it raises `GovernanceEscalation` with the events and the state to resume from. To resume,
  supply a signed override for that step (or a changed profile), rebuild the transform, and run
  the same step again from `exc.state`.
* a violation covered by a verified override token (built into the transform with `overrides=`,
  or passed per step as `override_mask=`) is admitted: recorded, no action.

Steps are numbered like lineage steps: the first is 1 (`step` defaults to `state.step + 1`).
`state.applied_scale` is what the last update applied to each group's routed gradient (0: no
update). When several actions fire in one step, escalate > pause > reroute. Measurements that are NaN
(not measured) are never out of bounds. Every out-of-bounds measurement is an event; the last
step's events are fixed-size arrays in the state (`Events`) so they leave jit with the step, and
`decode_events` turns them into `Event` records on the host.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aqgov.entropy import _overrides as overrides_lib
from aqgov.entropy._metrics import METRICS, PER_HEAD_METRICS, split_key
from aqgov.entropy._profile import Bound, EntropyProfile
from aqgov.errors import GovernanceEscalation, OverrideError, ProfileError
from aqgov.policy._compile import CompiledPolicy

PyTree = Any

NONE, PAUSE, REROUTE, ESCALATE, ADMITTED, ROUTE = 0, 1, 2, 3, 4, 5
ACTION_NAMES = ("none", "pause", "reroute", "escalate", "admitted", "route")
_ACTION_CODE = {"pause": PAUSE, "reroute": REROUTE, "escalate": ESCALATE, "route": ROUTE}
IN_BOUNDS, LOW, HIGH = 0, 1, 2
BOUND_NAMES = ("in-bounds", "low", "high")


class Events(NamedTuple):
  """One step's out-of-bounds measurements; arrays are [groups, metrics, heads]."""

  step: jax.Array  # int32 [], 0 before the first step (the first step is 1)
  out_of_bounds: jax.Array  # bool
  value: jax.Array  # float32, the measurement (NaN where not measured)
  bound: jax.Array  # int32: IN_BOUNDS, LOW or HIGH
  limit: jax.Array  # float32: the limit that was broken (NaN if none)
  action: jax.Array  # int32: NONE, PAUSE, REROUTE, ESCALATE, ADMITTED or ROUTE
  until: jax.Array  # int32: last step a reroute or route it started holds (0 for other actions)
  route: jax.Array  # int32: the profile's route bound it started (index into `route_bounds`), -1


class Counters(NamedTuple):
  """Totals since the start of the run."""

  violations: jax.Array  # int32 [G, M]: steps with an out-of-bounds measurement
  admitted: jax.Array  # int32 [G, M]: of those, steps admitted by an override
  rerouted: jax.Array  # int32 [G]: steps the group's gradient was scaled by a fallback
  paused: jax.Array  # int32 []: steps skipped by a pause
  escalations: jax.Array  # int32 []: steps stopped for a human


class EnforceState(NamedTuple):
  """State of `enforce`: the inner optimizer's state plus the governance state."""

  inner: PyTree
  step: jax.Array  # int32 []: governed steps taken (an escalated step is not taken)
  reroute_remaining: jax.Array  # int32 [G]: steps the current fallback still applies to
  reroute_scale: jax.Array  # float32 [G]: the current fallback scale (1 when not rerouted)
  escalated: jax.Array  # bool []: the last update stopped for a human
  counters: Counters
  events: Events
  route_remaining: jax.Array  # int32 [C]: coming steps the class's fallback route holds for
  route_keep: jax.Array  # float32 [C, G]: 1 where the class may reach the group, 0 routed away
  applied_scale: jax.Array  # float32 [G]: scale the last update applied to each group's routed
  # gradient (0: no update at all: paused, escalated or frozen; the fallback while rerouted)


class Event(NamedTuple):
  """One out-of-bounds measurement, decoded on the host (for the lineage and for humans)."""

  step: int
  group: str
  metric: str
  head: int | None
  value: float
  bound: str  # "low" or "high"
  limit: float
  action: str  # "pause", "reroute", "route", "escalate" or "admitted"
  window: tuple[int, int] | None = None  # reroute/route: first and last step it holds
  route: tuple[tuple[str, ...], tuple[str, ...]] | None = None  # route: (classes, to groups)

  def describe(self) -> str:
    head = f" head {self.head}" if self.head is not None else ""
    side = "below low" if self.bound == "low" else "above high"
    what = self.action
    if self.route is not None:
      what += f" classes {list(self.route[0])} to groups {list(self.route[1])}"
    if self.window is not None:
      what += f" for steps {self.window[0]}-{self.window[1]}"
    return (
      f"step {self.step}: {self.metric}/{self.group}{head} = {self.value:.4g} {side} bound "
      f"{self.limit:.4g} -> {what}"
    )


class _Tables(NamedTuple):
  """The profile bound to the compiled groups: per step segment, per side, [S, G, M, H] arrays."""

  breaks: np.ndarray  # int32 [S]: first step of each segment
  limit: np.ndarray  # float32 [2, S, G, M, H]: low (-inf if none), high (+inf if none)
  action: np.ndarray  # int32 [2, S, G, M, H]
  fallback: np.ndarray  # float32 [2, S, G, M, H]
  duration: np.ndarray  # int32 [2, S, G, M, H]
  route: np.ndarray  # int32 [2, S, G, M, H]: index into `route_bounds(profile)`, -1 if none


def route_bounds(profile: EntropyProfile) -> tuple[Bound, ...]:
  """The profile's `route` bounds, in profile order (`Events.route` indexes them)."""
  return tuple(b for b in profile.bounds if b.action == "route")


class _Routes(NamedTuple):
  """The route bounds bound to the compiled policy: which classes each sends where."""

  classes: np.ndarray  # bool [R, C]: route classes the bound sends elsewhere
  keep: np.ndarray  # float32 [R, G]: 1 for the groups they may still reach, else 0


def _routes(profile: EntropyProfile, compiled: Any) -> _Routes:
  names, groups = tuple(compiled.class_names), tuple(compiled.group_names)
  bounds = route_bounds(profile)
  classes = np.zeros((len(bounds), len(names)), bool)
  keep = np.zeros((len(bounds), len(groups)), np.float32)
  for r, b in enumerate(bounds):
    for pattern in b.classes:
      hit = [fnmatch.fnmatchcase(n, pattern) for n in names]
      if not any(hit):
        raise ProfileError(
          f"{b.describe()}: route class {pattern!r} matches none of the compiled policy's route "
          f"classes {list(names)}; name one of them (globs such as 'acme:rule2|*' match several)"
        )
      classes[r] |= hit
    keep[r, [groups.index(g) for g in b.to]] = 1.0
  return _Routes(classes, keep)


def _tables(profile: EntropyProfile, group_names: Sequence[str]) -> _Tables:
  g_n, m_n, h_n = len(group_names), len(METRICS), profile.num_heads
  breaks = sorted({0} | {s for b in profile.bounds if b.steps for s in b.steps})
  shape = (2, len(breaks), g_n, m_n, h_n)
  limit = np.empty(shape, np.float32)
  limit[0], limit[1] = -np.inf, np.inf
  action = np.zeros(shape, np.int32)
  fallback = np.ones(shape, np.float32)
  duration = np.zeros(shape, np.int32)
  route = np.full(shape, -1, np.int32)
  route_index = {id(b): r for r, b in enumerate(route_bounds(profile))}
  rank = np.full(shape, -1, np.int32)
  for s, first in enumerate(breaks):
    for b in profile.bounds:
      g, m = group_names.index(b.group), METRICS.index(b.metric)
      heads = range(profile.heads(b.group)) if b.metric in PER_HEAD_METRICS else (None,)
      for h in heads:
        if not b.covers(first, h):
          continue
        specificity = 2 * b.specificity[0] + b.specificity[1]
        for side, value in ((0, b.low), (1, b.high)):
          cell = (side, s, g, m, h or 0)
          if value is None or specificity <= rank[cell]:
            continue
          rank[cell] = specificity
          limit[cell], action[cell] = value, _ACTION_CODE[b.action]
          fallback[cell] = 1.0 if b.fallback is None else b.fallback
          duration[cell] = 0 if b.duration is None else b.duration
          route[cell] = route_index.get(id(b), -1)
  return _Tables(np.asarray(breaks, np.int32), limit, action, fallback, duration, route)


def _values(measurements: dict, profile: EntropyProfile, group_names: Sequence[str]) -> jax.Array:
  """float32 [G, M, H] of the measurements, NaN where not measured."""
  h_n = profile.num_heads
  out = jnp.full((len(group_names), len(METRICS), h_n), jnp.nan, jnp.float32)
  for name, value in measurements.items():
    metric, group = split_key(name)
    if metric not in METRICS:
      continue
    if group not in group_names:
      raise ProfileError(
        f"measurement {name!r} names group {group!r}, not one of {list(group_names)}"
      )
    value = jnp.asarray(value, jnp.float32)
    g, m = group_names.index(group), METRICS.index(metric)
    if metric in PER_HEAD_METRICS:
      if value.ndim != 1 or value.shape[0] > h_n:
        raise ProfileError(
          f"measurement {name!r} has shape {value.shape}; expected one value per head (at most {h_n})"
        )
      out = out.at[g, m, : value.shape[0]].set(value)
    else:
      if value.ndim != 0:
        raise ProfileError(f"measurement {name!r} has shape {value.shape}; expected a scalar")
      out = out.at[g, m, 0].set(value)
  missing = sorted({f"{b.metric}/{b.group}" for b in profile.bounds} - set(measurements))
  if missing:
    raise ProfileError(
      f"the profile bounds {missing} but the update got no such measurement; compute them with "
      "aqgov.entropy.measure(profile, compiled, grads=..., representations=...)"
    )
  return out


def _resolve_overrides(overrides, trust, run_id, now) -> list[overrides_lib.Override]:
  out = []
  for o in overrides:
    if isinstance(o, overrides_lib.Override):
      out.append(o)
      continue
    if trust is None or run_id is None:
      raise OverrideError(
        "enforce() got an unverified override token; pass trust= and run_id= so it can be verified, "
        "or verify it first with aqgov.entropy.admit_override(token, trust, run_id)"
      )
    out.append(overrides_lib.admit_override(o, trust, run_id, now=now))
  return out


def _group_indices(compiled: Any, updates: PyTree) -> tuple[list, Any, np.ndarray]:
  leaves, treedef = jax.tree_util.tree_flatten(updates)
  leaf_group = np.asarray(compiled.leaf_group, np.int32)
  if len(leaves) != len(leaf_group):
    raise ProfileError(
      f"the updates have {len(leaves)} leaves but the compiled policy was bound to {len(leaf_group)}; "
      "enforce the gradients of the parameters the policy was compiled for"
    )
  return leaves, treedef, leaf_group


def _hold_frozen(new: PyTree, old: PyTree, frozen: jax.Array, like: PyTree, leaf_group) -> PyTree:
  """`new` optimizer state, but `old` for the leaves of frozen groups in every subtree shaped like
  the parameters (momenta, second moments, ...); other leaves (step counts) advance."""
  treedef = jax.tree_util.tree_structure(like)
  shapes = [jnp.shape(x) for x in jax.tree_util.tree_leaves(like)]

  def params_shaped(x) -> bool:
    if jax.tree_util.tree_structure(x) != treedef:
      return False
    return [jnp.shape(v) for v in jax.tree_util.tree_leaves(x)] == shapes

  def hold(n, o):
    if not params_shaped(n):
      return n
    held = [
      jnp.where(frozen[g], lo, ln)
      for ln, lo, g in zip(jax.tree_util.tree_leaves(n), jax.tree_util.tree_leaves(o), leaf_group)
    ]
    return jax.tree_util.tree_unflatten(treedef, held)

  return jax.tree.map(hold, new, old, is_leaf=params_shaped)


def enforce(
  profile: EntropyProfile,
  compiled: Any,
  inner: optax.GradientTransformation,
  *,
  overrides: Iterable[Any] = (),
  trust: Any = None,
  run_id: str | None = None,
  now: Any = None,
  strict: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Wrap `inner` so that `profile`'s bounds govern every update.

  `update(updates, state, params=None, *, measurements, step=None, override_mask=None, **extra)`:
  `measurements` from `aqgov.entropy.measure`; `step` (traced int) defaults to `state.step + 1`
  (the first step is 1, as in the lineage); `override_mask` (bool [G, M] or [G]) admits more
  cells this step; `extra` goes to `inner`. `overrides` are verified `Override`s, or tokens
  verified here against `trust` and `run_id` (at time `now`, default the current time).
  Fallback routes (action `route`) act on the routing weights of the *next* steps: compute the
  gradient with `route_weights(state, compiled, labels)` (`governed_step` does).
  """
  group_names = tuple(compiled.group_names)
  profile.check_groups(group_names)
  tables = _tables(profile, group_names)
  routes = _routes(profile, compiled)
  admits = overrides_lib.admit_table(_resolve_overrides(overrides, trust, run_id, now), group_names)
  inner = optax.with_extra_args_support(inner)
  hold = profile.optimizer_state == "hold"
  g_n, m_n, h_n = len(group_names), len(METRICS), profile.num_heads
  c_n = len(compiled.class_names)

  def init_fn(params):
    zeros_gm = jnp.zeros((g_n, m_n), jnp.int32)
    cells = (g_n, m_n, h_n)
    return EnforceState(
      inner=inner.init(params),
      step=jnp.zeros((), jnp.int32),
      reroute_remaining=jnp.zeros((g_n,), jnp.int32),
      reroute_scale=jnp.ones((g_n,), jnp.float32),
      escalated=jnp.zeros((), bool),
      counters=Counters(
        zeros_gm,
        zeros_gm,
        jnp.zeros((g_n,), jnp.int32),
        jnp.zeros((), jnp.int32),
        jnp.zeros((), jnp.int32),
      ),
      events=Events(
        step=jnp.zeros((), jnp.int32),
        out_of_bounds=jnp.zeros(cells, bool),
        value=jnp.full(cells, jnp.nan, jnp.float32),
        bound=jnp.zeros(cells, jnp.int32),
        limit=jnp.full(cells, jnp.nan, jnp.float32),
        action=jnp.zeros(cells, jnp.int32),
        until=jnp.zeros(cells, jnp.int32),
        route=jnp.full(cells, -1, jnp.int32),
      ),
      route_remaining=jnp.zeros((c_n,), jnp.int32),
      route_keep=jnp.ones((c_n, g_n), jnp.float32),
      applied_scale=jnp.ones((g_n,), jnp.float32),
    )

  def update_fn(
    updates, state, params=None, *, measurements, step=None, override_mask=None, **extra
  ):
    t = state.step + 1 if step is None else jnp.asarray(step, jnp.int32)
    values = _values(measurements, profile, group_names)
    seg = jnp.clip(jnp.searchsorted(jnp.asarray(tables.breaks), t, side="right") - 1, 0)
    limit, action_t = jnp.asarray(tables.limit)[:, seg], jnp.asarray(tables.action)[:, seg]
    fallback_t, duration_t = (
      jnp.asarray(tables.fallback)[:, seg],
      jnp.asarray(tables.duration)[:, seg],
    )
    route_t = jnp.asarray(tables.route)[:, seg]
    below, above = values < limit[0], values > limit[1]
    oob = below | above
    side = jnp.where(below, 0, 1)
    pick = lambda table: jnp.where(side == 0, table[0], table[1])
    admit = overrides_lib.admit_mask(admits, t)
    if override_mask is not None:
      extra_mask = jnp.asarray(override_mask, bool)
      admit = admit | (extra_mask[:, None] if extra_mask.ndim == 1 else extra_mask)
    admitted = oob & admit[:, :, None]
    acted = oob & ~admitted
    action = jnp.where(acted, pick(action_t), jnp.where(admitted, ADMITTED, NONE))
    escalate = jnp.any(action == ESCALATE)
    pause = jnp.any(action == PAUSE) & ~escalate
    skip = escalate | pause
    reroute = action == REROUTE
    trigger = jnp.any(reroute, axis=(1, 2))
    trig_scale = jnp.min(jnp.where(reroute, pick(fallback_t), 1.0), axis=(1, 2))
    trig_steps = jnp.max(jnp.where(reroute, pick(duration_t), 0), axis=(1, 2))
    active_before = state.reroute_remaining > 0
    held_scale = jnp.where(active_before, state.reroute_scale, 1.0)
    remaining = jnp.where(
      trigger, jnp.maximum(state.reroute_remaining, trig_steps), state.reroute_remaining
    )
    scale = jnp.where(trigger, jnp.minimum(held_scale, trig_scale), held_scale)
    rerouted = remaining > 0
    scale = jnp.where(rerouted, scale, 1.0)
    route_fired = jnp.where(action == ROUTE, pick(route_t), -1)
    route_remaining, route_keep = _next_routes(state, route_fired, pick(duration_t), routes)

    leaves, treedef, leaf_group = _group_indices(compiled, updates)
    scaled = [u * scale[g].astype(u.dtype) for u, g in zip(leaves, leaf_group)]
    new_updates, new_inner = inner.update(
      jax.tree_util.tree_unflatten(treedef, scaled), state.inner, params, **extra
    )
    out_leaves = jax.tree_util.tree_leaves(new_updates)
    frozen = scale == 0
    if strict or hold:
      out_leaves = [
        jnp.where(frozen[g], jnp.asarray(-0.0, u.dtype), u) for u, g in zip(out_leaves, leaf_group)
      ]
    if hold:
      new_inner = _hold_frozen(new_inner, state.inner, frozen, updates, leaf_group)
    out_leaves = [jnp.where(skip, jnp.asarray(-0.0, u.dtype), u) for u in out_leaves]
    new_inner = jax.tree.map(lambda new, old: jnp.where(skip, old, new), new_inner, state.inner)

    until = jnp.where(
      action == REROUTE,
      t + pick(duration_t) - 1,
      jnp.where(action == ROUTE, t + pick(duration_t), 0),
    )
    events = Events(
      step=t,
      out_of_bounds=oob,
      value=values,
      bound=jnp.where(below, LOW, jnp.where(above, HIGH, IN_BOUNDS)),
      limit=jnp.where(oob, pick(limit), jnp.nan),
      action=action,
      until=until.astype(jnp.int32),
      route=route_fired.astype(jnp.int32),
    )
    c = state.counters
    counters = Counters(
      violations=c.violations + jnp.any(oob, axis=2).astype(jnp.int32),
      admitted=c.admitted + jnp.any(admitted, axis=2).astype(jnp.int32),
      rerouted=c.rerouted + (rerouted & ~skip).astype(jnp.int32),
      paused=c.paused + pause.astype(jnp.int32),
      escalations=c.escalations + escalate.astype(jnp.int32),
    )
    next_remaining = jnp.maximum(remaining - 1, 0)
    no_update = skip | (frozen if (strict or hold) else jnp.zeros_like(frozen))
    taken = EnforceState(
      inner=new_inner,
      step=state.step + 1,
      reroute_remaining=next_remaining,
      reroute_scale=jnp.where(next_remaining > 0, scale, 1.0),
      escalated=escalate,
      counters=counters,
      events=events,
      route_remaining=route_remaining,
      route_keep=route_keep,
      applied_scale=jnp.where(no_update, 0.0, scale).astype(jnp.float32),
    )
    # An escalated step is not taken: all but the flag, counters and events stays as it was.
    held = state._replace(
      escalated=escalate,
      counters=counters,
      events=events,
      applied_scale=jnp.zeros((g_n,), jnp.float32),
    )
    new_state = jax.tree.map(lambda a, b: jnp.where(escalate, b, a), taken, held)
    return jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(new_updates), out_leaves
    ), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _next_routes(
  state: EnforceState, fired: jax.Array, duration: jax.Array, routes: _Routes
) -> tuple[jax.Array, jax.Array]:
  """The route table for the coming steps: the step just taken used up one step of each active
  route; routes fired now ([G, M, H] route-bound indices, -1 none) hold for their `duration`
  next steps. Where several hold one class, the longest lasts and their kept groups intersect."""
  remaining = jnp.maximum(state.route_remaining - 1, 0)
  keep = jnp.where((remaining > 0)[:, None], state.route_keep, 1.0)
  for r in range(routes.classes.shape[0]):
    hit = fired == r
    on = jnp.any(hit)
    steps = jnp.max(jnp.where(hit, duration, 0))
    cls = jnp.asarray(routes.classes[r]) & on
    remaining = jnp.where(cls, jnp.maximum(remaining, steps), remaining)
    keep = jnp.where(cls[:, None], jnp.minimum(keep, jnp.asarray(routes.keep[r])[None, :]), keep)
  return remaining.astype(jnp.int32), keep.astype(jnp.float32)


def route_weights(opt_state: PyTree, compiled: CompiledPolicy, labels: Any) -> jax.Array:
  """float32 [B, G]: 1 where an example may reach a group at the coming step, 0 where a fallback
  route (action `route`) sends its class elsewhere; multiply the policy weights by it before the
  gradient (`routed_value_and_grad(..., example_scale=...)`). Traced; all ones without routes."""
  keep = enforce_state(opt_state).route_keep
  hot = compiled.route_class(labels)[:, None] == jnp.arange(keep.shape[0], dtype=jnp.int32)
  return jnp.sum(jnp.where(hot[..., None], keep[None], 0.0), axis=1)


# --- host side --------------------------------------------------------------------------------


def enforce_state(opt_state: PyTree) -> EnforceState:
  """The `EnforceState` inside an optimizer state (itself, or nested in a chain)."""
  if isinstance(opt_state, EnforceState):
    return opt_state
  found = [
    x
    for x in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, EnforceState))
    if isinstance(x, EnforceState)
  ]
  if not found:
    raise ProfileError(
      "no aqgov.enforce state found in this optimizer state; wrap the optimizer with aqgov.enforce"
    )
  return found[0]


def decode_events(
  state_or_events: Any, profile: EntropyProfile, compiled: CompiledPolicy
) -> list[Event]:
  """The out-of-bounds measurements of the last step as `Event` records (host side), numbered
  like lineage steps (the first step is 1)."""
  events = (
    state_or_events
    if isinstance(state_or_events, Events)
    else enforce_state(state_or_events).events
  )
  ev = jax.device_get(events)
  step = int(ev.step)
  routes = route_bounds(profile)
  out = []
  for g, m, h in zip(*np.nonzero(np.asarray(ev.out_of_bounds))):
    metric = METRICS[m]
    action = ACTION_NAMES[int(ev.action[g, m, h])]
    window = route = None
    if action in ("reroute", "route"):
      until = int(ev.until[g, m, h])
      window = (step if action == "reroute" else step + 1, until)
    if action == "route":
      bound = routes[int(ev.route[g, m, h])]
      route = (bound.classes, bound.to)
    out.append(
      Event(
        step=step,
        group=compiled.group_names[g],
        metric=metric,
        head=int(h)
        if metric in PER_HEAD_METRICS and profile.heads(compiled.group_names[g])
        else None,
        value=float(ev.value[g, m, h]),
        bound=BOUND_NAMES[int(ev.bound[g, m, h])],
        limit=float(ev.limit[g, m, h]),
        action=action,
        window=window,
        route=route,
      )
    )
  return out


def check_escalation(
  opt_state: PyTree, profile: EntropyProfile, compiled: CompiledPolicy, *, run_id: str | None = None
) -> None:
  """Raise `GovernanceEscalation` if the last update stopped for a human (call after each step)."""
  state = enforce_state(opt_state)
  if not bool(jax.device_get(state.escalated)):
    return
  events = decode_events(state, profile, compiled)
  step = events[0].step if events else int(jax.device_get(state.step)) + 1
  broke = [e for e in events if e.action == "escalate"]
  groups = ",".join(sorted({e.group for e in broke}))
  metrics = ",".join(sorted({e.metric for e in broke}))
  run = run_id or "RUN"
  lines = "\n".join("  " + e.describe() for e in events)
  raise GovernanceEscalation(
    f"training stopped before applying step {step}: entropy profile {profile.name!r} "
    f"({profile.id[:16]}...) escalates\n{lines}\n"
    f"Parameters and optimizer state are as they were before step {step}. To resume, have an authority "
    f"admit it (`aqgov override issue --key KEY --run {run} --steps {step} --groups {groups} "
    f"--metrics {metrics} --reason ... --expires ... --out T.override`) and pass the verified token to "
    "aqgov.enforce(..., overrides=[...]), or change the profile; then run step "
    f"{step} again from `exc.state` with the same batch.",
    step=step,
    events=tuple(events),
    state=opt_state,
  )
