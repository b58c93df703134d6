"""Signed documents: a canonical payload plus detached Ed25519 signatures.

A document is `{"kind": str, "payload": map, "signatures": [{"key_id", "signer", "sig"}]}`.
Each signature covers `PAE("aqgov/" + kind, canonical(payload))` (DSSE pre-authentication
encoding), so a signature on one kind of document never verifies as another. The document id is
the hex SHA-256 of the canonical payload: signatures can be added without changing it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from aqgov.documents import _canonical as canonical
from aqgov.documents._keys import SigningKey, TrustStore
from aqgov.errors import SignatureError


def pae(payload_type: str, payload: bytes) -> bytes:
  """DSSE v1 pre-authentication encoding."""
  t = payload_type.encode("utf-8")
  return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


class Signature(NamedTuple):
  key_id: str
  signer: str
  sig: bytes


class SignedDocument(NamedTuple):
  """A payload of some `kind` with zero or more signatures."""

  kind: str
  payload: Mapping[str, Any]
  signatures: tuple[Signature, ...] = ()

  @property
  def id(self) -> str:
    return canonical.digest_hex(self.payload)

  @property
  def signers(self) -> tuple[str, ...]:
    """Signer names recorded on the signatures (unverified: `verify_signatures` checks them)."""
    return tuple(s.signer for s in self.signatures)

  def signed_bytes(self) -> bytes:
    return pae("aqgov/" + self.kind, canonical.encode(self.payload))

  def to_bytes(self) -> bytes:
    return canonical.encode(
      {
        "kind": self.kind,
        "payload": self.payload,
        "signatures": [
          {"key_id": s.key_id, "signer": s.signer, "sig": s.sig} for s in self.signatures
        ],
      }
    )

  @classmethod
  def from_bytes(cls, data: bytes, *, kind: str | None = None) -> SignedDocument:
    try:
      doc = canonical.decode(data)
      sigs = tuple(
        Signature(str(s["key_id"]), str(s["signer"]), bytes(s["sig"])) for s in doc["signatures"]
      )
      out = cls(str(doc["kind"]), doc["payload"], sigs)
    except SignatureError:
      raise
    except Exception as exc:
      raise SignatureError(
        f"not a signed aqgov document ({exc}); the file may be truncated or altered"
      ) from None
    if not isinstance(out.payload, dict):
      raise SignatureError("signed document payload is not a map")
    if kind is not None and out.kind != kind:
      raise SignatureError(f"expected a signed {kind!r} document, got {out.kind!r}")
    return out


def add_signature(doc: SignedDocument, key: SigningKey) -> SignedDocument:
  """`doc` with `key`'s signature added (replacing an earlier one by the same key)."""
  sig = Signature(key.key_id, key.name, key.sign(doc.signed_bytes()))
  others = tuple(s for s in doc.signatures if s.key_id != key.key_id)
  return doc._replace(signatures=others + (sig,))


def verify_signatures(
  doc: SignedDocument,
  trust: TrustStore,
  *,
  min_signers: int = 1,
  roles: Sequence[str] | None = None,
) -> tuple[str, ...]:
  """Names of the trusted keys whose signatures verify; raises unless at least `min_signers`.

  Any signature that does not verify raises (a forged or tampered document is never half-trusted);
  signatures by keys outside the trust store are ignored, but do not count. With `roles`, a
  trusted signer holding none of them is refused (a run key never signs a policy).
  """
  if not doc.signatures:
    raise SignatureError(
      f"{doc.kind} {doc.id[:16]}... carries no signature; sign it with `aqgov ... sign --key`"
    )
  message = doc.signed_bytes()
  signers, untrusted = [], []
  for s in doc.signatures:
    if s.key_id not in trust:
      untrusted.append(s.signer or s.key_id[:16])
      continue
    key = trust.get(s.key_id)
    if not key.verify(message, s.sig):
      raise SignatureError(
        f"signature by {key.name!r} on {doc.kind} {doc.id[:16]}... does not verify: "
        "the document was altered after signing or the signature is forged"
      )
    if s.signer != key.name:
      raise SignatureError(
        f"signature on {doc.kind} {doc.id[:16]}... names signer {s.signer!r} but its key is trusted as "
        f"{key.name!r}: the document was altered after signing"
      )
    if roles is not None and not set(trust.roles(s.key_id)) & set(roles):
      raise SignatureError(
        f"{doc.kind} {doc.id[:16]}... is signed by {key.name!r}, a {'/'.join(trust.roles(s.key_id))} key; "
        f"only {' or '.join(roles)} keys may sign a {doc.kind} document"
      )
    signers.append(key.name)
  if len(signers) < min_signers:
    hint = f" (signed only by untrusted keys: {', '.join(untrusted)})" if untrusted else ""
    raise SignatureError(
      f"{doc.kind} {doc.id[:16]}... has {len(signers)} trusted signature(s), needs {min_signers}{hint}; "
      "pass the signer's .pub with --trust if you trust it"
    )
  return tuple(signers)
