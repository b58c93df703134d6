"""Bodies of the records other than "step": run-start, checkpoint, run-resume, event, escalation,
override and run-end, as plain canonical-encodable maps (the schema is docs/lineage-schema.md)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import numpy as np

from aqgov.lineage._record import array_to_wire, with_rejected

if TYPE_CHECKING:
  from aqgov.entropy import Event


class DocRef(NamedTuple):
  """A signed document copied into the run directory: its kind, id, file digest and relative path
  (fields in `_record._DOCREF_FIELDS` order, which the run-start schema checks)."""

  kind: str
  id: str
  sha256: str
  file: str

  def to_wire(self) -> dict:
    return self._asdict()


class ParentRef(NamedTuple):
  """The parent run's signed tree head this run continues from (pretraining -> fine-tuning -> ...)."""

  run_id: str
  head_id: str
  size: int
  root: str
  dir: str

  def to_wire(self) -> dict:
    return self._asdict()


def run_start_body(
  *,
  run_id: str,
  signer: str,
  groups: Sequence[str],
  classes: Sequence[str] = (),
  policies: Sequence[DocRef] = (),
  profiles: Sequence[DocRef] = (),
  manifests: Sequence[DocRef] = (),
  trust: Sequence[str] = (),
  parent: ParentRef | None = None,
  task: str | None = None,
  task_config: Mapping[str, Any] | None = None,
  config: Mapping[str, Any] | None = None,
  time_s: float | None = None,
) -> dict:
  """Body of the "run-start" record."""
  return {
    "run_id": run_id,
    "time": time.time() if time_s is None else float(time_s),
    "signer": signer,
    "trust": sorted(trust),
    "groups": list(groups),
    "classes": list(classes),
    "policies": [p.to_wire() for p in policies],
    "profiles": [p.to_wire() for p in profiles],
    "manifests": [m.to_wire() for m in manifests],
    "parent": None if parent is None else parent.to_wire(),
    "config": {"task": task, "task_config": dict(task_config or {}), **dict(config or {})},
  }


def checkpoint_body(
  *,
  step: int,
  params_sha256: str,
  path: str,
  lineage_size: int,
  lineage_root: str,
  digests: Mapping[str, str] | None = None,
  files_sha256: str | None = None,
  time_s: float | None = None,
) -> dict:
  """Body of a "checkpoint" record (written after the checkpoint is durable): `digests` are the hex
  SHA-256 of each saved state item, `files_sha256` that of the finished checkpoint's files."""
  body = {
    "step": int(step),
    "params_sha256": params_sha256,
    "path": path,
    "lineage_size": int(lineage_size),
    "lineage_root": lineage_root,
    "time": time.time() if time_s is None else float(time_s),
  }
  if digests is not None:
    body["digests"] = {str(k): str(v) for k, v in digests.items()}
  if files_sha256 is not None:
    body["files_sha256"] = files_sha256
  return body


def resume_body(
  *,
  checkpoint_step: int,
  checkpoint_record: int | None,
  superseded: tuple[int, int],
  time_s: float | None = None,
) -> dict:
  """Body of a "run-resume" record: records in `superseded` [start, end) no longer describe the params."""
  return {
    "checkpoint_step": int(checkpoint_step),
    "checkpoint_record": checkpoint_record,
    "superseded": [int(superseded[0]), int(superseded[1])],
    "time": time.time() if time_s is None else float(time_s),
  }


def event_body(
  *,
  step: int,
  events: Mapping[str, Any],
  rejected: Sequence[Any] = (),
  time_s: float | None = None,
) -> dict:
  """Body of an "event" record: governance events noticed on the host at `step`; `rejected` are
  examples refused at admission outside any step (a batch refused whole: no update was taken)."""
  body = {
    "step": int(step),
    "events": _plain(events),
    "time": time.time() if time_s is None else float(time_s),
  }
  return with_rejected(body, rejected)


def escalation_body(
  *,
  step: int,
  message: str,
  events: Sequence[Event] = (),
  checkpoint_step: int | None = None,
  time_s: float | None = None,
) -> dict:
  """Body of an "escalation" record: training stopped for a human at `step`."""
  return {
    "step": int(step),
    "message": str(message),
    "events": _plain(events),
    "checkpoint_step": checkpoint_step,
    "time": time.time() if time_s is None else float(time_s),
  }


def override_body(
  *, step: int, token_kind: str, token_id: str, token: bytes, time_s: float | None = None
) -> dict:
  """Body of an "override" record: a signed override token admitted at `step`, kept verbatim."""
  return {
    "step": int(step),
    "token_kind": token_kind,
    "token_id": token_id,
    "token": bytes(token),
    "time": time.time() if time_s is None else float(time_s),
  }


def run_end_body(*, step: int, status: str, time_s: float | None = None) -> dict:
  """Body of the "run-end" record."""
  return {
    "step": int(step),
    "status": status,
    "time": time.time() if time_s is None else float(time_s),
  }


def _plain(value: Any) -> Any:
  """Host values of any shape as canonical-encodable values: NamedTuples and mappings as maps,
  arrays as `{"dtype", "shape", "data"}`, non-finite floats as their text."""
  if hasattr(value, "_asdict"):
    return {k: _plain(v) for k, v in value._asdict().items()}
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    return array_to_wire(np.asarray(value))
  if isinstance(value, float) and not np.isfinite(value):
    return str(value)
  if value is None or isinstance(value, (bool, int, float, str, bytes)):
    return value
  return str(value)
