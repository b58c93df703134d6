"""Writing a lineage: the synchronous appender, the asynchronous `LineageWriter`, resume.

fsync policy (`fsync=`):
- "always": fsync the segment after every record. Survives power loss up to the last record.
- "tree-head" (default): fsync the segment before each signed head and the heads file after it,
  so a head never survives a power loss that lost records it covers. Records after the last head
  may be lost or torn by a power loss (never by a process crash: the page cache survives that).
- "never": leave it to the OS. A process kill still loses nothing written; a power loss may.

`LineageWriter` runs the writing on a background thread: `append` only enqueues the summary
(device arrays stay where they are until the thread fetches them), so the training loop never
waits on hashing, encoding or the disk unless the bounded queue is full. Step records go to the
thread `batch_steps` at a time (and whenever anything else is queued, flushed or closed, so
records keep their order): one hand-over per batch instead of one per step, and the thread then
encodes the batch back to back, which costs it markedly less CPU per record than one record per
wake-up between training steps.

One writer per log: creating or reopening a log takes an exclusive `flock` on `lineage/.lock`,
held until the writer is closed or abandoned (or its process dies, which releases it), so a
second process (or a second open in this one) gets a `LineageError` instead of interleaving
records into the same chain.
"""

from __future__ import annotations

import fcntl
import os
import queue
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from aqgov.documents import _merkle as merkle
from aqgov.documents import _signing as signing
from aqgov.documents._document_type import sign, verify
from aqgov.documents._files import fsync_dir
from aqgov.documents._keys import SigningKey
from aqgov.errors import LineageError, SignatureError
from aqgov.lineage import _bodies as record_bodies
from aqgov.lineage import _record as rec
from aqgov.lineage import _sketches as sketch_store
from aqgov.lineage._cosign import Publisher, as_witness
from aqgov.lineage._heads import HEAD, LogHead, head_payload, read_heads, run_trust
from aqgov.lineage._scan import LogScan, scan
from aqgov.lineage._segments import (
  HEADER,
  HEADS_MAGIC,
  SEGMENT_MAGIC,
  frame,
  frame_parts,
  segment_name,
  write_all,
  write_parts,
)
from aqgov.lineage._summary import StepSummary

FSYNC_POLICIES = ("always", "tree-head", "never")
LOCK_FILE = ".lock"
_FRAMING = 4 + 32  # a frame's length prefix and digest around its record
_IOV_PARTS = 768  # frame parts per writev (under the usual IOV_MAX of 1024)


