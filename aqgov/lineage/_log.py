"""The append-only lineage log: framed segment files, an RFC 9162 Merkle tree, signed tree heads.

Layout of a lineage directory:

    segments/<first seq, 12 digits>.seg   header b"AQGOVLG1" + u64 first seq, then frames
    heads.seg                             header b"AQGOVHD1" + u64 0, then frames of signed heads

A frame is `u32 little-endian length | payload | SHA-256(payload)`. The trailing digest makes a
torn write detectable: after a crash the last frame of the last segment may be incomplete (fewer
bytes than its length says), and readers report it as a torn tail instead of a bad record. A
complete frame whose digest does not match is never torn: it was altered.

The Merkle tree's leaves are the 32-byte record hashes (leaf hash `SHA-256(0x00 || record hash)`);
its root is kept incrementally with `aqgov.documents.CompactRange`. Every `head_every` records, at
`flush(sign_head=True)` and at close, the writer signs a tree head (a `SignedDocument` of kind
"lineage-tree-head": run id, size, root, hash of the last record, id of the previous head, time).

fsync policy (`fsync=`):
- "always": fsync the segment after every record. Survives power loss up to the last record.
- "tree-head" (default): fsync the segment before each signed head and the heads file after it,
  so a head never survives a power loss that lost records it covers. Records after the last head
  may be lost or torn by a power loss (never by a process crash: the page cache survives that).
- "never": leave it to the OS. A process kill still loses nothing written; a power loss may.

`LineageWriter` runs the writing on a background thread: `append` only enqueues the summary
(device arrays stay where they are until the thread fetches them), so the training loop never
waits on hashing, encoding or the disk unless the bounded queue is full.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import queue
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from aqgov.documents import _merkle as merkle
from aqgov.documents import _signing as signing
from aqgov.documents._document_type import DocumentType, register, sign, verify
from aqgov.errors import LineageError, SignatureError
from aqgov.documents._files import fsync_dir
from aqgov.documents._keys import RUN, PublicKey, SigningKey, TrustStore
from aqgov.lineage import _record as rec
from aqgov.lineage._summary import StepSummary

SEGMENT_MAGIC = b"AQGOVLG1"
HEADS_MAGIC = b"AQGOVHD1"
HEAD_KIND = "lineage-tree-head"
# Signed tree heads are the only documents a run key signs.
HEAD: DocumentType[dict] = register(DocumentType(
    name="lineage-head", kind=HEAD_KIND, noun="lineage tree head", to_payload=dict, from_payload=dict,
    signer_roles=(RUN,), error=LineageError))


def run_trust(key: PublicKey | SigningKey) -> TrustStore:
  """A trust store holding only the run's key, in the run role (whatever its file records)."""
  public = key.public if isinstance(key, SigningKey) else key
  return TrustStore.of([public._replace(roles=(RUN,))])
FSYNC_POLICIES = ("always", "tree-head", "never")
MAX_FRAME = 1 << 28

_HEADER = struct.Struct("<8sQ")
_LEN = struct.Struct("<I")
_DIGEST = 32


class LogHead(NamedTuple):
  """Where a log stands: record count, Merkle root and hash of the last record."""

  size: int
  root: bytes
  last_record: bytes

  def to_wire(self) -> dict:
    return {"size": self.size, "root": self.root.hex(), "last_record": self.last_record.hex()}

  @classmethod
  def from_wire(cls, w: Mapping[str, Any]) -> "LogHead":
    return cls(int(w["size"]), bytes.fromhex(w["root"]), bytes.fromhex(w["last_record"]))


class TornTail(NamedTuple):
  """Bytes at the end of a file that do not form a complete frame (an interrupted write)."""

  path: str
  offset: int
  nbytes: int


def frame(payload: bytes) -> bytes:
  return _LEN.pack(len(payload)) + payload + hashlib.sha256(payload).digest()


def segment_name(first_seq: int) -> str:
  return f"{first_seq:012d}.seg"


_CHUNK = 256  # frames hashed per task when hashing runs on a thread pool


