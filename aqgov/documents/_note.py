"""C2SP signed notes, tlog checkpoints and Ed25519 cosignatures (cosignature/v1).

A note is UTF-8 text ending in a newline, a blank line, then signature lines
`— <key name> <base64(4-byte key hash || signature)>`. The key hash of an Ed25519 key is
`SHA-256(name || 0x0A || type || public key)[:4]` with type 0x01 for a plain note signature (over
the text) and 0x04 for a witness cosignature (over `cosignature/v1\\ntime <t>\\n` + the text; its
signature bytes are an 8-byte big-endian timestamp then the 64-byte signature). A checkpoint is a
note whose text is `<origin>\\n<size>\\n<base64 root>\\n`, optionally followed by extension lines.
A verifier key is `<name>+<hex key hash>+<base64(type || public key)>`.

Parsing is strict: anything the specifications do not allow raises `NoteError`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from aqgov.documents._keys import PublicKey, SigningKey
from aqgov.errors import NoteError

ED25519 = 0x01
COSIGNATURE_V1 = 0x04
SIGNATURE_TYPES = (ED25519, COSIGNATURE_V1)
DASH = "\u2014 "
MAX_SIGNATURES = 64
_NAME = re.compile(r"[^\s+]+")
_DECIMAL = re.compile(r"0|[1-9][0-9]*")


def b64(data: bytes) -> str:
  return base64.b64encode(data).decode("ascii")


def unb64(text: str, what: str) -> bytes:
  """Strict standard base64 (padding required, no whitespace), re-encoded to check it is canonical."""
  try:
    data = base64.b64decode(text.encode("ascii"), validate=True)
  except (binascii.Error, UnicodeEncodeError, ValueError):
    raise NoteError(f"{what} {text[:40]!r} is not base64") from None
  if b64(data) != text:
    raise NoteError(f"{what} {text[:40]!r} is not canonical base64")
  return data


def decimal(text: str, what: str) -> int:
  """An ASCII decimal without leading zeroes."""
  if not _DECIMAL.fullmatch(text) or len(text) > 20:
    raise NoteError(f"{what} {text[:40]!r} is not a decimal number without leading zeroes")
  return int(text)


def check_name(name: str) -> str:
  """A key name or origin: non-empty, without Unicode spaces or '+'."""
  if not isinstance(name, str) or not _NAME.fullmatch(name):
    raise NoteError(
      f"key name {name!r} must be non-empty and contain no spaces or '+' (e.g. example.com/log)"
    )
  return name


def key_hash(name: str, sig_type: int, raw: bytes) -> bytes:
  """The 4-byte key hash of Ed25519 key `raw` called `name` for signature type `sig_type`."""
  return hashlib.sha256(
    check_name(name).encode() + b"\n" + bytes([sig_type]) + bytes(raw)
  ).digest()[:4]


class NoteKey(NamedTuple):
  """A public key notes are checked against: note name, raw Ed25519 key and signature type.

  `name=None` accepts a signature line of any name whose key hash fits this key (an Ed25519
  signature does not commit to the name; the key does the identifying).
  """

  name: str | None
  raw: bytes
  type: int = ED25519

  def hash_for(self, name: str) -> bytes:
    return key_hash(name, self.type, self.raw)

  def matches(self, sig: NoteSignature) -> bool:
    return (self.name is None or sig.name == self.name) and sig.key_hash == self.hash_for(sig.name)

  @property
  def verifier_key(self) -> str:
    if self.name is None:
      raise NoteError("a key without a note name has no verifier key string; give it a name")
    return f"{self.name}+{self.hash_for(self.name).hex()}+{b64(bytes([self.type]) + self.raw)}"

  def describe(self) -> str:
    return self.name or f"key {hashlib.sha256(self.raw).hexdigest()[:16]}..."


def note_key(key: PublicKey | SigningKey, name: str | None, sig_type: int = ED25519) -> NoteKey:
  """The note key of an aqgov key pair's public half."""
  pub = key.public if isinstance(key, SigningKey) else key
  return NoteKey(None if name is None else check_name(name), bytes(pub.raw), sig_type)


