"""Witnessed tree heads: each signed head as a tlog checkpoint, cosigned by the run's witnesses.

A run that names witnesses (URL and cosigner key) renders each signed tree head as a checkpoint
`aqgov.example/run/<run_id>`, size, base64 root, signed by the run key with the origin as key name,
and submits it to every witness with a consistency proof from the size that witness last cosigned.
The checkpoint and the cosignatures returned are kept in `lineage/cosignatures/<size>.note`.

Submission runs on its own thread (`Publisher`): the training and writer threads never wait on the
network. When heads come faster than witnesses answer, only the newest is submitted (a
cosignature on it vouches for every earlier size). At close, every witness must have cosigned the
final head, or the run ends with a `WitnessError` saying which did not and why; the log itself is
complete and can be cosigned later with `cosign_final_head`.
"""

from __future__ import annotations

import http.client
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

from aqgov.documents import _keys as keylib
from aqgov.documents import _merkle as merkle
from aqgov.documents import _note as notes
from aqgov.documents._files import atomic_write
from aqgov.documents._keys import PublicKey, SigningKey
from aqgov.errors import AqgovError, LineageError, NoteError, WitnessError
from aqgov.lineage._heads import LogHead, read_heads
from aqgov.lineage._scan import scan
from aqgov.lineage._witness import SIZE_TYPE, encode_request

ORIGIN_PREFIX = "aqgov.example/run/"
COSIGNATURES = "cosignatures"
MAX_RESPONSE = 1 << 16


def origin_of(run_id: str) -> str:
  """The checkpoint origin (and the run key's note name) of run `run_id`."""
  return notes.check_name(ORIGIN_PREFIX + run_id)


def cosigner_key(key: notes.NoteKey | PublicKey | str | os.PathLike) -> notes.NoteKey:
  """A witness's cosignature key from a verifier key string, a `.pub` file or a public key."""
  if isinstance(key, notes.NoteKey):
    out = key
  elif isinstance(key, PublicKey):
    out = notes.note_key(key, None, notes.COSIGNATURE_V1)
  elif isinstance(key, str) and key.count("+") >= 2 and not Path(key).exists():
    out = notes.parse_verifier_key(key)
  else:
    out = notes.note_key(keylib.load_public_key(key), None, notes.COSIGNATURE_V1)
  if out.type != notes.COSIGNATURE_V1:
    raise NoteError(
      f"witness key {out.describe()} is of note type {out.type:#04x}; a witness key has type 0x04 "
      "(use the verifier key `aqgov witness serve` prints)"
    )
  return out


class WitnessRef(NamedTuple):
  """A witness a run submits to: its URL (the submission prefix) and its cosigner key."""

  url: str
  key: notes.NoteKey

  def to_wire(self) -> dict:
    return {"url": self.url, "name": self.key.name, "public": notes.b64(self.key.raw)}

  @classmethod
  def from_wire(cls, w) -> WitnessRef:
    return cls(
      str(w["url"]),
      notes.NoteKey(w["name"], notes.unb64(w["public"], "witness key"), notes.COSIGNATURE_V1),
    )


def as_witness(w: WitnessRef | tuple[str, notes.NoteKey | PublicKey | str]) -> WitnessRef:
  """A `WitnessRef` from one, or from a (url, key) pair."""
  url, key = w
  if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
    raise WitnessError(f"witness URL {url!r} is not http(s)://HOST[:PORT][/PREFIX]")
  return WitnessRef(url.rstrip("/"), cosigner_key(key))


def checkpoint_note(run_id: str, head: LogHead, key: SigningKey) -> notes.Note:
  """The tree head `head` of run `run_id` as a checkpoint signed by the run key."""
  origin = origin_of(run_id)
  text = notes.Checkpoint(origin, head.size, head.root).text()
  return notes.Note(text, (notes.sign_note(text, key, origin),))


def _post(url: str, body: bytes, timeout: float) -> tuple[int, str, bytes]:
  parts = urlsplit(url)
  conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
  conn = conn_cls(parts.hostname, parts.port, timeout=timeout)
  try:
    conn.request(
      "POST", parts.path.rstrip("/") + "/add-checkpoint", body, {"Content-Type": "text/plain"}
    )
    resp = conn.getresponse()
    return resp.status, resp.getheader("Content-Type", ""), resp.read(MAX_RESPONSE)
  except (OSError, http.client.HTTPException) as exc:
    raise WitnessError(f"witness {url} could not be reached: {exc}") from None
  finally:
    conn.close()