class _Framing(NamedTuple):
  """Where the complete frames of a file start, and how the file ends."""

  starts: list[int]
  problem: LineageError | None    # raised when iteration reaches it (so earlier bad records come first)
  torn: TornTail | None


def _framing(data, path: Path, what: str, first_index: int, may_tear: bool) -> _Framing:
  """Walk the length prefixes (cheap); digests are checked later, in order."""
  starts: list[int] = []
  off, index, size = _HEADER.size, first_index, len(data)
  while off < size:
    remaining = size - off
    n = _LEN.unpack_from(data, off)[0] if remaining >= _LEN.size else None
    at = index if what == "record" else None
    if n is not None and n > MAX_FRAME:
      return _Framing(starts, LineageError(f"{what} {index}: frame length {n} is implausible ({path.name} at byte "
                                           f"{off}); the file was altered", index=at), None)
    if n is None or remaining < _LEN.size + n + _DIGEST:
      if not may_tear:
        return _Framing(starts, LineageError(f"{what} {index}: {path.name} ends inside a frame but later segments "
                                             "follow; the file was truncated or altered", index=at), None)
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
    out.append(hashlib.sha256(view[off + _LEN.size: off + _LEN.size + n]).digest())
  return out


def _frames(data, path: Path, what: str, first_index: int, may_tear: bool, pool: ThreadPoolExecutor | None = None):
  """(index, payload, digest) for each complete frame, digests checked; returns the TornTail (or None)."""
  framing = _framing(data, path, what, first_index, may_tear)
  view = memoryview(data)
  starts = framing.starts
  chunks = [starts[i:i + _CHUNK] for i in range(0, len(starts), _CHUNK)]
  futures = [pool.submit(_digests, view, c) for c in chunks] if pool is not None else None
  index = first_index
  for k, chunk in enumerate(chunks):
    digests = futures[k].result() if futures is not None else _digests(view, chunk)
    for off, digest in zip(chunk, digests):
      n = _LEN.unpack_from(view, off)[0]
      if digest != view[off + _LEN.size + n: off + _LEN.size + n + _DIGEST]:
        raise LineageError(f"{what} {index}: bytes do not match their frame digest ({path.name} at byte {off}); "
                           "the record was altered or corrupted", index=index if what == "record" else None)
      yield index, view[off + _LEN.size: off + _LEN.size + n], digest
      index += 1
  if framing.problem is not None:
    raise framing.problem
  return framing.torn


def _map(path: Path):
  """The file's bytes, memory-mapped read-only (no copy; the page cache backs them)."""
  with open(path, "rb") as fh:
    size = os.fstat(fh.fileno()).st_size
    if size == 0:
      return b""
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(fh.fileno(), size, flags=flags, prot=mmap.PROT_READ)


def _read_header(data: bytes, path: Path, magic: bytes, may_tear: bool) -> int | None:
  if len(data) < _HEADER.size:
    if may_tear and magic.startswith(data[:len(magic)]):
      return None  # the file was being created when the process died
    raise LineageError(f"{path} is too short to be an aqgov lineage file")
  m, first = _HEADER.unpack_from(data, 0)
  if m != magic:
    raise LineageError(f"{path} is not an aqgov lineage file (bad magic {m!r})")
  return first


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
    seg_dir = self.dir / "segments"
    if not seg_dir.is_dir():
      raise LineageError(f"{self.dir} holds no lineage (no segments/ directory); is this a run's lineage/ dir?")
    return sorted(seg_dir.glob("*.seg"))

  def __iter__(self) -> Iterator[rec.Record]:
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="aqgov-verify") as pool:
      yield from self._records(pool)

  def _records(self, pool: ThreadPoolExecutor) -> Iterator[rec.Record]:
    segs = self.segments()
    expected, prev, prev2 = 0, rec.GENESIS, None
    payload = None
    for k, path in enumerate(segs):
      last = k == len(segs) - 1
      data = _map(path)
      first = _read_header(data, path, SEGMENT_MAGIC, last)
      if first is None:
        self.torn = TornTail(str(path), 0, len(data))
        break
      if first != expected or path.name != segment_name(first):
        raise LineageError(
            f"record {expected}: segment {path.name} starts at record {first} but {expected} records precede it; "
            "a segment was deleted, renamed or added", index=expected)
      gen = _frames(data, path, "record", expected, last, pool)
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
            raise LineageError(f"record {index - 1} is not part of the chain: record {index} links to record "
                               f"{index - 2} (a record was inserted at {index - 1})", index=index - 1)
          raise LineageError(f"record {index} does not link to record {index - 1} (chain broken: a record was "
                             "deleted, reordered or altered here)", index=index)
        if r.seq != index:
          raise LineageError(f"record {index} carries sequence number {r.seq}; records were deleted, reordered "
                             "or inserted", index=index)
        if (index == 0) != (r.kind == rec.RUN_START):
          raise LineageError(f"record {index} is a {r.kind!r} record; a log starts with exactly one run-start",
                             index=index)
        yield r
        prev2, prev = prev, digest
        expected = index + 1
      gen = payload = None  # release the views into the mapping so that it can be closed now
      if isinstance(data, mmap.mmap):
        data.close()
      if self.torn is not None and not last:
        raise LineageError(f"record {expected}: torn frame in {path.name}, which is not the last segment",
                           index=expected)
    self.size, self.last_hash = expected, prev


