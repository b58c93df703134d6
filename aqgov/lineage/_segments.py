"""Lineage files: framed segment files and the reader that checks them.

Layout of a lineage directory:

    segments/<first seq, 12 digits>.seg   header b"AQGOVLG1" + u64 first seq, then frames
    heads.seg                             header b"AQGOVHD1" + u64 0, then frames of signed heads

A frame is `u32 little-endian length | payload | SHA-256(payload)`. The trailing digest makes a
torn write detectable: after a crash the last frame of the last segment may be incomplete (fewer
bytes than its length says), and readers report it as a torn tail instead of a bad record. A
complete frame whose digest does not match is never torn: it was altered.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from collections.abc import Collection, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from aqgov.errors import LineageError
from aqgov.lineage import _record as rec

SEGMENT_MAGIC = b"AQGOVLG1"
HEADS_MAGIC = b"AQGOVHD1"
MAX_FRAME = 1 << 28

HEADER = struct.Struct("<8sQ")
_LEN = struct.Struct("<I")
_DIGEST = 32
_CHUNK = 256  # frames hashed per task when hashing runs on a thread pool

Buffer = bytes | mmap.mmap  # a file's bytes, read or memory-mapped


class TornTail(NamedTuple):
  """Bytes at the end of a file that do not form a complete frame (an interrupted write)."""

  path: str
  offset: int
  nbytes: int


def frame(payload: bytes) -> bytes:
  """`payload` framed: its length, its bytes, their SHA-256."""
  return b"".join(frame_parts(payload, hashlib.sha256(payload).digest()))


def frame_parts(payload: bytes, digest: bytes) -> tuple[bytes, bytes, bytes]:
  """The three pieces of `payload`'s frame given its SHA-256 `digest` (for `os.writev`, which
  writes them without joining them into one copy first)."""
  return _LEN.pack(len(payload)), payload, digest


def segment_name(first_seq: int) -> str:
  """File name of the segment whose first record is `first_seq`."""
  return f"{first_seq:012d}.seg"


def write_all(fd: int, data: bytes) -> None:
  """Write all of `data` to `fd` (one `os.write` may write less)."""
  view = memoryview(data)
  while view:
    n = os.write(fd, view)
    view = view[n:]


def write_parts(fd: int, parts: Sequence[bytes]) -> int:
  """Write `parts` to `fd` back to back with one `os.writev` (finishing a short write with
  `write_all`); the number of bytes written."""
  total = sum(len(p) for p in parts)
  n = os.writev(fd, parts)
  if n < total:
    write_all(fd, b"".join(parts)[n:])
  return total


class _Framing(NamedTuple):
  """Where the complete frames of a file start, and how the file ends."""

  starts: list[int]
  problem: (
    LineageError | None
  )  # raised when iteration reaches it (so earlier bad records come first)
  torn: TornTail | None


def _framing(data: Buffer, path: Path, what: str, first_index: int, may_tear: bool) -> _Framing:
  """Walk the length prefixes (cheap); digests are checked later, in order."""
  starts: list[int] = []
  off, index, size = HEADER.size, first_index, len(data)
  while off < size:
    remaining = size - off
    n = _LEN.unpack_from(data, off)[0] if remaining >= _LEN.size else None
    at = index if what == "record" else None
    if n is not None and n > MAX_FRAME:
      return _Framing(
        starts,
        LineageError(
          f"{what} {index}: frame length {n} is implausible ({path.name} at byte "
          f"{off}); the file was altered",
          index=at,
        ),
        None,
      )
    if n is None or remaining < _LEN.size + n + _DIGEST:
      if not may_tear:
        return _Framing(
          starts,
          LineageError(
            f"{what} {index}: {path.name} ends inside a frame but later segments "
            "follow; the file was truncated or altered",
            index=at,
          ),
          None,
        )
      return _Framing(starts, None, TornTail(str(path), off, remaining))
    starts.append(off)
    off += _LEN.size + n + _DIGEST
    index += 1
  return _Framing(starts, None, None)


def _digests(view: memoryview, starts: Sequence[int]) -> list[bytes]:
  """SHA-256 of each frame's payload (hashlib releases the GIL, so chunks hash in parallel)."""
  out = []
  for off in starts:
    n = _LEN.unpack_from(view, off)[0]
    out.append(hashlib.sha256(view[off + _LEN.size : off + _LEN.size + n]).digest())
  return out


