"""What the governance did, read from the signed part of a lineage: entropy measurements against
the profile's bounds, and governance events (out-of-bounds measurements, host events,
escalations, overrides), each with its step.

Only effective records a signed tree head covers are read (see `aqgov.lineage.history`). The
bounds come from the profiles run-start names, each file checked against its recorded SHA-256
(`verify_lineage` checks their signatures).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from aqgov.documents._document_type import payload_of
from aqgov.documents._signing import SignedDocument
from aqgov.entropy._enforce import ACTION_NAMES, BOUND_NAMES, METRICS
from aqgov.entropy._profile import PROFILE, Bound
from aqgov.errors import LineageError
from aqgov.lineage import _history as hist
from aqgov.lineage import _record as rec
from aqgov.lineage._segments import records
from aqgov.lineage._verify import lineage_dir


class Event(NamedTuple):
  """An out-of-bounds measurement recorded in a step record."""

  step: int
  group: str
  metric: str
  head: int | None
  value: float
  bound: str
  limit: float
  action: str
  window: tuple[int, int] | None = None  # reroute/route: first and last step the action holds


def step_events(view: rec.StepView, groups: Sequence[str]) -> list[Event]:
  """The out-of-bounds measurements a step record holds (its `events` arrays), decoded."""
  ev = view.events
  if "out_of_bounds" not in ev:
    return []
  out = []
  for g, m, h in zip(*np.nonzero(ev["out_of_bounds"]), strict=True):
    metric = METRICS[m]
    action = ACTION_NAMES[int(ev["action"][g, m, h])]
    window = None
    if action in ("reroute", "route") and "until" in ev:  # recorded since schema version 2
      window = (view.step + (action == "route"), int(ev["until"][g, m, h]))
    out.append(
      Event(
        view.step,
        groups[g],
        metric,
        int(h) if ev["out_of_bounds"].shape[2] > 1 else None,
        float(ev["value"][g, m, h]),
        BOUND_NAMES[int(ev["bound"][g, m, h])],
        float(ev["limit"][g, m, h]),
        action,
        window,
      )
    )
  return out


def profile_bounds(run_dir: str | os.PathLike, start: Mapping[str, Any]) -> tuple[Bound, ...]:
  """The bounds of the profiles run-start names (those whose file is present with the recorded
  SHA-256)."""
  out: list[Bound] = []
  for ref in start.get("profiles", ()):
    path = Path(run_dir) / ref["file"]
    if not path.is_file():
      continue
    data = path.read_bytes()
    if rec.record_hash(data).hex() != ref["sha256"]:
      continue  # replaced or altered: not the run's profile (verify_lineage reports it)
    out.extend(payload_of(PROFILE, SignedDocument.from_bytes(data)).bounds)
  return tuple(out)


class EntropyRow(NamedTuple):
  """One measurement ("<metric>/<group>") over the effective steps, with its bounds."""

  group: str
  metric: str
  steps: int  # steps with a finite value
  first: float
  minimum: float
  mean: float
  maximum: float
  last: float
  bounds: tuple[str, ...]  # each bound of the profile on this group and metric, described
  out_of_bounds: int  # steps with an out-of-bounds event on it
  actions: tuple[str, ...]


class GovernanceEvent(NamedTuple):
  """One thing the governance did, in log order."""

  step: int
  record: int
  kind: str  # "out-of-bounds", "event", "escalation", "override"
  group: str | None
  detail: str
  action: str | None
  resolved: bool | None = None  # escalations: an override record follows it


def _signed_records(run_dir: str | os.PathLike, kinds: Sequence[str]):
  root, ldir = lineage_dir(run_dir)
  scan, history = hist.load(ldir)
  if scan.size == 0:
    raise LineageError(f"{ldir} holds no complete record; nothing to show")
  start = scan.bodies[0]

  def effective():
    for index, kind, body in records(ldir, kinds=kinds, stop=history.size):
      if history.effective(index):
        yield index, kind, body

  return root, start, effective()


def entropy(run_dir: str | os.PathLike) -> list[EntropyRow]:
  """Per group and metric: how the measurement went over the effective steps, and its bounds."""
  root, start, recs = _signed_records(run_dir, (rec.STEP,))
  groups = list(start["groups"])
  values: dict[str, list[float]] = {}
  hits: dict[tuple[str, str], set[int]] = {}
  acts: dict[tuple[str, str], set[str]] = {}
  for index, _, body in recs:
    view = rec.view_step(body, index, len(groups))
    for key, v in view.measurements.items():
      finite = np.asarray(v, np.float64)[np.isfinite(v)]
      values.setdefault(key, []).append(float(finite.mean()) if finite.size else float("nan"))
    for e in step_events(view, groups):
      hits.setdefault((e.group, e.metric), set()).add(e.step)
      acts.setdefault((e.group, e.metric), set()).add(e.action)
  bounds = profile_bounds(root, start)
  out = []
  for key in sorted(values, key=lambda k: (k.partition("/")[2], k.partition("/")[0])):
    metric, _, group = key.partition("/")
    v = np.asarray(values[key], np.float64)
    f = v[np.isfinite(v)]
    nan = float("nan")
    out.append(
      EntropyRow(
        group,
        metric,
        int(f.size),
        float(f[0]) if f.size else nan,
        float(f.min()) if f.size else nan,
        float(f.mean()) if f.size else nan,
        float(f.max()) if f.size else nan,
        float(f[-1]) if f.size else nan,
        tuple(_bound_text(b) for b in bounds if b.group == group and b.metric == metric),
        len(hits.get((group, metric), ())),
        tuple(sorted(acts.get((group, metric), ()))),
      )
    )
  return out


def _bound_text(b: Bound) -> str:
  """A bound in a few words: `[low, high] -> action`, with its steps and heads when limited."""
  low = "-inf" if b.low is None else f"{b.low:g}"
  high = "inf" if b.high is None else f"{b.high:g}"
  extra = f" steps {b.steps[0]}-{b.steps[1]}" if b.steps is not None else ""
  extra += f" heads {list(b.heads)}" if b.heads is not None else ""
  return f"[{low}, {high}] -> {b.action}{extra}"


def _detail(body: Mapping[str, Any]) -> str:
  events = body.get("events")
  if not isinstance(events, Mapping):
    return ""
  parts = []
  for k, v in sorted(events.items()):
    parts.append(f"{k}: {len(v)} item(s)" if isinstance(v, (list, tuple)) else f"{k}: {v}")
  return "; ".join(parts)


def events(run_dir: str | os.PathLike) -> list[GovernanceEvent]:
  """Every governance event of the signed part, in log order: out-of-bounds measurements from the
  step records, host "event" records, escalations (resolved when an override record follows)
  and admitted overrides."""
  _, start, recs = _signed_records(run_dir, (rec.STEP, rec.EVENT, rec.ESCALATION, rec.OVERRIDE))
  groups = list(start["groups"])
  out: list[GovernanceEvent] = []
  for index, kind, body in recs:
    if kind == rec.STEP:
      for e in step_events(rec.view_step(body, index, len(groups)), groups):
        head = f" head {e.head}" if e.head is not None else ""
        side = "below low" if e.bound == "low" else "above high"
        out.append(
          GovernanceEvent(
            e.step,
            index,
            "out-of-bounds",
            e.group,
            f"{e.metric}{head} = {e.value:.4g} {side} bound {e.limit:.4g}",
            e.action,
          )
        )
    elif kind == rec.EVENT:
      out.append(GovernanceEvent(int(body["step"]), index, "event", None, _detail(body), None))
    elif kind == rec.ESCALATION:
      out.append(
        GovernanceEvent(
          int(body["step"]), index, "escalation", None, str(body["message"]), "escalate", False
        )
      )
    else:
      out = [
        e._replace(resolved=True) if e.kind == "escalation" and e.resolved is False else e
        for e in out
      ]
      out.append(
        GovernanceEvent(
          int(body["step"]),
          index,
          "override",
          None,
          f"{body['token_kind']} {str(body['token_id'])[:16]}...",
          "admitted",
        )
      )
  return out
