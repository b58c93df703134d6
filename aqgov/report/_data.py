"""What an audit report shows, read from a run directory: verification, steps, classes, checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from aqgov.documents._keys import TrustStore
from aqgov.entropy._profile import Bound
from aqgov.errors import AqgovError, ReportError
from aqgov.lineage import _history as hist
from aqgov.lineage import _record as rec
from aqgov.lineage._export import verify_envelope
from aqgov.lineage._query import RunDescription, describe
from aqgov.lineage._segments import records
from aqgov.lineage._verify import VerifyReport, lineage_dir, verify_lineage
from aqgov.lineage._views import Event, profile_bounds
from aqgov.lineage._views import step_events as _events

# key of an "event" record body's events: [{"example_id", "reason"}, ...] (logs written before
# refusals had their own `rejected` field, which steps and events now carry)
ADMISSION = "admission"


class Verification(NamedTuple):
  """The outcome of `verify_lineage` with the auditor's trust: a report, or the error it raised."""

  report: VerifyReport | None
  error: str | None
  keys: tuple[tuple[str, str, str], ...]  # (name, key id, roles) of each trusted key


class Series(NamedTuple):
  """Per effective step: reach and mean contribution per group, loss, measurements."""

  steps: np.ndarray  # [S]
  reach: np.ndarray  # [S, G] examples with weight > 0
  contribution: np.ndarray  # [S, G] mean contribution norm of those examples (NaN: none)
  loss: np.ndarray  # [S]
  measurements: dict[str, np.ndarray]  # "<metric>/<group>" -> [S] (mean over heads)


class ClassTable(NamedTuple):
  """The route class x group weights the signed steps recorded (NaN: the class was never taken)."""

  classes: tuple[str, ...]
  groups: tuple[str, ...]
  weights: np.ndarray  # [C, G]
  examples: np.ndarray  # [C] rows that took the class
  unseen: np.ndarray  # [C, G] the class's examples did not see the group (visible = "routed")


class Refusal(NamedTuple):
  """An example given to a step but not trained on, with the recorded reason if any."""

  step: int
  example_id: str
  reason: str


class Attestation(NamedTuple):
  """An attestation file: its digest and, when a trusted key signed it, its statement."""

  path: str
  sha256: str
  statement: dict | None
  error: str | None


class ReportData(NamedTuple):
  """Everything the page renders."""

  run_dir: Path
  verification: Verification
  description: RunDescription
  series: Series
  table: ClassTable
  events: tuple[Event, ...]
  bounds: tuple[Bound, ...]
  refusals: tuple[Refusal, ...]
  escalations: tuple[dict, ...]
  attestation: Attestation | None


def verification(run_dir: Path, trust: TrustStore, **options: Any) -> Verification:
  """`verify_lineage(run_dir, trust, **options)`, its error kept as text instead of raised."""
  keys = tuple(
    sorted((k.name, k.key_id, ",".join(trust.roles(k.key_id))) for k in trust.keys.values())
  )
  try:
    return Verification(verify_lineage(run_dir, trust, **options), None, keys)
  except AqgovError as exc:
    return Verification(None, f"{type(exc).__name__}: {exc}", keys)


def attestation(path: str | os.PathLike, trust: TrustStore) -> Attestation:
  """The digest of the DSSE envelope at `path` and its statement if a trusted key signed it."""
  p = Path(path)
  try:
    data = p.read_bytes()
  except OSError as exc:
    raise ReportError(
      f"cannot read attestation {p}: {exc.strerror or exc}; pass the file "
      "`aqgov lineage export --intoto` wrote"
    ) from None
  try:
    return Attestation(
      str(p), hashlib.sha256(data).hexdigest(), verify_envelope(json.loads(data), trust), None
    )
  except (ValueError, AqgovError) as exc:
    return Attestation(str(p), hashlib.sha256(data).hexdigest(), None, str(exc))