def frames(
  data: Buffer,
  path: Path,
  what: str,
  first_index: int,
  may_tear: bool,
  pool: ThreadPoolExecutor | None = None,
) -> Generator[tuple[int, memoryview, bytes], None, TornTail | None]:
  """(index, payload, digest) for each complete frame, digests checked; returns the TornTail (or None)."""
  framing = _framing(data, path, what, first_index, may_tear)
  view = memoryview(data)
  starts = framing.starts
  chunks = [starts[i : i + _CHUNK] for i in range(0, len(starts), _CHUNK)]
  futures = [pool.submit(_digests, view, c) for c in chunks] if pool is not None else None
  index = first_index
  for k, chunk in enumerate(chunks):
    digests = futures[k].result() if futures is not None else _digests(view, chunk)
    for off, digest in zip(chunk, digests, strict=True):
      n = _LEN.unpack_from(view, off)[0]
      if digest != view[off + _LEN.size + n : off + _LEN.size + n + _DIGEST]:
        raise LineageError(
          f"{what} {index}: bytes do not match their frame digest ({path.name} at byte {off}); "
          "the record was altered or corrupted",
          index=index if what == "record" else None,
        )
      yield index, view[off + _LEN.size : off + _LEN.size + n], digest
      index += 1
  if framing.problem is not None:
    raise framing.problem
  return framing.torn


def _map(path: Path) -> Buffer:
  """The file's bytes, memory-mapped read-only (no copy; the page cache backs them)."""
  try:
    fh = open(path, "rb")
  except OSError as exc:
    raise LineageError(f"cannot read lineage segment {path}: {exc.strerror or exc}") from None
  with fh:
    size = os.fstat(fh.fileno()).st_size
    if size == 0:
      return b""
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(fh.fileno(), size, flags=flags, prot=mmap.PROT_READ)


def read_header(data: Buffer, path: Path, magic: bytes, may_tear: bool) -> int | None:
  """The first seq a file's header names; None if the header was torn as the file was created."""
  if len(data) < HEADER.size:
    if may_tear and magic.startswith(data[: len(magic)]):
      return None  # the file was being created when the process died
    raise LineageError(f"{path} is too short to be an aqgov lineage file")
  m, first = HEADER.unpack_from(data, 0)
  if m != magic:
    raise LineageError(f"{path} is not an aqgov lineage file (bad magic {m!r})")
  return first


def first_record(lineage_dir: str | os.PathLike) -> rec.Record | None:
  """Record 0 of a log (its run-start), read without the rest of the log: frame digest, envelope
  and kind checked; None when the log holds no complete record. The chain after it is not checked
  (`LogReader` does that)."""
  segs = sorted((Path(lineage_dir) / "segments").glob("*.seg"))
  if not segs or segs[0].name != segment_name(0):
    return None
  path = segs[0]
  try:
    with open(path, "rb") as fh:
      head = fh.read(HEADER.size + _LEN.size)
      if len(head) < HEADER.size + _LEN.size or read_header(head, path, SEGMENT_MAGIC, True) != 0:
        return None
      n = _LEN.unpack_from(head, HEADER.size)[0]
      if n > MAX_FRAME:
        raise LineageError(f"record 0: frame length {n} is implausible ({path.name})", index=0)
      rest = fh.read(n + _DIGEST)
  except OSError as exc:
    raise LineageError(f"cannot read lineage segment {path}: {exc.strerror or exc}") from None
  if len(rest) < n + _DIGEST:
    return None
  payload, digest = rest[:n], hashlib.sha256(rest[:n]).digest()
  if digest != rest[n:]:
    raise LineageError(
      f"record 0: bytes do not match their frame digest ({path.name}); the record was altered",
      index=0,
    )
  r = rec.decode_record(payload, 0, digest=digest)
  if r.kind != rec.RUN_START or r.seq != 0 or r.prev != rec.GENESIS:
    raise LineageError(f"record 0 is a {r.kind!r} record, not run-start", index=0)
  return r


