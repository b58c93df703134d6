"""Signed override tokens: an authority admits named entropy-bound violations of one run.

A token is a signed document of type `OVERRIDE` (kind `entropy-override`) naming the run id, the
steps (half-open intervals), the parameter groups and metrics it covers, a reason and an expiry
(UTC). It admits a violation only if all of step, group and metric are named; everything else
still acts. An authority writes one with `sign(OVERRIDE, Override.create(...), key)`. Tokens are
verified on the host (`admit_override`: signature, trust, run, expiry) and then encoded for the
device as an `AdmitTable` of step intervals with a [groups, metrics] mask each, which the jitted
step turns into this step's admit mask with `admit_mask(table, step)`.

`admit_override` is the one check every use goes through (recording a token, building a resumed
or replayed task, verifying a lineage): trusted signature by a key that may sign overrides (never
a run key), by one of the named override authorities, for this run, covering the step it is used
at, not expired at the time of use, and not used before.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Iterable, Mapping, Sequence, Set
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from aqgov.documents import _canonical as canonical
from aqgov.documents._document_type import DocumentType, register, verify
from aqgov.documents._keys import TrustStore
from aqgov.documents._signing import SignedDocument
from aqgov.entropy._metrics import METRICS
from aqgov.errors import OverrideError

KIND = "entropy-override"
FORMAT = "aqgov.entropy-override/1"
_PAYLOAD_KEYS = {"format", "run", "steps", "groups", "metrics", "reason", "expires", "issued"}


def parse_steps(steps: Any) -> tuple[tuple[int, int], ...]:
  """Sorted, merged half-open step intervals.

  Accepts a text spec (`"10-20"`, inclusive at both ends, `"5"`, `"3,7,9-12"`), an int, a
  `range` (step 1), an iterable of ints, or an iterable of `[start, end)` pairs.
  """
  intervals: list[tuple[int, int]] = []
  if isinstance(steps, str):
    for part in steps.replace(" ", "").split(","):
      m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
      if not m:
        raise OverrideError(
          f"step spec {steps!r}: {part!r} is not N or N-M (inclusive); e.g. '10-20' or '3,7,9-12'"
        )
      lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
      if hi < lo:
        raise OverrideError(
          f"step spec {steps!r}: range {part!r} runs backwards; write the smaller step first"
        )
      intervals.append((lo, hi + 1))
  elif isinstance(steps, bool):
    raise OverrideError(f"steps = {steps!r} is not a step number or spec")
  elif isinstance(steps, int):
    intervals.append((steps, steps + 1))
  elif isinstance(steps, range):
    if steps.step != 1 or len(steps) == 0:
      raise OverrideError(f"steps {steps!r} must be a non-empty range with step 1")
    intervals.append((steps.start, steps.stop))
  elif isinstance(steps, Iterable):
    for item in steps:
      if isinstance(item, (list, tuple)) and len(item) == 2:
        lo, hi = item
      elif isinstance(item, int) and not isinstance(item, bool):
        lo, hi = item, item + 1
      else:
        raise OverrideError(
          f"steps entry {item!r} is neither a step number nor a [start, end) pair"
        )
      if any(isinstance(v, bool) or not isinstance(v, int) for v in (lo, hi)) or not 0 <= lo < hi:
        raise OverrideError(f"steps entry {item!r} must satisfy 0 <= start < end")
      intervals.append((int(lo), int(hi)))
  else:
    raise OverrideError(f"steps {steps!r} must be a spec like '10-20', an int, a range or a list")
  if not intervals or any(lo < 0 for lo, _ in intervals):
    raise OverrideError(f"steps {steps!r} names no (non-negative) step")
  if max(hi for _, hi in intervals) > 2**31 - 1:
    raise OverrideError(
      f"steps {steps!r:.60} reach past step {2**31 - 2}; step numbers are int32, so end the "
      "window earlier"
    )
  merged: list[tuple[int, int]] = []
  for lo, hi in sorted(intervals):
    if merged and lo <= merged[-1][1]:
      merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
    else:
      merged.append((lo, hi))
  return tuple(merged)


def utc_time(value: str | dt.datetime, what: str = "time") -> dt.datetime:
  """A timezone-aware UTC datetime from an ISO 8601 string or datetime (naive ones are refused)."""
  if isinstance(value, str):
    try:
      value = dt.datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
      raise OverrideError(
        f"{what} {value!r} is not an ISO 8601 time; write e.g. 2026-01-31T18:00:00Z"
      ) from None
  if not isinstance(value, dt.datetime):
    raise OverrideError(
      f"{what} must be an ISO 8601 string or datetime, got {type(value).__name__}"
    )
  if value.tzinfo is None:
    raise OverrideError(
      f"{what} {value.isoformat()} has no timezone; give UTC explicitly, e.g. ...T18:00:00Z"
    )
  return value.astimezone(dt.UTC)


def iso(value: dt.datetime) -> str:
  """Canonical UTC ISO text: `YYYY-MM-DDTHH:MM:SSZ` (seconds precision)."""
  return value.astimezone(dt.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def _names(values: Any, what: str, allowed: Sequence[str] | None = None) -> tuple[str, ...]:
  if isinstance(values, str):
    values = [v for v in values.split(",") if v]
  values = list(values) if isinstance(values, Iterable) else []
  if not values:
    raise OverrideError(f"an override must name at least one {what}")
  if any(not isinstance(v, str) or not v for v in values):
    raise OverrideError(f"override {what}s must be non-empty strings, got {list(values)!r:.80}")
  out = tuple(sorted(set(values)))
  if allowed is not None:
    bad = [v for v in out if v not in allowed]
    if bad:
      raise OverrideError(f"unknown {what}(s) {bad}; choose from {list(allowed)}")
  return out


@dataclasses.dataclass(frozen=True)
class Override:
  """An override token's content; `signers` are the trusted keys that signed it, once verified."""

  run: str
  steps: tuple[tuple[int, int], ...]
  groups: tuple[str, ...]
  metrics: tuple[str, ...]
  reason: str
  expires: str
  issued: str
  signers: tuple[str, ...] = ()

  def __post_init__(self):
    if not isinstance(self.run, str) or not self.run:
      raise OverrideError("an override must name the run id it applies to")
    if not isinstance(self.reason, str) or not self.reason.strip():
      raise OverrideError("an override must give a reason (it is kept in the lineage for auditors)")
    object.__setattr__(self, "steps", parse_steps(self.steps))
    object.__setattr__(self, "groups", _names(self.groups, "group"))
    object.__setattr__(self, "metrics", _names(self.metrics, "metric", METRICS))
    issued, expires = utc_time(self.issued, "issued"), utc_time(self.expires, "expires")
    if expires <= issued:
      raise OverrideError(f"expiry {iso(expires)} is not after the issue time {iso(issued)}")
    object.__setattr__(self, "issued", iso(issued))
    object.__setattr__(self, "expires", iso(expires))
    object.__setattr__(self, "signers", tuple(self.signers))

  @classmethod
  def create(
    cls,
    *,
    run: str,
    steps: Any,
    groups: Iterable[str] | str,
    metrics: Iterable[str] | str,
    reason: str,
    expires: str | dt.datetime,
    issued: str | dt.datetime | None = None,
  ) -> Override:
    """An override admitting `metrics` in `groups` at `steps` of run `run`, issued now unless `issued`."""
    return cls(
      run=run,
      steps=steps,
      groups=groups,
      metrics=metrics,
      reason=reason,
      expires=expires,
      issued=dt.datetime.now(dt.UTC) if issued is None else issued,
    )

  @property
  def id(self) -> str:
    """The token id: hex SHA-256 of the canonical payload (the signed document's id)."""
    return canonical.digest_hex(self.to_payload())

  def to_payload(self) -> dict:
    return {
      "format": FORMAT,
      "run": self.run,
      "steps": [list(s) for s in self.steps],
      "groups": list(self.groups),
      "metrics": list(self.metrics),
      "reason": self.reason,
      "expires": self.expires,
      "issued": self.issued,
    }

  @classmethod
  def from_payload(cls, p: Mapping[str, Any]) -> Override:
    where = f"override {canonical.digest_hex(p)[:16]}..." if isinstance(p, Mapping) else "override"
    if not isinstance(p, Mapping) or set(p) != _PAYLOAD_KEYS or p.get("format") != FORMAT:
      raise OverrideError(
        f"{where} is malformed (expected the fields {sorted(_PAYLOAD_KEYS)}); re-issue it"
      )
    if not isinstance(p["run"], str) or not isinstance(p["reason"], str):
      raise OverrideError(f"{where} is malformed: run and reason must be strings")
    return cls(
      run=p["run"],
      steps=p["steps"],
      groups=p["groups"],
      metrics=p["metrics"],
      reason=p["reason"],
      expires=p["expires"],
      issued=p["issued"],
    )

  def covers(self, step: int, group: str, metric: str) -> bool:
    """True iff this token admits a violation of `metric` in `group` at `step`."""
    return (
      group in self.groups
      and metric in self.metrics
      and any(lo <= step < hi for lo, hi in self.steps)
    )


