"""The effective history of a run: which records still describe the params after resumes.

Resume rule. A run resumes from its latest checkpoint that the lineage records (a "checkpoint"
record, written only after the checkpoint was complete). Steps recorded after that checkpoint
record happened, but their effect on the params was lost with the process, so the resumed run
appends a "run-resume" record naming the checkpoint and the range [checkpoint record + 1, resume
record) of superseded records, then continues the same chain: nothing is truncated or rewritten,
no record is duplicated, and the re-executed steps get new records after the resume record.
Replay, queries and exports use only effective records (not inside any superseded range);
`include_superseded` in queries shows what the lost steps did.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import NamedTuple

from aqgov.lineage import _record as rec
from aqgov.lineage import _scan as logscan


class CheckpointRef(NamedTuple):
  """A "checkpoint" record: where the checkpoint is and what its params hash to."""

  index: int
  step: int
  params_sha256: str
  path: str
  lineage_size: int
  lineage_root: str


class History(NamedTuple):
  """Superseded record ranges and the effective checkpoint records, from one scan."""

  size: int
  superseded: tuple[tuple[int, int], ...]
  checkpoints: tuple[CheckpointRef, ...]

  def effective(self, index: int) -> bool:
    return not any(a <= index < b for a, b in self.superseded)

  def checkpoint_at(self, step: int) -> CheckpointRef | None:
    """The effective checkpoint record for `step` (the latest one if several)."""
    found = [c for c in self.checkpoints if c.step == step]
    return found[-1] if found else None


def history(scan: logscan.LogScan) -> History:
  """History from a scan that decoded the "checkpoint" and "run-resume" bodies."""
  superseded = tuple((int(b["superseded"][0]), int(b["superseded"][1])) for _, b in scan.of_kind(rec.RUN_RESUME)
                     if b["superseded"][0] < b["superseded"][1])
  refs = []
  for i, b in scan.of_kind(rec.CHECKPOINT):
    if not any(a <= i < e for a, e in superseded):
      refs.append(checkpoint_ref(i, b))
  return History(scan.size, superseded, tuple(refs))


def checkpoint_ref(index: int, body: Mapping) -> CheckpointRef:
  return CheckpointRef(index, int(body["step"]), str(body["params_sha256"]), str(body["path"]),
                       int(body["lineage_size"]), str(body["lineage_root"]))


def load(lineage_dir: str | os.PathLike) -> tuple[logscan.LogScan, History]:
  """Scan a lineage directory (checking its chain) and compute its history."""
  scan = logscan.scan(lineage_dir, bodies=(rec.RUN_START, rec.CHECKPOINT, rec.RUN_RESUME, rec.RUN_END),
                  roots_before=(rec.CHECKPOINT,))
  return scan, history(scan)