def parse_verifier_key(text: str) -> NoteKey:
  """`<name>+<hex key hash>+<base64(type || key)>` (types 0x01 and 0x04, Ed25519)."""
  parts = text.strip().split("+", 2)  # the base64 may itself hold "+"
  if len(parts) != 3:
    raise NoteError(
      f"verifier key {text[:60]!r} is not NAME+HASH+KEY (as `aqgov witness serve` prints it)"
    )
  name, hash_hex, key_b64 = parts
  check_name(name)
  blob = unb64(key_b64, "verifier key material")
  if len(blob) != 33 or blob[0] not in SIGNATURE_TYPES:
    raise NoteError(f"verifier key {name!r} is not an Ed25519 key of type 0x01 or 0x04")
  key = NoteKey(name, blob[1:], blob[0])
  if not re.fullmatch(r"[0-9a-f]{8}", hash_hex) or bytes.fromhex(hash_hex) != key.hash_for(name):
    raise NoteError(f"verifier key {name!r}: key hash {hash_hex!r} does not match its name and key")
  return key


class NoteSignature(NamedTuple):
  """One signature line: key name, 4-byte key hash, and the signature bytes after it."""

  name: str
  key_hash: bytes
  sig: bytes

  def line(self) -> str:
    return f"{DASH}{self.name} {b64(self.key_hash + self.sig)}\n"


def parse_signature_line(line: str) -> NoteSignature:
  """One `— name base64` line, without its newline."""
  if not line.startswith(DASH):
    raise NoteError(f"signature line {line[:40]!r} does not start with an em dash and a space")
  fields = line[len(DASH) :].split(" ")
  if len(fields) != 2:
    raise NoteError(f"signature line {line[:40]!r} is not '— NAME SIGNATURE'")
  name, blob = check_name(fields[0]), unb64(fields[1], "signature")
  if len(blob) < 5:
    raise NoteError(f"signature by {name!r} is too short to hold a key hash and a signature")
  return NoteSignature(name, blob[:4], blob[4:])


def parse_signature_lines(text: str) -> tuple[NoteSignature, ...]:
  """Newline-terminated signature lines (a witness's add-checkpoint response)."""
  if not text.endswith("\n"):
    raise NoteError("signature lines must each end in a newline")
  lines = text[:-1].split("\n")
  if len(lines) > MAX_SIGNATURES:
    raise NoteError(f"more than {MAX_SIGNATURES} signature lines")
  return tuple(parse_signature_line(x) for x in lines)


class Note(NamedTuple):
  """A signed note: its text (ending in a newline) and its signature lines."""

  text: str
  signatures: tuple[NoteSignature, ...] = ()

  def to_bytes(self) -> bytes:
    return (self.text + "\n" + "".join(s.line() for s in self.signatures)).encode("utf-8")

  def with_signatures(self, sigs: Iterable[NoteSignature]) -> Note:
    """This note with `sigs` added (a signature line it already carries is not repeated)."""
    out = list(self.signatures)
    out += [s for s in sigs if s not in out]
    return self._replace(signatures=tuple(out))


def _check_text(text: str) -> None:
  if any(ord(c) < 0x20 and c != "\n" for c in text):
    raise NoteError("a note must not contain control characters other than newline")


def parse_note(data: bytes | str) -> Note:
  """A signed note's text and signature lines; the text ends at the last blank line."""
  if isinstance(data, bytes):
    try:
      data = data.decode("utf-8")
    except UnicodeDecodeError:
      raise NoteError("a note must be valid UTF-8") from None
  _check_text(data)
  split = data.rfind("\n\n")
  if split < 0 or not data.endswith("\n"):
    raise NoteError("a note is text, a blank line, then signature lines each ending in a newline")
  text, sigs = data[: split + 1], data[split + 2 :]
  if not sigs:
    raise NoteError("a note needs at least one signature line after its blank line")
  return Note(text, parse_signature_lines(sigs))


def sign_note(text: str, key: SigningKey, name: str) -> NoteSignature:
  """An Ed25519 (type 0x01) signature line by `key` called `name` over `text`."""
  _check_text(text)
  if not text.endswith("\n"):
    raise NoteError("note text must end in a newline")
  return NoteSignature(
    check_name(name), key_hash(name, ED25519, key.public.raw), key.sign(text.encode("utf-8"))
  )