def submit(
  witness_url: str,
  note: notes.Note,
  old_size: int,
  proof: Sequence[bytes],
  *,
  prove: Callable[[int], Sequence[bytes]] | None = None,
  witness_key: notes.NoteKey | None = None,
  timeout: float = 10.0,
) -> tuple[notes.NoteSignature, ...]:
  """Submit checkpoint `note` with a proof from `old_size`; the witness's cosignature line(s).

  On 409 (the witness holds another size) the request is retried once from that size with
  `prove(size)`, if given. With `witness_key`, only its cosignatures are returned and at least one
  must verify. Any refusal raises `WitnessError` with the status and the witness's reason.
  """
  checkpoint = notes.parse_checkpoint(note.text)
  for attempt in range(2):
    status, ctype, body = _post(witness_url, encode_request(old_size, proof, note), timeout)
    if status == 409 and ctype.split(";")[0].strip() == SIZE_TYPE:
      try:
        held = notes.decimal(body.decode("ascii").removesuffix("\n"), "witness size")
      except (NoteError, UnicodeDecodeError):
        raise WitnessError(
          f"witness {witness_url} answered 409 with a malformed size", status=409
        ) from None
      if held > checkpoint.size or held == old_size:
        raise WitnessError(
          f"witness {witness_url} holds a checkpoint of size {held} for {checkpoint.origin} that this one "
          f"(size {checkpoint.size}) does not extend: the log was rolled back or forked",
          status=409,
          size=held,
        )
      if prove is None or attempt:
        raise WitnessError(
          f"witness {witness_url} holds size {held}, not {old_size}", status=409, size=held
        )
      old_size, proof = held, list(prove(held))
      continue
    if status != 200:
      reason = body.decode("utf-8", "replace").strip()[:300]
      raise WitnessError(
        f"witness {witness_url} refused the checkpoint of size {checkpoint.size} "
        f"(HTTP {status}): {reason}",
        status=status,
      )
    break
  try:
    sigs = notes.parse_signature_lines(body.decode("utf-8"))
    if witness_key is not None:
      sigs = tuple(s for s in sigs if witness_key.matches(s))
      notes.verify_note(notes.Note(note.text, sigs), [witness_key])
  except (NoteError, UnicodeDecodeError) as exc:
    raise WitnessError(
      f"witness {witness_url} returned no valid cosignature: {exc}", status=200
    ) from None
  return sigs


def note_path(lineage_dir: str | os.PathLike, size: int) -> Path:
  return Path(lineage_dir) / COSIGNATURES / f"{size:012d}.note"


def store_cosignatures(
  lineage_dir: str | os.PathLike, note: notes.Note, sigs: Iterable[notes.NoteSignature]
) -> Path:
  """Add `sigs` to the stored checkpoint note of `note`'s size (created if absent), atomically."""
  path = note_path(lineage_dir, notes.parse_checkpoint(note.text).size)
  if path.exists():
    try:
      held = notes.parse_note(path.read_bytes())
      if held.text == note.text:
        note = held.with_signatures(note.signatures)
    except NoteError:
      pass  # an unreadable note is replaced by the one just cosigned
  return atomic_write(path, note.with_signatures(sigs).to_bytes())


class _Outcome(NamedTuple):
  size: int
  error: BaseException | None


