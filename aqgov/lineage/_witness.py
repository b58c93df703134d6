"""A transparency-log witness (C2SP tlog-witness `add-checkpoint`), small enough to run beside a job.

The witness is configured with the public key of each log it follows, by origin. It keeps, per
origin, the size and root of the latest checkpoint it cosigned (`STATE/<sha256(origin)>.json`,
written atomically), and cosigns a new checkpoint only if it is signed by that log's key and is
consistent with what it cosigned before: a smaller size (rollback), the same size with another
root, or a failed consistency proof (fork) is refused. Responses follow the specification:

| status | when |
|---|---|
| 200 | cosigned: the body is the cosignature line |
| 400 | malformed request, or `old` larger than the checkpoint's size |
| 403 | no signature by the log's configured key |
| 404 | the origin is not one the witness follows |
| 409 | `old` is not the size the witness holds (body `<size>\\n`, text/x.tlog.size), or same size, other root |
| 422 | the consistency proof does not verify |
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple

from aqgov.documents import _merkle as merkle
from aqgov.documents import _note as notes
from aqgov.documents._files import atomic_write
from aqgov.documents._keys import SigningKey
from aqgov.errors import LineageError, NoteError

MAX_BODY = 1 << 16
MAX_PROOF = 63
SIZE_TYPE = "text/x.tlog.size"


class Reply(NamedTuple):
  """An HTTP answer: status, content type and body."""

  status: int
  body: bytes = b""
  content_type: str = "text/plain; charset=utf-8"


class Request(NamedTuple):
  """A parsed add-checkpoint request body."""

  old: int
  proof: tuple[bytes, ...]
  note: notes.Note
  checkpoint: notes.Checkpoint


def encode_request(old: int, proof: Sequence[bytes], note: notes.Note) -> bytes:
  """The add-checkpoint body: `old <size>`, one base64 hash per line, a blank line, the note."""
  lines = [f"old {int(old)}\n", *(notes.b64(h) + "\n" for h in proof), "\n"]
  return "".join(lines).encode() + note.to_bytes()


def parse_request(body: bytes) -> Request:
  """An add-checkpoint body (strict); `NoteError` says what is malformed."""
  try:
    text = body.decode("utf-8")
  except UnicodeDecodeError:
    raise NoteError("the request body is not UTF-8") from None
  head, sep, rest = text.partition("\n\n")
  if not sep:
    raise NoteError(
      "the request needs an old size line, proof lines, a blank line and a checkpoint"
    )
  lines = head.split("\n")
  if not lines[0].startswith("old "):
    raise NoteError("the request must start with 'old <size>'")
  old = notes.decimal(lines[0][4:], "old size")
  if len(lines) - 1 > MAX_PROOF:
    raise NoteError(f"a consistency proof has at most {MAX_PROOF} lines")
  proof = tuple(notes.unb64(x, "proof hash") for x in lines[1:])
  if any(len(h) != 32 for h in proof):
    raise NoteError("every proof line must be a 32-byte hash")
  note = notes.parse_note(rest)
  return Request(old, proof, note, notes.parse_checkpoint(note.text))


class LogState(NamedTuple):
  """What a witness holds for one origin: the latest cosigned size and root."""

  size: int
  root: bytes


class Witness:
  """The witness's logic, independent of HTTP: `add_checkpoint(body) -> Reply`.

  `logs` maps each origin to the note keys it may be signed with; `state_dir` holds what the
  witness has cosigned. Checking and updating an origin's state happen under one lock, so two
  concurrent requests cannot roll the state back.
  """

  def __init__(
    self,
    key: SigningKey,
    name: str,
    logs: Mapping[str, Sequence[notes.NoteKey]],
    state_dir: str | os.PathLike,
    *,
    clock=time.time,
  ):
    self.key, self.name = key, notes.check_name(name)
    self.logs = {notes.check_name(o): tuple(ks) for o, ks in logs.items()}
    if not self.logs:
      raise LineageError("a witness needs at least one log (--log ORIGIN=KEY) to follow")
    self.state_dir = Path(state_dir)
    self.state_dir.mkdir(parents=True, exist_ok=True)
    self.clock = clock
    self._lock = threading.Lock()

  @property
  def note_key(self) -> notes.NoteKey:
    """The key clients check this witness's cosignatures with."""
    return notes.note_key(self.key, self.name, notes.COSIGNATURE_V1)

  def _path(self, origin: str) -> Path:
    return self.state_dir / f"{hashlib.sha256(origin.encode()).hexdigest()}.json"

  def state(self, origin: str) -> LogState:
    """The latest cosigned size and root for `origin` (size 0, the empty root, if none)."""
    path = self._path(origin)
    if not path.exists():
      return LogState(0, merkle.EMPTY_ROOT)
    try:
      doc = json.loads(path.read_text())
      if doc["origin"] != origin:
        raise ValueError(f"it is the state of {doc['origin']!r}")
      return LogState(int(doc["size"]), bytes.fromhex(doc["root"]))
    except (ValueError, KeyError, TypeError) as exc:
      raise LineageError(
        f"witness state {path} for {origin!r} is unreadable ({exc}); restore it from a backup "
        "(never delete it: the witness would forget what it cosigned)"
      ) from None

  def _store(self, cp: notes.Checkpoint, t: int) -> None:
    doc = {"origin": cp.origin, "size": cp.size, "root": cp.root.hex(), "time": t}
    atomic_write(self._path(cp.origin), (json.dumps(doc, sort_keys=True) + "\n").encode())

  def add_checkpoint(self, body: bytes) -> Reply:
    """Check a submitted checkpoint against the log's key and the recorded state; cosign it or refuse."""
    try:
      req = parse_request(body)
    except NoteError as exc:
      return Reply(400, f"malformed request: {exc}\n".encode())
    cp = req.checkpoint
    if cp.origin not in self.logs:
      return Reply(404, f"unknown origin {cp.origin!r}\n".encode())
    try:
      notes.verify_note(req.note, self.logs[cp.origin])
    except NoteError as exc:
      return Reply(403, f"checkpoint is not signed by the key of {cp.origin!r}: {exc}\n".encode())
    if req.old > cp.size:
      return Reply(
        400, f"old size {req.old} is larger than the checkpoint size {cp.size}\n".encode()
      )
    with self._lock:
      held = self.state(cp.origin)
      if req.old != held.size:
        return Reply(409, f"{held.size}\n".encode(), SIZE_TYPE)
      if req.old == cp.size:
        if req.proof:
          return Reply(422, b"a checkpoint of the size already held needs an empty proof\n")
        if cp.root != held.root:
          return Reply(409, f"{held.size}\n".encode(), SIZE_TYPE)
      elif req.old == 0:
        if req.proof:
          return Reply(422, b"the proof must be empty when old is 0\n")
      elif not merkle.verify_consistency(req.old, cp.size, held.root, cp.root, req.proof):
        return Reply(
          422, f"the consistency proof from {req.old} to {cp.size} does not verify\n".encode()
        )
      t = int(self.clock())
      self._store(cp, t)
    sig = notes.cosign(req.note.text, self.key, self.name, t)
    return Reply(200, sig.line().encode())