def read_heads(lineage_dir: str | os.PathLike) -> tuple[list[signing.SignedDocument], TornTail | None]:
  """The signed tree heads in order, and the torn tail of the heads file (if any)."""
  path = Path(lineage_dir) / "heads.seg"
  if not path.exists():
    return [], None
  data = path.read_bytes()
  if _read_header(data, path, HEADS_MAGIC, True) is None:
    return [], TornTail(str(path), 0, len(data))
  heads = []
  gen = _frames(data, path, "tree head", 0, True)
  while True:
    try:
      index, payload, _ = next(gen)
    except StopIteration as stop:
      return heads, stop.value
    try:
      heads.append(signing.SignedDocument.from_bytes(bytes(payload), kind=HEAD_KIND))
    except SignatureError as exc:
      raise LineageError(f"tree head {index}: {exc}") from None


class LogScan(NamedTuple):
  """One pass over a log: hashes, the bodies asked for, and where it ends."""

  size: int
  record_hashes: bytes            # 32 bytes per record, concatenated
  leaf_hash_bytes: bytes          # the Merkle leaf hash of each record, concatenated
  kinds: tuple[str, ...]
  bodies: dict[int, dict]         # index -> body, for the kinds requested
  roots: dict[int, bytes]         # size -> Merkle root, for the sizes requested
  torn: TornTail | None
  compact: merkle.CompactRange    # the root accumulator after the last record
  roots_before: dict[int, bytes]  # index -> Merkle root of the records before it, for the kinds requested

  def record_hash(self, index: int) -> bytes:
    return self.record_hashes[32 * index: 32 * index + 32]

  def leaf_hashes(self, size: int | None = None) -> list[bytes]:
    n = self.size if size is None else size
    b = self.leaf_hash_bytes
    return [b[32 * i: 32 * i + 32] for i in range(n)]

  def head(self, size: int | None = None) -> LogHead:
    n = self.size if size is None else size
    last = self.record_hash(n - 1) if n else rec.GENESIS
    root = self.roots.get(n) or merkle.root_from_leaf_hashes(self.leaf_hashes(n))
    return LogHead(n, root, last)

  def of_kind(self, kind: str) -> list[tuple[int, dict]]:
    return [(i, self.bodies[i]) for i, k in enumerate(self.kinds) if k == kind and i in self.bodies]


def scan(lineage_dir: str | os.PathLike, *, bodies: Sequence[str] = (), roots_at: Sequence[int] = (),
         roots_before: Sequence[str] = ()) -> LogScan:
  """Read a whole log once (see `LogReader`), decoding the bodies of the kinds in `bodies`, keeping
  the Merkle roots at the sizes in `roots_at` (the final size is always kept) and the root just
  before each record of a kind in `roots_before`."""
  reader = LogReader(lineage_dir, bodies=set(bodies))
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
  roots[compact.size] = compact.root
  return LogScan(reader.size, bytes(hashes), bytes(leaves), tuple(kinds), decoded, roots, reader.torn, compact, before)