class Publisher:
  """Submits signed heads to witnesses on a background thread (see the module doc).

  The writer thread calls `add_leaf` for every record and `publish` after every signed head;
  `finish` waits for the last submission and raises unless every witness cosigned `final`.
  The tree it keeps for consistency proofs costs about 64 bytes per record.
  """

  def __init__(
    self,
    lineage_dir: str | os.PathLike,
    key: SigningKey,
    run_id: str,
    witnesses: Sequence[WitnessRef],
    leaf_hashes: Sequence[bytes] = (),
    *,
    timeout: float = 10.0,
  ):
    self.dir, self.key, self.run_id, self.timeout = Path(lineage_dir), key, run_id, timeout
    self.witnesses = tuple(witnesses)
    self.outcomes = {w.url: _Outcome(0, None) for w in self.witnesses}
    self._tree = merkle.MerkleTree(leaf_hashes)
    self._lock = threading.Lock()
    self._cond = threading.Condition()
    self._pending: LogHead | None = None
    self._stopping = False
    self._thread = threading.Thread(
      target=self._run, name=f"aqgov-witness-{run_id[:8]}", daemon=True
    )
    self._thread.start()

  def add_leaf(self, leaf_h: bytes) -> None:
    with self._lock:
      self._tree.append(leaf_h)

  def publish(self, head: LogHead) -> None:
    with self._cond:
      self._pending = head
      self._cond.notify()

  def _prove(self, old: int, size: int) -> list[bytes]:
    with self._lock:
      return self._tree.consistency_proof(old, size) if 0 < old < size else []

  def _run(self) -> None:
    while True:
      with self._cond:
        while self._pending is None and not self._stopping:
          self._cond.wait()
        head, self._pending = self._pending, None
      if head is None:
        return
      self._cosign(head)

  def _cosign(self, head: LogHead) -> None:
    note, got = checkpoint_note(self.run_id, head, self.key), []
    for w in self.witnesses:
      held = self.outcomes[w.url].size
      old = held if held <= head.size else 0
      try:
        got += submit(
          w.url,
          note,
          old,
          self._prove(old, head.size),
          prove=lambda s: self._prove(s, head.size),
          witness_key=w.key,
          timeout=self.timeout,
        )
        self.outcomes[w.url] = _Outcome(head.size, None)
      except (AqgovError, OSError) as exc:
        self.outcomes[w.url] = _Outcome(getattr(exc, "size", None) or held, exc)
    if got:
      try:
        store_cosignatures(self.dir, note, got)
      except OSError as exc:
        for w in self.witnesses:
          self.outcomes[w.url] = _Outcome(-1, exc)

  def stop(self) -> None:
    """Submit what is pending, then stop the thread."""
    with self._cond:
      self._stopping = True
      self._cond.notify()
    self._thread.join()

  def finish(self, final: LogHead) -> None:
    """Stop, then raise `WitnessError` unless every witness cosigned the head `final`."""
    self.stop()
    missing = [
      f"{url} ({o.error or 'no submission'})"
      for url, o in self.outcomes.items()
      if o.size != final.size
    ]
    if missing:
      raise WitnessError(
        f"the final tree head (size {final.size}) of run {self.run_id} has no cosignature from "
        f"witness(es) {'; '.join(missing)}. The log is complete and closed but not witnessed; "
        "once the witness is reachable, cosign it with `aqgov witness cosign RUN`"
      )


def cosign_final_head(
  lineage_dir: str | os.PathLike,
  key: SigningKey,
  witnesses: Sequence[WitnessRef],
  *,
  timeout: float = 10.0,
) -> Path:
  """Get cosignatures on the last signed head of the log in `lineage_dir` now (after a run ended
  without them); the path of the stored note."""
  ldir = Path(lineage_dir)
  heads, _ = read_heads(ldir)
  if not heads:
    raise LineageError(f"{ldir} has no signed tree head to cosign")
  size = int(heads[-1].payload["size"])
  log = scan(ldir, bodies=("run-start",), roots_at=(size,))
  if size > log.size:
    raise LineageError(
      f"the last signed head of {ldir} covers {size} records but the log holds {log.size}"
    )
  head, run_id = log.head(size), str(log.bodies[0]["run_id"])
  if head.root.hex() != heads[-1].payload["root"]:
    raise LineageError(
      f"the last signed head of {ldir} does not match its records; verify the log first"
    )
  pub = Publisher(
    ldir, key, run_id, [as_witness(w) for w in witnesses], log.leaf_hashes(size), timeout=timeout
  )
  pub.publish(head)
  pub.finish(head)
  return note_path(ldir, size)


def check_witnessed(
  lineage_dir: str | os.PathLike,
  run_id: str,
  head: LogHead,
  run_key: PublicKey,
  witnesses: Sequence[notes.NoteKey],
) -> tuple[str, ...]:
  """Names of the witnesses whose cosignature on `head` verifies; raises `LineageError` unless all do."""
  path = note_path(lineage_dir, head.size)
  if not path.exists():
    raise LineageError(
      f"the final tree head (size {head.size}) has no cosigned checkpoint ({path} is missing): "
      "the run was not witnessed at this size, or the log was changed after it was",
      index=head.size,
    )
  origin = origin_of(run_id)
  try:
    note = notes.parse_note(path.read_bytes())
    cp = notes.parse_checkpoint(note.text)
  except NoteError as exc:
    raise LineageError(f"{path} is not a cosigned checkpoint: {exc}", index=head.size) from None
  if note.text != notes.Checkpoint(origin, head.size, head.root).text():
    raise LineageError(
      f"the witnessed checkpoint says {cp.origin} size {cp.size} root {cp.root.hex()[:16]}..., but "
      f"the log's final head is size {head.size} root {head.root.hex()[:16]}...: the log was "
      "rewritten or rolled back after the witness cosigned it",
      index=head.size,
    )
  names = []
  for key in [notes.note_key(run_key, origin), *witnesses]:
    try:
      notes.verify_note(note, [key])
    except NoteError as exc:
      who = "the run key" if key.type == notes.ED25519 else f"witness {key.describe()}"
      raise LineageError(
        f"the final tree head (size {head.size}) has no valid signature by {who}: {exc}",
        index=head.size,
      ) from None
    if key.type == notes.COSIGNATURE_V1:
      names.append(key.name or next(s.name for s in note.signatures if key.matches(s)))
  return tuple(names)