class _Handler(BaseHTTPRequestHandler):
  server: WitnessServer
  protocol_version = "HTTP/1.1"

  def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
    if self.path.rstrip("/").rsplit("/", 1)[-1] != "add-checkpoint":
      return self._send(Reply(404, b"not found: POST /add-checkpoint\n"))
    try:
      n = int(self.headers.get("Content-Length", ""))
    except ValueError:
      return self._send(Reply(411, b"Content-Length required\n"))
    if not 0 <= n <= MAX_BODY:
      return self._send(Reply(413, b"request too large\n"))
    self._send(self.server.witness.add_checkpoint(self.rfile.read(n)))

  def _send(self, reply: Reply) -> None:
    self.send_response(reply.status)
    self.send_header("Content-Type", reply.content_type)
    self.send_header("Content-Length", str(len(reply.body)))
    self.end_headers()
    self.wfile.write(reply.body)

  def log_message(self, format: str, *args) -> None:  # noqa: A002
    if self.server.verbose:
      super().log_message(format, *args)


class WitnessServer(ThreadingHTTPServer):
  """An HTTP server for `witness` (port 0 picks a free one; `url` says where it listens)."""

  daemon_threads = True

  def __init__(
    self, witness: Witness, host: str = "127.0.0.1", port: int = 0, *, verbose: bool = False
  ):
    self.witness, self.verbose = witness, verbose
    super().__init__((host, port), _Handler)

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f"http://{host}:{port}"

  def start(self) -> threading.Thread:
    """Serve on a daemon thread; `shutdown()` stops it."""
    t = threading.Thread(target=self.serve_forever, name="aqgov-witness-server", daemon=True)
    t.start()
    return t


def log_keys(entries: Iterable[tuple[str, notes.NoteKey]]) -> dict[str, list[notes.NoteKey]]:
  """{origin: [keys]} from (origin, key) pairs; one origin may have several keys."""
  out: dict[str, list[notes.NoteKey]] = {}
  for origin, key in entries:
    out.setdefault(notes.check_name(origin), []).append(key)
  return out