OVERRIDE: DocumentType[Override] = register(
  DocumentType(
    name="override",
    kind=KIND,
    noun="override",
    to_payload=Override.to_payload,
    from_payload=Override.from_payload,
    error=OverrideError,
    refused=OverrideError,
    on_verified=lambda o, signers: dataclasses.replace(o, signers=signers),
  )
)


def admit_override(
  token: SignedDocument | bytes,
  trust: TrustStore,
  run_id: str,
  *,
  now: str | dt.datetime | None = None,
  step: int | None = None,
  authorities: Sequence[str] | None = None,
  used: Set[str] = frozenset(),
) -> Override:
  """The verified token; `OverrideError` unless it may be used now.

  It must carry a trusted signature by a key that may sign overrides (a run key never may) and,
  when `authorities` is given, by one of those key names; name run `run_id`; cover `step` when
  given; be issued no later than, and expire after, `now` (the time of use; default the current
  time); and not be in `used` (a token is used at most once).
  """
  if isinstance(token, (bytes, bytearray)):
    try:
      token = SignedDocument.from_bytes(bytes(token), kind=KIND)
    except Exception as exc:
      raise OverrideError(f"override refused: {exc}") from None
  override = verify(OVERRIDE, token, trust)
  if authorities is not None and not set(override.signers) & set(authorities):
    raise OverrideError(
      f"override {override.id[:16]}... is signed by {list(override.signers)}, none of which is an override "
      f"authority of this run ({', '.join(authorities) or 'none'}); have one of them issue it"
    )
  if override.run != run_id:
    raise OverrideError(
      f"override {override.id[:16]}... is for run {override.run!r}, not {run_id!r}; issue one for this run"
    )
  if step is not None and not any(lo <= int(step) < hi for lo, hi in override.steps):
    raise OverrideError(
      f"override {override.id[:16]}... does not cover step {step} (it names steps "
      f"{', '.join(f'{lo}-{hi - 1}' for lo, hi in override.steps)}); issue one for that step"
    )
  at = dt.datetime.now(dt.UTC) if now is None else utc_time(now, "now")
  if at >= utc_time(override.expires, "expiry"):
    raise OverrideError(
      f"override {override.id[:16]}... expired at {override.expires} (used {iso(at)}); issue a fresh one"
    )
  if at.replace(microsecond=0) < utc_time(override.issued, "issued"):
    raise OverrideError(
      f"override {override.id[:16]}... was issued at {override.issued}, after it was used "
      f"({iso(at)}); a token cannot be used before it exists"
    )
  if override.id in used:
    raise OverrideError(
      f"override {override.id[:16]}... was already used in run {run_id!r}; a token is used at "
      "most once: issue a new one"
    )
  return override