class LogReader:
  """Iterates a lineage directory's records, checking each frame digest, envelope, seq and chain link.

  The first inconsistency raises `LineageError(index=i)` naming the first bad record: altered bytes,
  a deleted, duplicated, reordered or inserted record, a missing segment. An incomplete final
  frame is not an error; after iteration `torn` says where it is (None if there is none).
  """

  def __init__(self, lineage_dir: str | os.PathLike, *, bodies: Collection[str] | None = None):
    self.dir = Path(lineage_dir)
    self.bodies = bodies  # kinds whose bodies are kept (None: all); others come with an empty body
    self.torn: TornTail | None = None
    self.size = 0
    self.last_hash = rec.GENESIS

  def segments(self) -> list[Path]:
    """The segment files, in order."""
    seg_dir = self.dir / "segments"
    if not seg_dir.is_dir():
      raise LineageError(
        f"{self.dir} holds no lineage (no segments/ directory); is this a run's lineage/ dir?"
      )
    return sorted(seg_dir.glob("*.seg"))

  def __iter__(self) -> Iterator[rec.Record]:
    with ThreadPoolExecutor(
      max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="aqgov-verify"
    ) as pool:
      yield from self._records(pool)

  def _records(self, pool: ThreadPoolExecutor) -> Iterator[rec.Record]:
    segs = self.segments()
    expected, prev, prev2 = 0, rec.GENESIS, None
    payload = None
    for k, path in enumerate(segs):
      last = k == len(segs) - 1
      data = _map(path)
      first = read_header(data, path, SEGMENT_MAGIC, last)
      if first is None:
        self.torn = TornTail(str(path), 0, len(data))
        break
      if first != expected or path.name != segment_name(first):
        raise LineageError(
          f"record {expected}: segment {path.name} starts at record {first} but {expected} records precede it; "
          "a segment was deleted, renamed or added",
          index=expected,
        )
      gen = frames(data, path, "record", expected, last, pool)
      while True:
        try:
          index, payload, digest = next(gen)
        except StopIteration as stop:
          self.torn = stop.value
          break
        r = rec.decode_record(payload, index, digest=digest, bodies=self.bodies)
        if r.prev != prev:
          if digest == prev:
            raise LineageError(f"record {index} duplicates record {index - 1}", index=index)
          if prev2 is not None and r.prev == prev2:
            raise LineageError(
              f"record {index - 1} is not part of the chain: record {index} links to record "
              f"{index - 2} (a record was inserted at {index - 1})",
              index=index - 1,
            )
          raise LineageError(
            f"record {index} does not link to record {index - 1} (chain broken: a record was "
            "deleted, reordered or altered here)",
            index=index,
          )
        if r.seq != index:
          raise LineageError(
            f"record {index} carries sequence number {r.seq}; records were deleted, reordered "
            "or inserted",
            index=index,
          )
        if (index == 0) != (r.kind == rec.RUN_START):
          raise LineageError(
            f"record {index} is a {r.kind!r} record; a log starts with exactly one run-start",
            index=index,
          )
        yield r
        prev2, prev = prev, digest
        expected = index + 1
      gen = payload = None  # release the views into the mapping so that it can be closed now
      if isinstance(data, mmap.mmap):
        data.close()
      if self.torn is not None and not last:
        raise LineageError(
          f"record {expected}: torn frame in {path.name}, which is not the last segment",
          index=expected,
        )
    self.size, self.last_hash = expected, prev


def records(
  lineage_dir: str | os.PathLike,
  kinds: Sequence[str] | None = None,
  start: int = 0,
  stop: int | None = None,
) -> Iterator[tuple[int, str, dict]]:
  """(index, kind, body) of each record in [`start`, `stop`) (of the given kinds), with the reader's checks;
  no body from `stop` on is decoded (an unsigned tail is never read)."""
  want = None if kinds is None else set(kinds)
  for r in LogReader(lineage_dir, bodies=want):
    if stop is not None and r.seq >= stop:
      return
    if r.seq >= start and (want is None or r.kind in want):
      yield r.seq, r.kind, r.body