def records(lineage_dir: str | os.PathLike, kinds: Sequence[str] | None = None,
            start: int = 0) -> Iterator[tuple[int, str, dict]]:
  """(index, kind, body) of each record from `start` on (of the given kinds), with the reader's checks."""
  want = None if kinds is None else set(kinds)
  for r in LogReader(lineage_dir, bodies=want):
    if r.seq >= start and (want is None or r.kind in want):
      yield r.seq, r.kind, r.body


def head_payload(run_id: str, head: LogHead, prev_head: str | None, time_s: float | None = None) -> dict:
  return {"run_id": run_id, **head.to_wire(), "prev_head": prev_head,
          "time": time.time() if time_s is None else float(time_s)}


def _write_all(fd: int, data: bytes) -> None:
  view = memoryview(data)
  while view:
    n = os.write(fd, view)
    view = view[n:]


class _Appender:
  """The synchronous core: appends framed records, rotates segments, keeps the root, signs heads."""

  def __init__(self, lineage_dir: Path, key: SigningKey, run_id: str, *, size: int, last_hash: bytes,
               compact: merkle.CompactRange, prev_head: str | None, fsync: str, head_every: int,
               segment_bytes: int):
    if fsync not in FSYNC_POLICIES:
      raise LineageError(f"fsync policy {fsync!r} is not one of {', '.join(FSYNC_POLICIES)}")
    if head_every < 1:
      raise LineageError(f"head_every must be at least 1, got {head_every}")
    self.dir, self.key, self.run_id = lineage_dir, key, run_id
    self.size, self.last_hash, self.compact, self.prev_head = size, last_hash, compact, prev_head
    self.fsync, self.head_every, self.segment_bytes = fsync, head_every, segment_bytes
    self.since_head = 0
    self.head_size = -1
    (self.dir / "segments").mkdir(parents=True, exist_ok=True)
    self._seg_fd: int | None = None
    self._seg_bytes = 0
    self._heads_fd = self._open_append(self.dir / "heads.seg", HEADS_MAGIC, 0)
    segs = sorted((self.dir / "segments").glob("*.seg"))
    if segs:
      self._seg_fd = os.open(segs[-1], os.O_WRONLY | os.O_APPEND)
      self._seg_bytes = segs[-1].stat().st_size

  def _open_append(self, path: Path, magic: bytes, first: int) -> int:
    if path.exists() and path.stat().st_size >= _HEADER.size:
      return os.open(path, os.O_WRONLY | os.O_APPEND)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    _write_all(fd, _HEADER.pack(magic, first))
    if self.fsync != "never":
      os.fsync(fd)
      fsync_dir(path.parent)
    return fd

  def _rotate(self) -> None:
    if self._seg_fd is not None:
      if self.fsync != "never":
        os.fsync(self._seg_fd)
      os.close(self._seg_fd)
    path = self.dir / "segments" / segment_name(self.size)
    self._seg_fd = self._open_append(path, SEGMENT_MAGIC, self.size)
    self._seg_bytes = _HEADER.size

  def head(self) -> LogHead:
    return LogHead(self.size, self.compact.root, self.last_hash)

  def append(self, kind: str, body: Mapping[str, Any] | bytes) -> bytes:
    data = rec.encode_record(self.size, kind, self.last_hash, body)
    if self._seg_fd is None or self._seg_bytes >= self.segment_bytes:
      self._rotate()
    framed = frame(data)
    _write_all(self._seg_fd, framed)
    if self.fsync == "always":
      os.fsync(self._seg_fd)
    self._seg_bytes += len(framed)
    digest = rec.record_hash(data)
    self.size += 1
    self.last_hash = digest
    self.compact = self.compact.append(merkle.leaf_hash(digest))
    self.since_head += 1
    if self.since_head >= self.head_every:
      self.sign_head()
    return digest

  def sign_head(self) -> signing.SignedDocument:
    if self.fsync != "never" and self._seg_fd is not None:
      os.fsync(self._seg_fd)
    doc = sign(HEAD, head_payload(self.run_id, self.head(), self.prev_head), self.key)
    _write_all(self._heads_fd, frame(doc.to_bytes()))
    if self.fsync != "never":
      os.fsync(self._heads_fd)
    self.prev_head = doc.id
    self.since_head = 0
    self.head_size = self.size
    return doc

  def close(self) -> None:
    for fd in (self._seg_fd, self._heads_fd):
      if fd is not None:
        os.close(fd)
    self._seg_fd = self._heads_fd = None