# --- host -> device ---------------------------------------------------------------------------


class AdmitTable(NamedTuple):
  """Admitted (group, metric) cells per step interval: `mask[i]` holds on `[start[i], stop[i])`."""

  start: np.ndarray  # int32 [I]
  stop: np.ndarray  # int32 [I]
  mask: np.ndarray  # bool [I, G, M]


def admit_table(overrides: Iterable[Override], group_names: Sequence[str]) -> AdmitTable:
  """Encode verified overrides for the jitted step (one row per step interval of each token)."""
  starts, stops, masks = [], [], []
  for o in overrides:
    if not isinstance(o, Override):
      raise OverrideError(
        f"expected a verified Override, got {type(o).__name__}; run aqgov.entropy.admit_override(token, trust, run_id) first"
      )
    unknown = [g for g in o.groups if g not in group_names]
    if unknown:
      raise OverrideError(
        f"override {o.id[:16]}... names group(s) {unknown} that the compiled policy does not have "
        f"(groups: {list(group_names)})"
      )
    cell = np.zeros((len(group_names), len(METRICS)), bool)
    for g in o.groups:
      for m in o.metrics:
        cell[group_names.index(g), METRICS.index(m)] = True
    for lo, hi in o.steps:
      starts.append(lo)
      stops.append(hi)
      masks.append(cell)
  mask = np.stack(masks) if masks else np.zeros((0, len(group_names), len(METRICS)), bool)
  return AdmitTable(np.asarray(starts, np.int32), np.asarray(stops, np.int32), mask)


def admit_mask(table: AdmitTable, step: Any) -> jnp.ndarray:
  """bool [G, M]: the cells admitted at `step` (traced)."""
  if table.mask.shape[0] == 0:
    return jnp.zeros(table.mask.shape[1:], bool)
  live = (jnp.asarray(table.start) <= step) & (step < jnp.asarray(table.stop))
  return jnp.any(live[:, None, None] & jnp.asarray(table.mask), axis=0)


def host_mask(overrides: Iterable[Override], group_names: Sequence[str], step: int) -> np.ndarray:
  """bool [G, M] for one step, computed on the host (pass as `override_mask=` to the update)."""
  table = admit_table(overrides, group_names)
  live = (table.start <= step) & (step < table.stop)
  return np.any(table.mask[live], axis=0) if live.any() else np.zeros(table.mask.shape[1:], bool)