def cosigned_message(text: str, timestamp: int) -> bytes:
  """What a cosignature/v1 signs: the header and time lines, then the checkpoint text."""
  return f"cosignature/v1\ntime {int(timestamp)}\n".encode() + text.encode("utf-8")


def cosign(text: str, key: SigningKey, name: str, timestamp: int) -> NoteSignature:
  """A timestamped Ed25519 cosignature (type 0x04) by witness `key` called `name` on checkpoint `text`."""
  if not 0 <= int(timestamp) < 1 << 63:
    raise NoteError(f"cosignature time {timestamp} is out of range")
  parse_checkpoint(text)
  sig = key.sign(cosigned_message(text, timestamp))
  return NoteSignature(
    check_name(name),
    key_hash(name, COSIGNATURE_V1, key.public.raw),
    int(timestamp).to_bytes(8, "big") + sig,
  )


def cosignature_time(sig: NoteSignature) -> int:
  """The timestamp a cosignature carries."""
  if len(sig.sig) != 72:
    raise NoteError(f"cosignature by {sig.name!r} is {len(sig.sig)} bytes, not 8 + 64")
  return int.from_bytes(sig.sig[:8], "big")


def _valid(key: NoteKey, text: str, sig: NoteSignature) -> bool:
  if key.type == COSIGNATURE_V1:
    if len(sig.sig) != 72 or cosignature_time(sig) >= 1 << 63:
      return False
    return PublicKey("", key.raw).verify(cosigned_message(text, cosignature_time(sig)), sig.sig[8:])
  return len(sig.sig) == 64 and PublicKey("", key.raw).verify(text.encode("utf-8"), sig.sig)


def verify_note(note: Note, keys: Sequence[NoteKey]) -> tuple[NoteKey, ...]:
  """The known keys whose signatures on `note` verify; raises unless there is at least one.

  Signatures by unknown keys are ignored; a signature by a known key that does not verify rejects
  the whole note (it was altered after signing, or the signature is forged).
  """
  good = []
  for sig in note.signatures:
    for key in keys:
      if key.matches(sig):
        if not _valid(key, note.text, sig):
          raise NoteError(
            f"signature by {sig.name!r} does not verify: the note was altered after signing "
            "or the signature is forged"
          )
        if key not in good:
          good.append(key)
  if not good:
    names = ", ".join(k.describe() for k in keys) or "none"
    raise NoteError(
      f"the note carries no signature by a known key (known: {names}; signed by: "
      f"{', '.join(s.name for s in note.signatures)})"
    )
  return tuple(good)


class Checkpoint(NamedTuple):
  """A transparency log checkpoint: origin, tree size, root hash and extension lines."""

  origin: str
  size: int
  root: bytes
  extensions: tuple[str, ...] = ()

  def text(self) -> str:
    check_name(self.origin)
    if len(self.root) != 32:
      raise NoteError(f"a checkpoint root is 32 bytes, got {len(self.root)}")
    return "".join(
      f"{line}\n" for line in (self.origin, str(int(self.size)), b64(self.root), *self.extensions)
    )


def parse_checkpoint(text: str) -> Checkpoint:
  """A checkpoint from its note text (strict: a canonical size, a 32-byte root, no empty lines)."""
  if not text.endswith("\n"):
    raise NoteError("checkpoint text must end in a newline")
  lines = text[:-1].split("\n")
  if len(lines) < 3 or any(not line for line in lines):
    raise NoteError("a checkpoint has an origin, a size and a root hash line (and no empty lines)")
  origin, size, root = (
    lines[0],
    decimal(lines[1], "checkpoint size"),
    unb64(lines[2], "checkpoint root"),
  )
  if not origin.strip() or origin != origin.strip():
    raise NoteError(f"checkpoint origin {origin!r} is empty or padded")
  if len(root) != 32:
    raise NoteError(f"checkpoint root is {len(root)} bytes, not 32")
  return Checkpoint(origin, size, root, tuple(lines[3:]))
