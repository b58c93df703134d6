"""A checkpoint directory checked against its lineage record without restoring it (no Orbax).

`files_sha256(dir)` commits to every byte of a finished checkpoint: per regular file, in sorted
order of its path relative to `dir`, the canonical msgpack of `[path, size]` then its bytes. Orbax
never rewrites a finalised checkpoint, so the digest taken right after the save stays valid; the
"checkpoint" record carries it. `check_checkpoint_files` recomputes it and compares the
checkpoint's `lineage` item (run id, step, log head, item digests) with what the log says.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

from aqgov.documents import _canonical as canonical
from aqgov.errors import LineageError
from aqgov.lineage._heads import LogHead

LINEAGE_ITEM = "lineage"
ITEMS = ("params", "opt_state", "governance")


def files_sha256(directory: str | os.PathLike) -> str:
  """Hex SHA-256 over the relative paths, sizes and bytes of every file under `directory`."""
  root = Path(directory)
  paths = sorted(
    (p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).as_posix()
  )
  h = hashlib.sha256()
  for p in paths:
    data = p.read_bytes()
    h.update(canonical.encode([p.relative_to(root).as_posix(), len(data)]))
    h.update(data)
  return h.hexdigest()


def read_lineage_item(directory: str | os.PathLike) -> dict:
  """The `lineage` item Orbax wrote into a checkpoint (a JSON map)."""
  path = Path(directory) / LINEAGE_ITEM / "metadata"
  try:
    out = json.loads(path.read_bytes())
  except (OSError, ValueError) as exc:
    raise LineageError(
      f"{path} is not a readable lineage item ({exc}); the checkpoint is damaged"
    ) from None
  if not isinstance(out, dict):
    raise LineageError(f"{path} holds no lineage map; the checkpoint is damaged")
  return out


def check_checkpoint_files(
  directory: str | os.PathLike,
  *,
  index: int,
  step: int,
  run_id: str,
  head: LogHead,
  files_digest: str,
  digests: Mapping[str, str],
) -> None:
  """Raise `LineageError` (naming record `index`) unless the checkpoint at `directory` hashes to
  `files_digest` and its lineage item names this run, `step`, the log `head` and the item `digests`."""
  d = Path(directory)
  got = files_sha256(d)
  if got != files_digest:
    raise LineageError(
      f"record {index}: the checkpoint at step {step} ({d}) hashes to {got[:16]}... but the record "
      f"says {files_digest[:16]}...: its files were altered or replaced after it was recorded",
      index=index,
    )
  item = read_lineage_item(d)
  expected = {"run_id": run_id, "step": step, **head.to_wire(), "digests": dict(digests)}
  for field, value in expected.items():
    if item.get(field) != value:
      raise LineageError(
        f"record {index}: the checkpoint at step {step} ({d}) says {field} = {item.get(field)!r}, "
        f"the log says {value!r}: it was taken from another run or log position",
        index=index,
      )
