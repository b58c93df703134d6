"""Ed25519 authority keys (PyNaCl) and the trust store that says which ones count.

A key id is the hex SHA-256 of the 32 raw public-key bytes. Private keys live in `NAME.key`
(mode 0600, never printed); public keys in `NAME.pub`. Both are small JSON documents.

Roles say what a key may sign (each document type names the roles allowed to sign it): an
`authority` issues credentials and governance documents, a `governance` key signs policies,
profiles and overrides only, and a `run` key signs only its own lineage heads. A key file without
roles is an authority, except a key named "run", which is a run key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import nacl.exceptions
import nacl.signing

from aqgov.documents._files import (
  PRIVATE_MODE,
  PUBLIC_MODE,
  check_name,
  child,
  create_exclusive,
  make_private_dir,
)
from aqgov.errors import KeyFileError, SignatureError

KEY_TYPE = "ed25519"
AUTHORITY = "authority"
GOVERNANCE = "governance"
RUN = "run"
ROLES = (AUTHORITY, GOVERNANCE, RUN)


def key_roles(name: str, roles: Iterable[str] = ()) -> tuple[str, ...]:
  """The roles of a key: those recorded, else `run` for a key named "run" and `authority` otherwise."""
  roles = tuple(sorted(set(roles)))
  unknown = [r for r in roles if r not in ROLES]
  if unknown:
    raise KeyFileError(f"unknown key role(s) {unknown}; roles are {', '.join(ROLES)}")
  if roles:
    return roles
  return (RUN,) if name == RUN else (AUTHORITY,)


def key_id(public_key: bytes) -> str:
  """Hex SHA-256 of the raw 32-byte Ed25519 public key."""
  return hashlib.sha256(bytes(public_key)).hexdigest()


class PublicKey(NamedTuple):
  """A named Ed25519 verify key; `roles` as recorded in its file (see `key_roles`)."""

  name: str
  raw: bytes
  roles: tuple[str, ...] = ()

  @property
  def key_id(self) -> str:
    return key_id(self.raw)

  def verify(self, message: bytes, signature: bytes) -> bool:
    """True iff `signature` is this key's signature over exactly `message`."""
    try:
      nacl.signing.VerifyKey(self.raw).verify(message, signature)
      return True
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
      return False


class SigningKey(NamedTuple):
  """A named Ed25519 signing key. Its repr never shows the secret."""

  name: str
  seed: bytes
  roles: tuple[str, ...] = ()

  def __repr__(self) -> str:
    return f"SigningKey(name={self.name!r}, key_id={self.public.key_id[:16]}...)"

  @property
  def public(self) -> PublicKey:
    return PublicKey(self.name, bytes(nacl.signing.SigningKey(self.seed).verify_key), self.roles)

  @property
  def key_id(self) -> str:
    return self.public.key_id

  def sign(self, message: bytes) -> bytes:
    """Detached 64-byte Ed25519 signature over `message`."""
    return nacl.signing.SigningKey(self.seed).sign(message).signature


def generate(name: str, roles: Iterable[str] = ()) -> SigningKey:
  """A fresh random signing key called `name`, with `roles` (none recorded: see `key_roles`)."""
  check_name(name, KeyFileError, "key name")
  roles = tuple(sorted(set(roles)))
  key_roles(name, roles)
  return SigningKey(name, bytes(nacl.signing.SigningKey.generate()._seed), roles)  # noqa: SLF001


def _with_roles(doc: dict, roles: tuple[str, ...]) -> dict:
  return {**doc, "roles": list(roles)} if roles else doc


def public_key_json(key: PublicKey) -> str:
  return (
    json.dumps(
      _with_roles(
        {
          "name": key.name,
          "type": KEY_TYPE,
          "key_id": key.key_id,
          "public": base64.b64encode(key.raw).decode(),
        },
        key.roles,
      ),
      indent=2,
    )
    + "\n"
  )


