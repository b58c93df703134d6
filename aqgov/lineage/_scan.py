"""One pass over a whole log: record hashes, Merkle roots and the bodies a caller asks for."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

from aqgov.documents import _merkle as merkle
from aqgov.lineage import _record as rec
from aqgov.lineage._heads import LogHead
from aqgov.lineage._progress import ProgressFn, report
from aqgov.lineage._segments import LogReader, TornTail


class LogScan(NamedTuple):
  """One pass over a log: hashes, the bodies asked for, and where it ends."""

  size: int
  record_hashes: bytes  # 32 bytes per record, concatenated
  leaf_hash_bytes: bytes  # the Merkle leaf hash of each record, concatenated
  kinds: tuple[str, ...]
  bodies: dict[int, dict]  # index -> body, for the kinds requested
  roots: dict[int, bytes]  # size -> Merkle root, for the sizes requested
  torn: TornTail | None
  compact: merkle.CompactRange  # the root accumulator after the last record
  roots_before: dict[
    int, bytes
  ]  # index -> Merkle root of the records before it, for the kinds requested

  def record_hash(self, index: int) -> bytes:
    """The hash of record `index`."""
    return self.record_hashes[32 * index : 32 * index + 32]

  def leaf_hashes(self, size: int | None = None) -> list[bytes]:
    """The Merkle leaf hashes of the first `size` records (all by default)."""
    n = self.size if size is None else size
    b = self.leaf_hash_bytes
    return [b[32 * i : 32 * i + 32] for i in range(n)]

  def head(self, size: int | None = None) -> LogHead:
    """Where the log stood after `size` records (at its end by default)."""
    n = self.size if size is None else size
    last = self.record_hash(n - 1) if n else rec.GENESIS
    root = self.roots.get(n) or merkle.root_from_leaf_hashes(self.leaf_hashes(n))
    return LogHead(n, root, last)

  def of_kind(self, kind: str) -> list[tuple[int, dict]]:
    """(index, body) of each record of `kind` whose body was kept."""
    return [(i, self.bodies[i]) for i, k in enumerate(self.kinds) if k == kind and i in self.bodies]


_PROGRESS_EVERY = 4096


def scan(
  lineage_dir: str | os.PathLike,
  *,
  bodies: Sequence[str] = (),
  roots_at: Sequence[int] = (),
  roots_before: Sequence[str] = (),
  check: Sequence[str] = (),
  progress: ProgressFn | None = None,
  expected: int | None = None,
) -> LogScan:
  """Read a whole log once (see `LogReader`), decoding the bodies of the kinds in `bodies`, keeping
  the Merkle roots at the sizes in `roots_at` (the final size is always kept) and the root just
  before each record of a kind in `roots_before`. Bodies of the kinds in `check` are decoded and
  checked against their schema (a step body's array shapes too: `check_step`), but not kept.
  `progress(records read, expected)` is called every few thousand records and at the end."""
  reader = LogReader(lineage_dir, bodies=set(bodies) | set(check))
  check = set(check) - set(bodies)
  hashes = bytearray()
  leaves = bytearray()
  kinds: list[str] = []
  decoded: dict[int, dict] = {}
  want_roots = set(int(s) for s in roots_at)
  roots: dict[int, bytes] = {}
  before: dict[int, bytes] = {}
  compact = merkle.CompactRange()
  if 0 in want_roots:
    roots[0] = compact.root
  want, want_before = set(bodies), set(roots_before)
  for r in reader:
    hashes += r.hash
    kinds.append(r.kind)
    if r.kind in want_before:
      before[r.seq] = compact.root
    leaf = merkle.leaf_hash(r.hash)
    leaves += leaf
    compact = compact.append(leaf)
    if compact.size in want_roots:
      roots[compact.size] = compact.root
    if r.kind in want:
      decoded[r.seq] = r.body
    elif r.kind in check:
      body = r.body  # decoded canonically, fields checked against the kind's schema
      if r.kind == rec.STEP:
        rec.check_step(body, r.seq, fields_checked=True)
    if progress is not None and compact.size % _PROGRESS_EVERY == 0:
      progress(compact.size, expected)
  report(progress, compact.size, expected)
  roots[compact.size] = compact.root
  return LogScan(
    reader.size,
    bytes(hashes),
    bytes(leaves),
    tuple(kinds),
    decoded,
    roots,
    reader.torn,
    compact,
    before,
  )
