"""Signed tree heads: where a log stands, signed by the run's key, kept in `heads.seg`.

Every `head_every` records, at `flush(sign_head=True)` and at close, the writer signs a tree head
(a `SignedDocument` of kind "lineage-tree-head": run id, size, root, hash of the last record, id
of the previous head, time). The Merkle tree's leaves are the 32-byte record hashes (leaf hash
`SHA-256(0x00 || record hash)`); its root is kept incrementally with `aqgov.documents.CompactRange`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from aqgov.documents import _signing as signing
from aqgov.errors import LineageError, SignatureError
from aqgov.lineage._segments import HEADS_MAGIC, TornTail, frames, read_header

HEAD_KIND = "lineage-tree-head"


class LogHead(NamedTuple):
  """Where a log stands: record count, Merkle root and hash of the last record."""

  size: int
  root: bytes
  last_record: bytes

  def to_wire(self) -> dict[str, Any]:
    """The head as a signed head's payload carries it."""
    return {"size": self.size, "root": self.root.hex(), "last_record": self.last_record.hex()}

  @classmethod
  def from_wire(cls, w: Mapping[str, Any]) -> LogHead:
    """The head a signed head's payload describes."""
    return cls(int(w["size"]), bytes.fromhex(w["root"]), bytes.fromhex(w["last_record"]))


def head_payload(run_id: str, head: LogHead, prev_head: str | None, time_s: float | None = None) -> dict[str, Any]:
  """The payload of a tree head for `head`, chained to the head with id `prev_head`."""
  return {"run_id": run_id, **head.to_wire(), "prev_head": prev_head,
          "time": time.time() if time_s is None else float(time_s)}


def read_heads(lineage_dir: str | os.PathLike) -> tuple[list[signing.SignedDocument], TornTail | None]:
  """The signed tree heads in order, and the torn tail of the heads file (if any)."""
  path = Path(lineage_dir) / "heads.seg"
  if not path.exists():
    return [], None
  data = path.read_bytes()
  if read_header(data, path, HEADS_MAGIC, True) is None:
    return [], TornTail(str(path), 0, len(data))
  heads = []
  gen = frames(data, path, "tree head", 0, True)
  while True:
    try:
      index, payload, _ = next(gen)
    except StopIteration as stop:
      return heads, stop.value
    try:
      heads.append(signing.SignedDocument.from_bytes(bytes(payload), kind=HEAD_KIND))
    except SignatureError as exc:
      raise LineageError(f"tree head {index}: {exc}") from None
