"""The effective history of a run: which records still describe the params after resumes.

Resume rule. A run resumes from its latest checkpoint that the lineage records (a "checkpoint"
record, written only after the checkpoint was complete). Steps recorded after that checkpoint
record happened, but their effect on the params was lost with the process, so the resumed run
appends a "run-resume" record naming the checkpoint and the range [checkpoint record + 1, resume
record) of superseded records, then continues the same chain: nothing is truncated or rewritten,
no record is duplicated, and the re-executed steps get new records after the resume record.
Replay, queries and exports use only effective records (not inside any superseded range);
`include_superseded` in queries shows what the lost steps did.

Signed part. Only records a signed tree head covers count: records after the last head whose
signature (by the run-start signer, its public key read from the run's keys/) and root check out
are an *unsigned tail*, which anyone can append without a key. Queries, descriptions and exports
read `History.size` records and never the tail, so a forged record (a "run-resume" superseding
everything, say) cannot change what they report; `verify_lineage` reports the tail.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from aqgov.documents._document_type import verify
from aqgov.documents._keys import load_public_key
from aqgov.errors import KeyFileError, LineageError, SignatureError
from aqgov.lineage import _record as rec
from aqgov.lineage import _scan as logscan
from aqgov.lineage._heads import HEAD, read_heads, run_trust


class CheckpointRef(NamedTuple):
  """A "checkpoint" record: where the checkpoint is and what its params hash to."""

  index: int
  step: int
  params_sha256: str
  path: str
  lineage_size: int
  lineage_root: str
  digests: Mapping[str, str] | None = (
    None  # item -> hex SHA-256 ("params", "opt_state", "governance")
  )
  files_sha256: str | None = None  # hex SHA-256 of the checkpoint directory's files


class History(NamedTuple):
  """Superseded record ranges and the effective checkpoint records of the first `size` records."""

  size: int
  superseded: tuple[tuple[int, int], ...]
  checkpoints: tuple[CheckpointRef, ...]

  def effective(self, index: int) -> bool:
    """Record `index` counts: it is among the first `size` records and in no superseded range."""
    return index < self.size and not any(a <= index < b for a, b in self.superseded)

  def checkpoint_at(self, step: int) -> CheckpointRef | None:
    """The effective checkpoint record for `step` (the latest one if several)."""
    found = [c for c in self.checkpoints if c.step == step]
    return found[-1] if found else None


def history(scan: logscan.LogScan, size: int | None = None) -> History:
  """History of the first `size` records (all by default) from a scan that decoded the "checkpoint"
  and "run-resume" bodies."""
  size = scan.size if size is None else int(size)
  superseded = tuple(
    (int(b["superseded"][0]), int(b["superseded"][1]))
    for i, b in scan.of_kind(rec.RUN_RESUME)
    if i < size and b["superseded"][0] < b["superseded"][1]
  )
  refs = []
  for i, b in scan.of_kind(rec.CHECKPOINT):
    if i < size and not any(a <= i < e for a, e in superseded):
      refs.append(checkpoint_ref(i, b))
  return History(size, superseded, tuple(refs))


def checkpoint_ref(index: int, body: Mapping) -> CheckpointRef:
  digests = body.get("digests")
  return CheckpointRef(
    index,
    int(body["step"]),
    str(body["params_sha256"]),
    str(body["path"]),
    int(body["lineage_size"]),
    str(body["lineage_root"]),
    None if digests is None else {str(k): str(v) for k, v in digests.items()},
    None if body.get("files_sha256") is None else str(body["files_sha256"]),
  )


def _run_key(lineage_dir: Path, signer: str):
  for path in sorted((lineage_dir.parent / "keys").glob("*.pub")):
    try:
      key = load_public_key(path)
    except KeyFileError:
      continue
    if key.key_id == signer:
      return key
  raise LineageError(
    f"the run's public key (signer {signer[:16]}...) is not in {lineage_dir.parent / 'keys'}; "
    "only records a signed head covers are read, so the key is needed to check the heads: "
    "copy the run's .pub there"
  )


def signed_size(lineage_dir: Path, scan: logscan.LogScan, heads) -> int:
  """How many records the last valid signed head covers (see "Signed part" in the module doc)."""
  if not heads or scan.size == 0:
    return 0
  trust = run_trust(_run_key(lineage_dir, scan.bodies[0]["signer"]))
  for h in reversed(heads):
    size = int(h.payload.get("size", -1))
    if not 0 < size <= scan.size or size not in scan.roots:
      continue
    if bytes.fromhex(h.payload["root"]) != scan.roots[size] or bytes.fromhex(
      h.payload["last_record"]
    ) != scan.record_hash(size - 1):
      continue
    try:
      verify(HEAD, h, trust)
    except SignatureError:
      continue
    return size
  return 0


def load(lineage_dir: str | os.PathLike) -> tuple[logscan.LogScan, History]:
  """Scan a lineage directory (checking its chain) and compute the history of its signed part."""
  d = Path(lineage_dir)
  heads, _ = read_heads(d)
  scan = logscan.scan(
    d,
    bodies=(rec.RUN_START, rec.CHECKPOINT, rec.RUN_RESUME, rec.RUN_END),
    roots_at=[int(h.payload.get("size", 0)) for h in heads],
    roots_before=(rec.CHECKPOINT,),
  )
  return scan, history(scan, signed_size(d, scan, heads))
