"""Document types: how one kind of signed document is built, parsed and who may sign it.

Every signed governance document (routing policy, entropy profile, override token, credential
manifest, lineage head) is a `SignedDocument` whose payload is `to_payload(obj)`. Its
`DocumentType` names the PAE payload type suffix (`kind`), the conversions, the key roles that may
sign it and the typed errors it raises; `sign`, `verify`, `read` and `write` work for every type:

    signed = sign(POLICY, policy, key)
    write(POLICY, signed, "p.signed")
    policy = verify(POLICY, read(POLICY, "p.signed"), trust)

Types register themselves by `name` (and `kind`) so that tools can look one up with
`document_type("policy")`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

from aqgov.documents import _canonical as canonical
from aqgov.documents._files import atomic_write, read_bytes
from aqgov.documents._keys import AUTHORITY, GOVERNANCE, SigningKey, TrustStore
from aqgov.documents._signing import SignedDocument, add_signature, verify_signatures
from aqgov.errors import AqgovError, SignatureError

T = TypeVar("T")

GOVERNANCE_SIGNERS = (AUTHORITY, GOVERNANCE)
_REGISTRY: dict[str, DocumentType] = {}


@dataclasses.dataclass(frozen=True)
class DocumentType(Generic[T]):
  """One kind of signed document.

  Attributes:
    name: short name tools use (`"policy"`, `"profile"`).
    kind: the signed payload type is `"aqgov/" + kind`; part of every signature, never changes.
    noun: what error messages call it (`"routing policy"`).
    to_payload: the document's canonical payload map.
    from_payload: the document from a payload; raises `error` when it is not a valid one.
    signer_roles: key roles whose signatures count (see `aqgov.documents.key_roles`).
    error: raised for files and payloads that are not such a document.
    refused: raised for signatures that do not verify (messages are prefixed when not `SignatureError`).
    from_text: the document from its text (TOML) form, for types that have one.
    on_verified: `(document, signer names) -> document`, run once the signatures verify: checks
      the signers against the document and may record them on it.
  """

  name: str
  kind: str
  noun: str
  to_payload: Callable[[T], Mapping[str, Any]]
  from_payload: Callable[[Mapping[str, Any]], T]
  signer_roles: tuple[str, ...] = GOVERNANCE_SIGNERS
  error: type[AqgovError] = SignatureError
  refused: type[AqgovError] = SignatureError
  from_text: Callable[[str], T] | None = None
  on_verified: Callable[[T, tuple[str, ...]], T] | None = None


def signed_by_named_authority(
  noun: str, error: type[AqgovError]
) -> Callable[[T, tuple[str, ...]], T]:
  """An `on_verified` check for documents that name their `authority` (policies, profiles): only
  that authority's key may sign them, so one authority cannot issue another's document."""

  def check(doc: T, signers: tuple[str, ...]) -> T:
    authority = getattr(doc, "authority", "")
    if authority and authority not in signers:
      raise error(
        f"{noun} {doc.name!r} names authority {authority!r} but is signed by "
        f"{list(signers)}; only {authority}'s key may sign it"
      )
    return doc

  return check


def register(doc_type: DocumentType[T]) -> DocumentType[T]:
  """Make `doc_type` findable by `document_type(name or kind)`; returns it."""
  for key in (doc_type.name, doc_type.kind):
    if _REGISTRY.get(key, doc_type) != doc_type:
      raise ValueError(f"a different document type is already registered as {key!r}")
    _REGISTRY[key] = doc_type
  return doc_type


def document_type(name: str) -> DocumentType:
  """The registered document type called `name` (or of kind `name`)."""
  try:
    return _REGISTRY[name]
  except KeyError:
    known = sorted({t.name for t in _REGISTRY.values()})
    raise LookupError(
      f"no document type {name!r}; registered: {', '.join(known) or '(none)'}"
    ) from None


def signer_roles(kind: str) -> tuple[str, ...]:
  """Roles that may sign a document of `kind`: its type's, or governance signers for unregistered kinds."""
  doc_type = _REGISTRY.get(kind)
  return doc_type.signer_roles if doc_type is not None else GOVERNANCE_SIGNERS


