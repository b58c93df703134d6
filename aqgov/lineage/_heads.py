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
from aqgov.documents._document_type import DocumentType, register
from aqgov.documents._keys import RUN, PublicKey, SigningKey, TrustStore
from aqgov.errors import AqgovError, LineageError, SignatureError
from aqgov.lineage._segments import HEADS_MAGIC, TornTail, frames, read_header

HEAD_KIND = "lineage-tree-head"
# Signed tree heads are the only documents a run key signs.
HEAD: DocumentType[dict] = register(
  DocumentType(
    name="lineage-head",
    kind=HEAD_KIND,
    noun="lineage tree head",
    to_payload=dict,
    from_payload=dict,
    signer_roles=(RUN,),
    error=LineageError,
  )
)


def run_trust(key: PublicKey | SigningKey) -> TrustStore:
  """A trust store holding only the run's key, in the run role (whatever its file records)."""
  public = key.public if isinstance(key, SigningKey) else key
  return TrustStore.of([public._replace(roles=(RUN,))])


class LogHead(NamedTuple):
  """Where a log stands: record count, Merkle root and hash of the last record."""

  size: int
  root: bytes
  last_record: bytes

  def to_wire(self) -> dict[str, Any]:
    """The head as a signed head's payload carries it."""
    return {"size": self.size, "root": self.root.hex(), "last_record": self.last_record.hex()}

  @classmethod
  def from_wire(
    cls, w: Mapping[str, Any], error: type[AqgovError] = LineageError, what: str = "log head"
  ) -> LogHead:
    """The head a signed head's payload (or a checkpoint's lineage item) describes; `error` if malformed."""
    problem = head_problem(w)
    if problem:
      raise error(f"{what} is malformed: {problem}")
    return cls(w["size"], bytes.fromhex(w["root"]), bytes.fromhex(w["last_record"]))


def _hex32(v: Any) -> bool:
  return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def head_problem(w: Any) -> str | None:
  """What is wrong with a head's wire form (size, root, last_record), or None."""
  if not isinstance(w, Mapping):
    return f"expected a map, got {type(w).__name__}"
  size = w.get("size")
  if isinstance(size, bool) or not isinstance(size, int) or size < 0:
    return f"size must be a record count, got {size!r:.40}"
  for field in ("root", "last_record"):
    if not _hex32(w.get(field)):
      return f"{field} must be 64 lowercase hex digits (a SHA-256), got {w.get(field)!r:.80}"
  return None


def _payload_problem(p: Mapping[str, Any]) -> str | None:
  if not isinstance(p.get("run_id"), str):
    return "run_id must be a string"
  if p.get("prev_head") is not None and not isinstance(p.get("prev_head"), str):
    return "prev_head must be nil or a head id"
  return head_problem(p)


def head_payload(
  run_id: str, head: LogHead, prev_head: str | None, time_s: float | None = None
) -> dict[str, Any]:
  """The payload of a tree head for `head`, chained to the head with id `prev_head`."""
  return {
    "run_id": run_id,
    **head.to_wire(),
    "prev_head": prev_head,
    "time": time.time() if time_s is None else float(time_s),
  }


def read_heads(
  lineage_dir: str | os.PathLike,
) -> tuple[list[signing.SignedDocument], TornTail | None]:
  """The signed tree heads in order, and the torn tail of the heads file (if any)."""
  path = Path(lineage_dir) / "heads.seg"
  if not path.exists():
    return [], None
  try:
    data = path.read_bytes()
  except OSError as exc:
    raise LineageError(f"cannot read {path}: {exc.strerror or exc}") from None
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
      head = signing.SignedDocument.from_bytes(bytes(payload), kind=HEAD_KIND)
    except SignatureError as exc:
      raise LineageError(f"tree head {index}: {exc}") from None
    problem = _payload_problem(head.payload)
    if problem:
      raise LineageError(f"tree head {index} is malformed: {problem}; the heads file was altered")
    heads.append(head)