_STOP = object()


class LineageWriter:
  """Asynchronous lineage writer: a background thread turns summaries into signed, chained records.

  `append` and `append_record` return at once (they block only when `queue_size` items are
  already waiting). `flush` waits until everything queued is on disk and returns the head;
  `close` writes the run-end record, signs the final head and stops the thread. An error on the
  thread is re-raised (as `LineageError`) by the next call.
  """

  def __init__(self, appender: _Appender, *, queue_size: int = 64):
    self._app = appender
    self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
    self._error: BaseException | None = None
    self._closed = False
    self._last_step = 0
    self._cpu_s = 0.0
    self._thread = threading.Thread(target=self._run, name=f"aqgov-lineage-{appender.run_id[:8]}", daemon=True)
    self._thread.start()

  @classmethod
  def create(cls, lineage_dir: str | os.PathLike, key: SigningKey, run_start: Mapping[str, Any], *,
             fsync: str = "tree-head", head_every: int = 1024, segment_bytes: int = 64 << 20,
             queue_size: int = 64) -> "LineageWriter":
    """Start a new log in `lineage_dir` (which must hold none) with `run_start` as record 0."""
    d = Path(lineage_dir)
    if (d / "segments").exists() and any((d / "segments").iterdir()):
      raise LineageError(f"{d} already holds a lineage; resume it with open_for_resume or choose a new directory")
    d.mkdir(parents=True, exist_ok=True)
    app = _Appender(d, key, str(run_start["run_id"]), size=0, last_hash=rec.GENESIS, compact=merkle.CompactRange(),
                    prev_head=None, fsync=fsync, head_every=head_every, segment_bytes=segment_bytes)
    app.append(rec.RUN_START, run_start)
    app.sign_head()
    return cls(app, queue_size=queue_size)

  @property
  def run_id(self) -> str:
    return self._app.run_id

  def _run(self) -> None:
    while True:
      item = self._queue.get()
      if item is _STOP:
        return
      op, args, done = item
      result = None
      if self._error is None:
        started = time.thread_time()
        try:
          result = op(*args)
        except BaseException as exc:  # surfaced to the caller on its next call
          self._error = exc
        self._cpu_s += time.thread_time() - started
      if done is not None:
        done.result = result
        done.event.set()

  def _check(self) -> None:
    if self._error is not None:
      raise LineageError(f"the lineage writer failed: {type(self._error).__name__}: {self._error}; "
                         "the log is intact up to its last complete record, resume it with open_for_resume") \
          from self._error
    if self._closed:
      raise LineageError("the lineage writer is closed")

  def _submit(self, op, *args) -> None:
    self._check()
    self._queue.put((op, args, None))

  def _call(self, op, *args):
    self._check()
    done = _Done()
    self._queue.put((op, args, done))
    done.event.wait()
    self._check()
    return done.result

  def append(self, summary: StepSummary, example_ids: Sequence[str],
             example_sha256: Sequence[bytes | str] | None = None) -> None:
    """Queue a "step" record for `summary`; `example_ids` is the host-side id list the batch was
    built from and `example_sha256` the content hash of each (see `record.step_body`)."""
    self._submit(self._write_step, summary, list(example_ids),
                 None if example_sha256 is None else list(example_sha256), time.time())

  def _write_step(self, summary, ids, sha, t) -> None:
    body = rec.step_body(summary, ids, sha, time_s=t)
    self._last_step = body["step"]
    self._app.append(rec.STEP, rec.encode_step_body(body))

  def append_record(self, kind: str, body: Mapping[str, Any]) -> None:
    """Queue a record of any other kind, in order with the step records."""
    if kind == rec.RUN_START:
      raise LineageError("a log has exactly one run-start record, written by LineageWriter.create")
    self._submit(self._app.append, kind, dict(body))

  def flush(self, *, sign_head: bool = False) -> LogHead:
    """Wait until every queued record is written (and a head signed, if asked); the head now."""
    def op():
      if sign_head and self._app.head_size != self._app.size:
        self._app.sign_head()
      return self._app.head()
    return self._call(op)

  @property
  def last_step(self) -> int:
    return self._last_step

  @property
  def cpu_seconds(self) -> float:
    """CPU time the writer thread has spent writing so far (what lineage costs a spare core)."""
    return self._cpu_s

  def close(self, *, status: str = "completed", step: int | None = None) -> LogHead:
    """Write the run-end record, sign the final head, close the files and stop the thread."""
    def op():
      self._app.append(rec.RUN_END, rec.run_end_body(step=self._last_step if step is None else step, status=status))
      if self._app.head_size != self._app.size:
        self._app.sign_head()
      return self._app.head()
    try:
      head = self._call(op)
    finally:
      self._closed = True
      self._queue.put(_STOP)
      self._thread.join()
      self._app.close()
    return head

  def abandon(self) -> None:
    """Stop without a run-end record (the log stays resumable); queued records are still written."""
    if self._closed:
      return
    self._closed = True
    self._queue.put(_STOP)
    self._thread.join()
    self._app.close()