def write_keypair(key: SigningKey, out_dir: str | os.PathLike) -> tuple[Path, Path]:
  """Write new files `DIR/NAME.key` (mode 0600) and `DIR/NAME.pub` (0644), whatever the umask.

  A missing `DIR` is created with mode 0700. Refuses to overwrite either file or to write through
  a symlink planted at either path.
  """
  out = make_private_dir(out_dir)
  key_path = child(
    out, f"{check_name(key.name, KeyFileError, 'key name')}.key", KeyFileError, "key file"
  )
  pub_path = child(out, f"{key.name}.pub", KeyFileError, "key file")
  for path in (key_path, pub_path):
    if path.exists() or path.is_symlink():
      raise KeyFileError(
        f"{path} already exists; refusing to overwrite a key file (choose another name or "
        "directory)"
      )
  body = (
    json.dumps(
      _with_roles(
        {"name": key.name, "type": KEY_TYPE, "seed": base64.b64encode(key.seed).decode()}, key.roles
      )
    )
    + "\n"
  )
  try:
    create_exclusive(key_path, body.encode(), PRIVATE_MODE)
    create_exclusive(pub_path, public_key_json(key.public).encode(), PUBLIC_MODE)
  except FileExistsError:
    raise KeyFileError(
      f"a key file appeared at {key_path} or {pub_path} while writing; refusing to overwrite it"
    ) from None
  except OSError as exc:
    raise KeyFileError(f"cannot write the key pair into {out}: {exc}") from None
  return key_path, pub_path


def _read_json(path: Path, what: str) -> dict:
  try:
    doc = json.loads(Path(path).read_text())
  except FileNotFoundError:
    raise KeyFileError(f"{what} file {path} does not exist") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as exc:
    raise KeyFileError(
      f"{what} file {path} is not valid JSON ({exc}); was it written by `aqgov keys new`?"
    ) from None
  if not isinstance(doc, dict) or doc.get("type") != KEY_TYPE:
    raise KeyFileError(f"{what} file {path} is not an aqgov {KEY_TYPE} key")
  return doc


def _roles_of(doc: dict, path: Path, what: str) -> tuple[str, ...]:
  roles = doc.get("roles", [])
  if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
    raise KeyFileError(f"{what} {path}: 'roles' must be a list of role names")
  try:
    key_roles(str(doc.get("name", path.stem)), roles)
  except KeyFileError as exc:
    raise KeyFileError(f"{what} {path}: {exc}") from None
  return tuple(sorted(set(roles)))


def load_signing_key(path: str | os.PathLike) -> SigningKey:
  """Read a `.key` file; refuses files readable by group or others."""
  path = Path(path)
  doc = _read_json(path, "private key")
  mode = stat.S_IMODE(path.stat().st_mode)
  if mode & 0o077:
    raise KeyFileError(
      f"private key {path} has mode {oct(mode)}; run `chmod 600 {path}` before using it"
    )
  try:
    seed = base64.b64decode(doc["seed"], validate=True)
  except Exception:
    raise KeyFileError(f"private key {path} has no valid 'seed'") from None
  if len(seed) != 32:
    raise KeyFileError(f"private key {path} seed must be 32 bytes, got {len(seed)}")
  return SigningKey(str(doc.get("name", path.stem)), seed, _roles_of(doc, path, "private key"))


def load_public_key(path: str | os.PathLike) -> PublicKey:
  """Read a `.pub` file and check its recorded key id."""
  path = Path(path)
  doc = _read_json(path, "public key")
  try:
    raw = base64.b64decode(doc["public"], validate=True)
  except Exception:
    raise KeyFileError(f"public key {path} has no valid 'public' field") from None
  if len(raw) != 32:
    raise KeyFileError(f"public key {path} must hold 32 bytes, got {len(raw)}")
  if "key_id" in doc and doc["key_id"] != key_id(raw):
    raise KeyFileError(
      f"public key {path}: recorded key_id does not match the key bytes (file altered?)"
    )
  return PublicKey(str(doc.get("name", path.stem)), raw, _roles_of(doc, path, "public key"))


class TrustStore(NamedTuple):
  """The public keys whose signatures count, by key id."""

  keys: Mapping[str, PublicKey]

  @classmethod
  def of(cls, keys: Iterable[PublicKey | SigningKey]) -> TrustStore:
    pubs = [k.public if isinstance(k, SigningKey) else k for k in keys]
    return cls({k.key_id: k for k in pubs})

  @classmethod
  def from_paths(cls, paths: Iterable[str | os.PathLike]) -> TrustStore:
    return cls.of(load_public_key(p) for p in paths)

  def __contains__(self, kid: object) -> bool:
    return kid in self.keys

  def get(self, kid: str) -> PublicKey:
    try:
      return self.keys[kid]
    except KeyError:
      raise SignatureError(
        f"key {kid[:16]}... is not in the trust store; add its .pub with --trust if you trust it"
      ) from None

  def roles(self, kid: str) -> tuple[str, ...]:
    """What the trusted key `kid` may sign (see `key_roles`)."""
    key = self.get(kid)
    return key_roles(key.name, key.roles)

  def by_name(self, name: str) -> PublicKey:
    for k in self.keys.values():
      if k.name == name:
        return k
    raise SignatureError(
      f"no trusted key named {name!r}; trusted: {sorted(k.name for k in self.keys.values())}"
    )