def lock_log(lineage_dir: Path) -> int:
  """An exclusive lock on `lineage_dir` for one writer (a file descriptor; closing it releases it)."""
  lineage_dir.mkdir(parents=True, exist_ok=True)
  fd = os.open(lineage_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    raise LineageError(
      f"{lineage_dir} is already open for writing by another writer (a running or resuming "
      "run holds its lock); only one process may write a run's lineage at a time: wait for "
      "it to close or stop it, then resume"
    ) from None
  return fd


class _Appender:
  """The synchronous core: appends framed records, rotates segments, keeps the root, signs heads."""

  def __init__(
    self,
    lineage_dir: Path,
    key: SigningKey,
    run_id: str,
    *,
    size: int,
    last_hash: bytes,
    compact: merkle.CompactRange,
    prev_head: str | None,
    fsync: str,
    head_every: int,
    segment_bytes: int,
    lock: int,
  ):
    self._lock = lock  # released by close()
    if fsync not in FSYNC_POLICIES:
      raise LineageError(f"fsync policy {fsync!r} is not one of {', '.join(FSYNC_POLICIES)}")
    if head_every < 1:
      raise LineageError(f"head_every must be at least 1, got {head_every}")
    self.dir, self.key, self.run_id = lineage_dir, key, run_id
    self.size, self.last_hash, self.compact, self.prev_head = size, last_hash, compact, prev_head
    self.fsync, self.head_every, self.segment_bytes = fsync, head_every, segment_bytes
    self.since_head = 0
    self.head_size = -1
    self.witness: Publisher | None = (
      None  # submits signed heads to witnesses, when the run names any
    )
    (self.dir / "segments").mkdir(parents=True, exist_ok=True)
    self._seg_fd: int | None = None
    self._seg_bytes = 0
    self._unwritten: list[bytes] = []  # frame parts of deferred appends, in order
    self.deferring = False  # set while a batch of steps is appended (see `append`)
    self._heads_fd = self._open_append(self.dir / "heads.seg", HEADS_MAGIC, 0)
    segs = sorted((self.dir / "segments").glob("*.seg"))
    if segs:
      self._seg_fd = os.open(segs[-1], os.O_WRONLY | os.O_APPEND)
      self._seg_bytes = segs[-1].stat().st_size

  def _open_append(self, path: Path, magic: bytes, first: int) -> int:
    if path.exists() and path.stat().st_size >= HEADER.size:
      return os.open(path, os.O_WRONLY | os.O_APPEND)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    write_all(fd, HEADER.pack(magic, first))
    if self.fsync != "never":
      os.fsync(fd)
      fsync_dir(path.parent)
    return fd

  def write_out(self) -> None:
    """Write the frames `append(defer=True)` left in memory (one `writev` per few hundred)."""
    parts, self._unwritten = self._unwritten, []
    for i in range(0, len(parts), _IOV_PARTS):
      write_parts(self._seg_fd, parts[i : i + _IOV_PARTS])

  def _rotate(self) -> None:
    self.write_out()  # frames still in memory belong to the segment being closed
    if self._seg_fd is not None:
      if self.fsync != "never":
        os.fsync(self._seg_fd)
      os.close(self._seg_fd)
    path = self.dir / "segments" / segment_name(self.size)
    self._seg_fd = self._open_append(path, SEGMENT_MAGIC, self.size)
    self._seg_bytes = HEADER.size

  def head(self) -> LogHead:
    return LogHead(self.size, self.compact.root, self.last_hash)

  def append(self, kind: str, body: Mapping[str, Any] | bytes) -> bytes:
    """Append one record; its hash. While `deferring`, the frame stays in memory until
    `write_out` (or a head, a new segment) writes it with the frames after it (not with
    fsync="always")."""
    data = rec.encode_record(self.size, kind, self.last_hash, body)
    if self._seg_fd is None or self._seg_bytes >= self.segment_bytes:
      self._rotate()
    digest = rec.record_hash(data)  # the frame digest is the record hash: hashed once
    self._unwritten += frame_parts(data, digest)
    self._seg_bytes += _FRAMING + len(data)
    if not self.deferring or self.fsync == "always":
      self.write_out()
    if self.fsync == "always":
      os.fsync(self._seg_fd)
    self.size += 1
    self.last_hash = digest
    leaf = merkle.leaf_hash(digest)
    self.compact = self.compact.append(leaf)
    if self.witness is not None:
      self.witness.add_leaf(leaf)
    self.since_head += 1
    if self.since_head >= self.head_every:
      self.sign_head()
    return digest

  def sign_head(self) -> signing.SignedDocument:
    self.write_out()  # a head covers only records on disk
    if self.fsync != "never" and self._seg_fd is not None:
      os.fsync(self._seg_fd)
    doc = sign(HEAD, head_payload(self.run_id, self.head(), self.prev_head), self.key)
    write_all(self._heads_fd, frame(doc.to_bytes()))
    if self.fsync != "never":
      os.fsync(self._heads_fd)
    self.prev_head = doc.id
    self.since_head = 0
    self.head_size = self.size
    if self.witness is not None:
      self.witness.publish(self.head())
    return doc

  def close(self) -> None:
    if self.witness is not None:
      self.witness.stop()
    for fd in (self._seg_fd, self._heads_fd, self._lock):
      if fd is not None:
        os.close(fd)
    self._seg_fd = self._heads_fd = self._lock = None


_STOP = object()


def _check_batch_steps(batch_steps: int) -> None:
  if batch_steps < 1:
    raise LineageError(
      f"batch_steps must be at least 1 (steps handed over at once), got {batch_steps}"
    )


class LineageWriter:
  """Asynchronous lineage writer: a background thread turns summaries into signed, chained records.

  `append` and `append_record` return at once (they block only when about `queue_size` steps
  are already waiting). Steps are handed to the thread `batch_steps` at a time (see the module
  doc). `flush` waits until everything queued is on disk and returns the head;
  `close` writes the run-end record, signs the final head and stops the thread. An error on the
  thread is re-raised (as `LineageError`) by the next call.
  """

  def __init__(self, appender: _Appender, *, queue_size: int = 64, batch_steps: int = 8):
    _check_batch_steps(batch_steps)
    self._app = appender
    self._batch_steps = batch_steps
    self._pending: list[tuple] = []  # steps not yet handed to the thread, in order
    self._order = threading.Lock()  # held while steps or records are queued
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size // batch_steps))
    self._error: BaseException | None = None
    self._closed = False
    self._last_step = 0
    self._cpu_s = 0.0
    self._sketches: sketch_store.SketchStore | None = None
    self._thread = threading.Thread(
      target=self._run, name=f"aqgov-lineage-{appender.run_id[:8]}", daemon=True
    )
    self._thread.start()

  @classmethod
  def create(
    cls,
    lineage_dir: str | os.PathLike,
    key: SigningKey,
    run_start: Mapping[str, Any],
    *,
    fsync: str = "tree-head",
    head_every: int = 1024,
    segment_bytes: int = 64 << 20,
    queue_size: int = 64,
    batch_steps: int = 8,
    witnesses: Sequence = (),
    witness_timeout: float = 10.0,
  ) -> LineageWriter:
    """Start a new log in `lineage_dir` (which must hold none) with `run_start` as record 0.

    `witnesses` are `(url, key)` pairs (see `aqgov.lineage.cosign`): every signed head is submitted
    to each of them, and `close` fails unless each cosigned the final head.
    """
    d = Path(lineage_dir)
    refs = [as_witness(w) for w in witnesses]
    _check_batch_steps(batch_steps)
    lock = lock_log(d)
    try:
      if (d / "segments").exists() and any((d / "segments").iterdir()):
        raise LineageError(
          f"{d} already holds a lineage; resume it with open_for_resume or choose a new directory"
        )
      app = _Appender(
        d,
        key,
        str(run_start["run_id"]),
        size=0,
        last_hash=rec.GENESIS,
        compact=merkle.CompactRange(),
        prev_head=None,
        fsync=fsync,
        head_every=head_every,
        segment_bytes=segment_bytes,
        lock=lock,
      )
    except BaseException:
      os.close(lock)
      raise
    if refs:
      app.witness = Publisher(d, key, app.run_id, refs, timeout=witness_timeout)
    app.append(rec.RUN_START, run_start)
    app.sign_head()
    return cls(app, queue_size=queue_size, batch_steps=batch_steps)

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
      raise LineageError(
        f"the lineage writer failed: {type(self._error).__name__}: {self._error}; "
        "the log is intact up to its last complete record, resume it with open_for_resume"
      ) from self._error
    if self._closed:
      raise LineageError("the lineage writer is closed")

  def _hand_over(self) -> None:
    """Queue the pending steps (before anything else is queued: records keep their order).
    Callers hold `_order`."""
    if self._pending:
      batch, self._pending = self._pending, []
      self._queue.put((self._write_steps, (batch,), None))

  def _put(self, item: tuple | None = None) -> None:
    """Queue the pending steps, then `item`; under `_order`, so that steps appended from another
    thread (a host callback) never overtake each other or what this thread queues."""
    with self._order:
      self._hand_over()
      if item is not None:
        self._queue.put(item)

  def _submit(self, op, *args) -> None:
    self._check()
    self._put((op, args, None))

  def _call(self, op, *args):
    self._check()
    done = _Done()
    self._put((op, args, done))
    done.event.wait()
    self._check()
    return done.result

  def append(
    self,
    summary: StepSummary,
    example_ids: Sequence[str],
    example_sha256: Sequence[bytes | str] | None = None,
    rejected: Iterable[Any] = (),
  ) -> None:
    """Queue a "step" record for `summary`; `example_ids` is the host-side id list the batch was
    built from and `example_sha256` the content hash of each (see `record.step_body`); `rejected`
    are the examples refused at admission and left out of the batch (`record.with_rejected`)."""
    self._check()
    item = (
      summary,
      list(example_ids),
      None if example_sha256 is None else list(example_sha256),
      time.time(),
      rec.rejected_to_wire(rejected),
    )
    with self._order:
      self._pending.append(item)
      if len(self._pending) >= self._batch_steps:
        self._hand_over()

  def _write_steps(self, batch: list[tuple]) -> None:
    # Wait for the newest summary of the batch once: the earlier ones are then computed too.
    # Reading device arrays one by one while the step that makes them still runs costs this
    # thread several times the CPU of the whole record (measured beside a CPU step).
    jax.block_until_ready(batch[-1][0])
    self._app.deferring = True
    try:
      for item in batch:
        self._write_step(*item)
    finally:
      self._app.deferring = False
      self._app.write_out()  # the batch's frames in one write

  def _write_step(self, summary, ids, sha, t, rejected=()) -> None:
    body = rec.with_rejected(rec.step_body(summary, ids, sha, time_s=t), rejected)
    if getattr(summary, "sketch", None) is not None:  # the block first: a record never dangles
      rows = sketch_store.sketch_rows(summary.sketch, summary.example_index)
      if self._sketches is None:
        self._sketches = sketch_store.SketchStore(
          sketch_store.store_dir(self._app.dir.parent), fsync=self._app.fsync != "never"
        )
      stored = self._sketches.append(self._app.size, body["step"], rows)
      body = dict(sorted({**body, "sketch": sketch_store.record_field(stored, rows)}.items()))
    self._last_step = body["step"]
    self._app.append(rec.STEP, rec.encode_step_body(body))

  def append_step_body(self, body: Mapping[str, Any]) -> None:
    """Queue a "step" record whose body `record.step_body` already built (a distributed run
    builds it on every process to compare them; see `aqgov.lineage._distributed`)."""
    self._submit(self._write_body, dict(body))

  def _write_body(self, body) -> None:
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
    """Write the run-end record, sign the final head, close the files and stop the thread.

    With witnesses, raises `WitnessError` (after closing) unless each cosigned the final head.
    """

    def op():
      self._app.append(
        rec.RUN_END,
        record_bodies.run_end_body(step=self._last_step if step is None else step, status=status),
      )
      if self._app.head_size != self._app.size:
        self._app.sign_head()
      return self._app.head()

    try:
      head = self._call(op)
    finally:
      if not self._closed:
        self._put()  # after a failure: queued steps are still written, as by abandon
      self._closed = True
      self._queue.put(_STOP)
      self._thread.join()
      self._app.close()
      if self._sketches is not None:
        self._sketches.close()
    if self._app.witness is not None:
      self._app.witness.finish(head)
    return head

  def abandon(self) -> None:
    """Stop without a run-end record (the log stays resumable); queued records are still written."""
    if self._closed:
      return
    self._put()
    self._closed = True
    self._queue.put(_STOP)
    self._thread.join()
    self._app.close()
    if self._sketches is not None:
      self._sketches.close()


class _Done:
  """A result slot the writer thread fills, and the event it sets when done."""

  def __init__(self):
    self.result = None
    self.event = threading.Event()


def open_for_resume(
  lineage_dir: str | os.PathLike,
  key: SigningKey,
  *,
  fsync: str = "tree-head",
  head_every: int = 1024,
  segment_bytes: int = 64 << 20,
  queue_size: int = 64,
  batch_steps: int = 8,
  bodies: Sequence[str] = (),
  witnesses: Sequence = (),
  witness_timeout: float = 10.0,
) -> tuple[LineageWriter, LogScan]:
  """Reopen a log for appending after a crash or a clean stop.

  Checks every record (frame digests, chain, seq) and every tree head (signature by `key`, root and
  last-record hash against the records), cuts a torn final frame off the last segment and the
  heads file, and continues the chain: the next record has seq = the number of complete records and
  prev = the hash of the last one, so there is no gap and no duplicate. Raises `LineageError` if
  anything other than a torn tail is wrong (verify the log to see exactly what). The returned scan
  holds the bodies of the kinds in `bodies` (and run-start) and the root before each checkpoint.
  `witnesses` are submitted each head from now on, as in `LineageWriter.create`. A log whose signed
  part holds a run-end is final and is refused: nothing may follow a signed run-end.
  """
  d = Path(lineage_dir)
  _check_batch_steps(batch_steps)
  lock = lock_log(d)  # before anything is read or cut: a second writer must not race this one
  try:
    return _reopen(
      d,
      key,
      lock,
      fsync=fsync,
      head_every=head_every,
      segment_bytes=segment_bytes,
      queue_size=queue_size,
      batch_steps=batch_steps,
      bodies=bodies,
      witnesses=witnesses,
      witness_timeout=witness_timeout,
    )
  except BaseException:
    os.close(lock)
    raise


def _reopen(
  d: Path,
  key: SigningKey,
  lock: int,
  *,
  fsync: str,
  head_every: int,
  segment_bytes: int,
  queue_size: int,
  batch_steps: int,
  bodies: Sequence[str],
  witnesses: Sequence,
  witness_timeout: float,
) -> tuple[LineageWriter, LogScan]:
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
      raise LineageError(
        f"tree head {k} covers {size} records but only {log.size} are intact; records a signed "
        "head covers were lost (a power loss with fsync='never'?)",
        index=log.size,
      )
    if bytes.fromhex(h.payload["root"]) != log.roots[size] or bytes.fromhex(
      h.payload["last_record"]
    ) != log.record_hash(size - 1):
      raise LineageError(
        f"tree head {k} does not match records 0..{size - 1}; verify the log to find out why"
      )
  ended = [
    i for i, kind in enumerate(log.kinds[: sizes[-1] if sizes else 0]) if kind == rec.RUN_END
  ]
  if ended:
    raise LineageError(
      f"the log was closed (signed run-end at record {ended[0]}): a closed run is final and "
      "nothing may follow its run-end; continue it as a child run (GovernedRun.start with "
      "parent=)",
      index=ended[0] + 1,
    )
  for torn in (log.torn, heads_torn):
    if torn is not None and torn.offset == 0:
      os.unlink(torn.path)  # the file was being created: not even its header is complete
    elif torn is not None:
      os.truncate(torn.path, torn.offset)
  if log.size == 0:
    raise LineageError(
      f"{d} holds no complete record (not even run-start); start a new run instead"
    )
  start = log.bodies[0]
  refs = [as_witness(w) for w in witnesses]
  app = _Appender(
    d,
    key,
    str(start["run_id"]),
    size=log.size,
    last_hash=log.record_hash(log.size - 1),
    compact=log.compact,
    prev_head=heads[-1].id if heads else None,
    fsync=fsync,
    head_every=head_every,
    segment_bytes=segment_bytes,
    lock=lock,
  )
  if refs:
    app.witness = Publisher(d, key, app.run_id, refs, log.leaf_hashes(), timeout=witness_timeout)
  if heads:
    app.head_size = sizes[-1]
  return LineageWriter(app, queue_size=queue_size, batch_steps=batch_steps), log