def _refuse(doc_type: DocumentType, exc: SignatureError) -> AqgovError:
  if doc_type.refused is SignatureError:
    return exc
  return doc_type.refused(f"{doc_type.noun} refused: {exc}")


def _check_kind(doc_type: DocumentType, signed: Any) -> SignedDocument:
  if not isinstance(signed, SignedDocument):
    raise doc_type.error(
      f"expected a signed {doc_type.noun} ({doc_type.kind!r} document), got "
      f"{type(signed).__name__}; read it with aqgov.documents.read"
    )
  if signed.kind != doc_type.kind:
    raise doc_type.error(f"expected a signed {doc_type.kind!r} document, got {signed.kind!r}")
  return signed


def payload_of(doc_type: DocumentType[T], signed: SignedDocument) -> T:
  """The document inside `signed`, checked to be in normal form; signatures are NOT checked."""
  doc = doc_type.from_payload(_check_kind(doc_type, signed).payload)
  if canonical.encode(doc_type.to_payload(doc)) != canonical.encode(signed.payload):
    raise doc_type.error(
      f"signed {doc_type.noun} {signed.id[:16]}... is not in normal form; re-create it "
      f"from its source and sign it again"
    )
  return doc


def sign(doc_type: DocumentType[T], doc: T | SignedDocument, key: SigningKey) -> SignedDocument:
  """A signed document of `doc_type`; signing a signed one adds (or renews) `key`'s signature."""
  if isinstance(doc, SignedDocument):
    payload_of(doc_type, doc)
    return add_signature(doc, key)
  return add_signature(SignedDocument(doc_type.kind, doc_type.to_payload(doc)), key)


def verify(
  doc_type: DocumentType[T], signed: SignedDocument, trust: TrustStore, *, min_signers: int = 1
) -> T:
  """The document in `signed` once at least `min_signers` trusted keys of an allowed role signed it.

  Raises `doc_type.refused` when it is unsigned, forged, altered, or signed by untrusted keys or
  by a key whose role may not sign it (a run key signs only lineage heads), and `doc_type.error`
  when it is of another kind or its payload is not a valid document.
  """
  _check_kind(doc_type, signed)
  try:
    signers = verify_signatures(signed, trust, min_signers=min_signers, roles=doc_type.signer_roles)
  except SignatureError as exc:
    raise _refuse(doc_type, exc) from None
  doc = payload_of(doc_type, signed)
  return doc if doc_type.on_verified is None else doc_type.on_verified(doc, signers)


def read(doc_type: DocumentType, path: str | os.PathLike) -> SignedDocument:
  """The signed document in file `path` (signatures are not checked here: use `verify`)."""
  data = read_bytes(path, doc_type.error, f"signed {doc_type.noun}")
  try:
    return SignedDocument.from_bytes(data, kind=doc_type.kind)
  except SignatureError as exc:
    raise _refuse(doc_type, SignatureError(f"{path}: {exc}")) from None


def write(doc_type: DocumentType, signed: SignedDocument, path: str | os.PathLike) -> Path:
  """Write `signed` to `path` atomically (never a half-written file)."""
  _check_kind(doc_type, signed)
  return atomic_write(path, signed.to_bytes())


def read_any(doc_type: DocumentType[T], path: str | os.PathLike) -> SignedDocument | T:
  """A signed file as it is, or else the document parsed from the file's text form (TOML)."""
  data = read_bytes(path, doc_type.error, doc_type.noun)
  try:
    return SignedDocument.from_bytes(data, kind=doc_type.kind)
  except SignatureError:
    if doc_type.from_text is None:
      raise doc_type.error(f"{path} is not a signed {doc_type.noun}") from None
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError:
    raise doc_type.error(f"{path} is neither a signed {doc_type.noun} nor its TOML text") from None
  return doc_type.from_text(text)


def load(doc_type: DocumentType[T], path: str | os.PathLike) -> T:
  """The document in a signed file or a text (TOML) file, WITHOUT checking signatures (to inspect it).

  Use `verify(doc_type, read(doc_type, path), trust)` wherever the document governs training.
  """
  doc = read_any(doc_type, path)
  return payload_of(doc_type, doc) if isinstance(doc, SignedDocument) else doc