def collect(
  run_dir: str | os.PathLike,
  trust: TrustStore,
  *,
  attestation_path: str | os.PathLike | None = None,
  **verify_options: Any,
) -> ReportData:
  """Read the report's data from the signed part of the run's lineage (see `aqgov.lineage.history`)."""
  root, ldir = lineage_dir(run_dir)
  checked = verification(root, trust, **verify_options)
  desc = describe(root)
  _, history = hist.load(ldir)
  start = desc.start
  groups, classes = tuple(start["groups"]), tuple(start.get("classes", ()))
  g = len(groups)
  steps, reach, contrib, loss = [], [], [], []
  measured: dict[str, list[float]] = {}
  weight_sum, rows_per_class, unseen = {}, {}, {}
  events: list[Event] = []
  refusals: list[Refusal] = []
  escalations: list[dict] = []
  for index, kind, body in records(ldir, kinds=(rec.STEP, rec.EVENT, rec.ESCALATION)):
    if index >= history.size:
      break  # the unsigned tail is never read
    if not history.effective(index):
      continue
    if kind == rec.EVENT:
      refusals.extend(
        Refusal(int(body["step"]), r.example_id, f"{r.reason} (batch refused whole, no update)")
        for r in rec.rejected_of(body)
      )
      for r in (
        body.get("events", {}).get(ADMISSION, ()) if isinstance(body.get("events"), Mapping) else ()
      ):
        if isinstance(r, Mapping):
          refusals.append(
            Refusal(int(body["step"]), str(r.get("example_id")), str(r.get("reason", "")))
          )
      continue
    if kind == rec.ESCALATION:
      escalations.append({"step": int(body["step"]), "message": str(body["message"])})
      continue
    view = rec.view_step(body, index, g)
    w, n = view.weights.astype(np.float64), view.contribution_norms.astype(np.float64)
    hit = w > 0
    steps.append(view.step)
    loss.append(view.loss)
    reach.append(hit.sum(axis=0))
    with np.errstate(invalid="ignore"):
      contrib.append(np.where(hit.any(axis=0), (n * hit).sum(axis=0) / hit.sum(axis=0), np.nan))
    for key in set(measured) | set(view.measurements):
      v = view.measurements.get(key)
      value = float(np.nanmean(v)) if v is not None and np.isfinite(v).any() else float("nan")
      measured.setdefault(key, [float("nan")] * (len(steps) - 1)).append(value)
    for c in np.unique(view.route_class):
      rows = view.route_class == c
      weight_sum[int(c)] = weight_sum.get(int(c), np.zeros(g)) + w[rows].sum(axis=0)
      rows_per_class[int(c)] = rows_per_class.get(int(c), 0) + int(rows.sum())
      unseen[int(c)] = unseen.get(int(c), np.zeros(g, bool)) | ~view.seen[rows].all(axis=0)
    events.extend(_events(view, groups))
    refusals.extend(Refusal(view.step, r.example_id, str(r.reason)) for r in view.rejected)
    refusals.extend(Refusal(view.step, e, "left out of the batch") for e in view.left_out)
  n_classes = max([len(classes)] + [c + 1 for c in rows_per_class])
  names = classes + tuple(f"class {c}" for c in range(len(classes), n_classes))
  table = ClassTable(
    names,
    groups,
    np.full((n_classes, g), np.nan),
    np.zeros(n_classes, np.int64),
    np.zeros((n_classes, g), bool),
  )
  for c, total in weight_sum.items():
    table.weights[c] = total / rows_per_class[c]
    table.examples[c] = rows_per_class[c]
    table.unseen[c] = unseen[c]
  series = Series(
    np.asarray(steps, np.int64),
    np.asarray(reach, np.int64).reshape(-1, g),
    np.asarray(contrib, np.float64).reshape(-1, g),
    np.asarray(loss, np.float64),
    {k: np.asarray(v, np.float64) for k, v in sorted(measured.items())},
  )
  att = None if attestation_path is None else attestation(attestation_path, trust)
  return ReportData(
    root,
    checked,
    desc,
    series,
    table,
    tuple(events),
    profile_bounds(root, start),
    tuple(refusals),
    tuple(escalations),
    att,
  )