class _Done:
  """A result slot the writer thread fills, and the event it sets when done."""

  def __init__(self):
    self.result = None
    self.event = threading.Event()


def open_for_resume(lineage_dir: str | os.PathLike, key: SigningKey, *, fsync: str = "tree-head",
                    head_every: int = 1024, segment_bytes: int = 64 << 20, queue_size: int = 64,
                    bodies: Sequence[str] = ()) -> tuple[LineageWriter, LogScan]:
  """Reopen a log for appending after a crash or a clean stop.

  Checks every record (frame digests, chain, seq) and every tree head (signature by `key`, root and
  last-record hash against the records), cuts a torn final frame off the last segment and the
  heads file, and continues the chain: the next record has seq = the number of complete records and
  prev = the hash of the last one, so there is no gap and no duplicate. Raises `LineageError` if
  anything other than a torn tail is wrong (verify the log to see exactly what). The returned scan
  holds the bodies of the kinds in `bodies` (and run-start) and the root before each checkpoint.
  """
  d = Path(lineage_dir)
  heads, heads_torn = read_heads(d)
  sizes = [int(h.payload["size"]) for h in heads]
  log = scan(d, bodies=(rec.RUN_START, *bodies), roots_at=sizes, roots_before=(rec.CHECKPOINT,))
  trust = run_trust(key)
  for k, h in enumerate(heads):
    try:
      verify(HEAD, h, trust)
    except SignatureError as exc:
      raise LineageError(f"tree head {k} is not signed by this run's key: {exc}") from None
    size = sizes[k]
    if size > log.size:
      raise LineageError(f"tree head {k} covers {size} records but only {log.size} are intact; records a signed "
                         "head covers were lost (a power loss with fsync='never'?)", index=log.size)
    if bytes.fromhex(h.payload["root"]) != log.roots[size] or \
       bytes.fromhex(h.payload["last_record"]) != log.record_hash(size - 1):
      raise LineageError(f"tree head {k} does not match records 0..{size - 1}; verify the log to find out why")
  for torn in (log.torn, heads_torn):
    if torn is not None and torn.offset == 0:
      os.unlink(torn.path)  # the file was being created: not even its header is complete
    elif torn is not None:
      os.truncate(torn.path, torn.offset)
  if log.size == 0:
    raise LineageError(f"{d} holds no complete record (not even run-start); start a new run instead")
  start = log.bodies[0]
  app = _Appender(d, key, str(start["run_id"]), size=log.size, last_hash=log.record_hash(log.size - 1),
                  compact=log.compact, prev_head=heads[-1].id if heads else None, fsync=fsync,
                  head_every=head_every, segment_bytes=segment_bytes)
  if heads:
    app.head_size = sizes[-1]
  return LineageWriter(app, queue_size=queue_size), log
