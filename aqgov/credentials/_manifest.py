"""Credential manifests: an authority's signed statement binding examples to labels.

An entry binds an example id and the SHA-256 of the example's content bytes to labels under the
authority's taxonomy. The manifest is one `SignedDocument` of type `MANIFEST` (kind
"credential-manifest", read, written and verified with `aqgov.documents`) whose
payload holds the authority's name, its taxonomy (canonical dict and id), the RFC 9162 Merkle root
over the entries' canonical bytes, the entry count and the entries. One signature covers it all;
the root lets a single entry be proven to a third party with an O(log n) inclusion proof, without
shipping the other entries.

Content bytes: a text example is its UTF-8 encoding; a `content_b64` example is the decoded bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from aqgov.credentials._taxonomy import Taxonomy
from aqgov.documents import _canonical as canonical
from aqgov.documents import _merkle as merkle
from aqgov.documents import _signing as signing
from aqgov.documents._document_type import DocumentType, register, sign
from aqgov.documents._keys import AUTHORITY, SigningKey, TrustStore
from aqgov.errors import CredentialError, SignatureError, TaxonomyError

KIND = "credential-manifest"


class Example(NamedTuple):
  """One training example: an id, its content bytes and (optionally) its labels.

  `labels` is either flat (`{field: value}` under one taxonomy) or keyed by authority
  (`{authority: {field: value}}`); `None` when the example carries no labels of its own.
  """

  id: str
  content: bytes
  labels: Mapping[str, Any] | None = None


def content_hash(content: bytes) -> str:
  """Hex SHA-256 of an example's content bytes."""
  return canonical.sha256(bytes(content)).hex()


def _is_text(s: str) -> bool:
  """Whether `s` is Unicode text (it has a UTF-8 form: no lone surrogates)."""
  try:
    s.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


def as_example(record: Example | Mapping[str, Any], where: str = "example") -> Example:
  """An `Example` from itself or from a JSONL-shaped mapping (`id`, `content` | `content_b64`, `labels`)."""
  if isinstance(record, Example):
    return record
  if not isinstance(record, Mapping):
    raise CredentialError(
      f"{where}: expected a mapping with 'id' and 'content', got {type(record).__name__}"
    )
  ex_id = record.get("id")
  if not isinstance(ex_id, str) or not ex_id or not _is_text(ex_id):
    raise CredentialError(
      f"{where}: 'id' must be a non-empty string of Unicode text, got {ex_id!r}"
    )
  has_text, has_b64 = "content" in record, "content_b64" in record
  if has_text == has_b64:
    raise CredentialError(
      f"{where} (id {ex_id!r}): give exactly one of 'content' (text) or 'content_b64'"
    )
  if has_text:
    text = record["content"]
    if isinstance(text, (bytes, bytearray)):
      content = bytes(text)
    elif isinstance(text, str) and _is_text(text):
      content = text.encode("utf-8")
    else:
      raise CredentialError(
        f"{where} (id {ex_id!r}): 'content' must be text (Unicode, no lone surrogates), got "
        f"{type(text).__name__} {text!r:.40}"
      )
  else:
    try:
      content = base64.b64decode(record["content_b64"], validate=True)
    except (binascii.Error, TypeError, ValueError):
      raise CredentialError(f"{where} (id {ex_id!r}): 'content_b64' is not valid base64") from None
  labels = record.get("labels")
  if labels is not None and not isinstance(labels, Mapping):
    raise CredentialError(
      f"{where} (id {ex_id!r}): 'labels' must be a mapping, got {type(labels).__name__}"
    )
  return Example(ex_id, content, labels)


def iter_examples(path: str | os.PathLike) -> Iterator[Example]:
  """Examples from a JSONL file, one per non-blank line; errors name the file and line."""
  path = Path(path)
  try:
    fh = path.open("rb")
  except FileNotFoundError:
    raise CredentialError(f"examples file {path} does not exist") from None
  except OSError as exc:
    raise CredentialError(f"cannot read examples file {path}: {exc.strerror or exc}") from None
  with fh:
    for lineno, raw in enumerate(fh, start=1):
      where = f"{path}:{lineno}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as exc:
        raise CredentialError(
          f"{where}: not UTF-8 text (bad byte at column {exc.start + 1}); "
          "write the examples file as UTF-8"
        ) from None
      if not line.strip():
        continue
      yield as_example(_json_line(line, where), where)


def _json_line(line: str, where: str) -> Any:
  """The JSON value of one line, which must be Unicode text all through (no lone surrogates)."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError as exc:
    raise CredentialError(
      f"{where}: not valid JSON ({exc.msg}); each line must be one JSON object"
    ) from None
  except RecursionError:
    raise CredentialError(
      f"{where}: JSON nests too deeply to be read; an example is a flat JSON object"
    ) from None
  try:
    json.dumps(record, ensure_ascii=False).encode("utf-8")
  except UnicodeEncodeError:
    raise CredentialError(
      f"{where}: a string holds a lone surrogate escape (such as \\ud800), which is not "
      "Unicode text; fix the example's text"
    ) from None
  except RecursionError:
    raise CredentialError(
      f"{where}: JSON nests too deeply to be read; an example is a flat JSON object"
    ) from None
  return record


def read_examples(path: str | os.PathLike) -> list[Example]:
  """All examples of a JSONL file (see `iter_examples`)."""
  return list(iter_examples(path))


def labels_for(example: Example, authority: str) -> Mapping[str, Any] | None:
  """The example's labels for `authority`: the flat labels, or its entry when keyed by authority.

  Labels are keyed by authority when every value is a mapping (no field kind has mapping values).
  """
  labels = example.labels
  if labels is None:
    return None
  if all(isinstance(v, Mapping) for v in labels.values()):
    return labels.get(authority)
  return labels


def expects_credential(example: Example, authority: str) -> bool:
  """Whether `authority`'s manifest should cover the example: it has labels for it, or no labels of its own."""
  return example.labels is None or labels_for(example, authority) is not None


class Entry(NamedTuple):
  """One credential: example id, hex SHA-256 of its content bytes, labels under the taxonomy."""

  id: str
  sha256: str
  labels: Mapping[str, Any]

  def to_dict(self) -> dict:
    return {"id": self.id, "sha256": self.sha256, "labels": dict(self.labels)}

  def leaf_bytes(self) -> bytes:
    """The canonical bytes this entry contributes to the Merkle tree."""
    return canonical.encode(self.to_dict())

  def leaf_hash(self) -> bytes:
    return merkle.leaf_hash(self.leaf_bytes())


class InclusionProof(NamedTuple):
  """RFC 9162 audit path proving the entry at `index` is in a manifest's tree."""

  index: int
  path: tuple[bytes, ...]


def normalise_labels(taxonomy: Taxonomy, labels: Mapping[str, Any]) -> dict:
  """Labels checked against `taxonomy`, with flag sets written once each in taxonomy order."""
  taxonomy.encode_one(labels)
  out = {}
  for f in taxonomy.fields:
    value = labels[f.name]
    out[f.name] = [v for v in f.values if v in value] if f.kind == "flags" else value
  return out


def _entry_from(obj: Any, index: int) -> Entry:
  if not isinstance(obj, Mapping) or set(obj) != {"id", "sha256", "labels"}:
    raise CredentialError(
      f"manifest entry #{index} is not a map of id, sha256 and labels; the file is malformed"
    )
  ex_id, digest, labels = obj["id"], obj["sha256"], obj["labels"]
  if not isinstance(ex_id, str) or not isinstance(digest, str) or not isinstance(labels, Mapping):
    raise CredentialError(
      f"manifest entry #{index} has fields of the wrong type; the file is malformed"
    )
  return Entry(ex_id, digest, labels)


class Manifest:
  """A parsed view of a (not yet verified) credential manifest document.

  Use `aqgov.documents.verify(MANIFEST, manifest.document, trust)` before trusting it.
  """

  def __init__(self, document: signing.SignedDocument):
    if document.kind != KIND:
      raise CredentialError(f"expected a signed {KIND!r} document, got {document.kind!r}")
    p = document.payload
    need = {"authority", "taxonomy", "taxonomy_id", "root", "size", "entries"}
    if not need <= set(p):
      raise CredentialError(
        f"credential manifest lacks {sorted(need - set(p))}; the file is malformed"
      )
    if (
      not isinstance(p["entries"], list)
      or not isinstance(p["size"], int)
      or not isinstance(p["root"], str)
    ):
      raise CredentialError(
        "credential manifest has entries, size or root of the wrong type; the file is malformed"
      )
    try:
      self.root = bytes.fromhex(p["root"])
    except ValueError:
      raise CredentialError("credential manifest root is not hex; the file is malformed") from None
    self.document = document
    self.authority = str(p["authority"])
    self.size = p["size"]
    self.entries = tuple(_entry_from(e, i) for i, e in enumerate(p["entries"]))
    self._index: dict[str, int] = {}
    for i, e in enumerate(self.entries):
      self._index.setdefault(e.id, i)
    self._tree: merkle.MerkleTree | None = None

  def __repr__(self) -> str:
    return f"Manifest(authority={self.authority!r}, size={self.size}, id={self.id[:16]}...)"

  @property
  def id(self) -> str:
    """Hex SHA-256 of the canonical payload."""
    return self.document.id

  @property
  def taxonomy(self) -> Taxonomy:
    try:
      return Taxonomy.from_dict(self.document.payload["taxonomy"])
    except TaxonomyError as exc:
      raise CredentialError(
        f"manifest of {self.authority!r} carries an invalid taxonomy: {exc}"
      ) from None

  @property
  def taxonomy_id(self) -> str:
    return str(self.document.payload["taxonomy_id"])

  def __contains__(self, example_id: object) -> bool:
    return example_id in self._index

  def _position(self, example_id: str) -> int:
    if example_id not in self._index:
      raise CredentialError(
        f"manifest of {self.authority!r} has no entry for example {example_id!r}; issue a manifest that covers it"
      )
    return self._index[example_id]

  def entry(self, example_id: str) -> Entry:
    """The entry for `example_id`; `CredentialError` if the manifest has none."""
    return self.entries[self._position(example_id)]

  def inclusion_proof(self, example_id: str) -> InclusionProof:
    """Audit path of `example_id`'s entry, verifiable with `verify_entry` against `root` and `size`."""
    index = self._position(example_id)
    if self._tree is None:
      self._tree = merkle.MerkleTree([e.leaf_hash() for e in self.entries])
    return InclusionProof(index, tuple(self._tree.inclusion_proof(index)))

  def to_bytes(self) -> bytes:
    return self.document.to_bytes()

  @classmethod
  def from_bytes(cls, data: bytes) -> Manifest:
    try:
      return cls(signing.SignedDocument.from_bytes(data, kind=KIND))
    except SignatureError as exc:
      raise CredentialError(f"not a credential manifest: {exc}") from None


def verify_entry(entry: Entry, proof: InclusionProof, root: bytes, size: int) -> bool:
  """True iff `proof` shows `entry` is leaf `proof.index` of the tree of `size` leaves with `root`."""
  return merkle.verify_inclusion(entry.leaf_hash(), proof.index, size, list(proof.path), root)


def issue_manifest(
  key: SigningKey,
  taxonomy: Taxonomy,
  examples: Iterable[Example | Mapping[str, Any]],
  *,
  skip_unlabelled: bool = False,
) -> Manifest:
  """Sign a manifest crediting `examples` with their labels for `taxonomy`'s authority.

  Entries are ordered by example id, so the same examples give the same manifest bytes. Examples
  with no labels for the authority raise unless `skip_unlabelled` (then they are left out).
  """
  if key.name != taxonomy.authority:
    raise CredentialError(
      f"key {key.name!r} cannot issue credentials for authority {taxonomy.authority!r}: the issuing key must "
      f"carry the authority's name (create it with `aqgov keys new {taxonomy.authority}`)"
    )
  entries: dict[str, Entry] = {}
  for n, record in enumerate(examples):
    ex = as_example(record, f"example #{n}")
    labels = labels_for(ex, taxonomy.authority)
    if labels is None:
      if skip_unlabelled:
        continue
      raise CredentialError(
        f"example {ex.id!r} has no labels for {taxonomy.authority!r}; label it or skip it"
      )
    if ex.id in entries:
      raise CredentialError(
        f"example id {ex.id!r} appears twice; ids must be unique within a manifest"
      )
    try:
      labels = normalise_labels(taxonomy, labels)
    except TaxonomyError as exc:
      raise CredentialError(f"example {ex.id!r}: {exc}") from None
    entries[ex.id] = Entry(ex.id, content_hash(ex.content), labels)
  ordered = [entries[k] for k in sorted(entries, key=lambda s: s.encode("utf-8"))]
  by_content: dict[str, Entry] = {}
  for e in ordered:
    check_same_labels(
      by_content.setdefault(e.sha256, e), e, f"credentials of {taxonomy.authority!r}"
    )
  payload = {
    "authority": taxonomy.authority,
    "taxonomy": taxonomy.to_dict(),
    "taxonomy_id": taxonomy.id,
    "root": merkle.root_from_leaf_hashes([e.leaf_hash() for e in ordered]).hex(),
    "size": len(ordered),
    "entries": [e.to_dict() for e in ordered],
  }
  return Manifest(sign(MANIFEST, Manifest(signing.SignedDocument(KIND, payload)), key))


def trusted_for_authority(manifest: Manifest, trust: TrustStore) -> bool:
  """Whether the manifest carries a signature by a trusted key named after its authority."""
  return any(
    s.key_id in trust and trust.get(s.key_id).name == manifest.authority
    for s in manifest.document.signatures
  )


def _check_structure(manifest: Manifest) -> Manifest:
  """`manifest`, once its taxonomy, size, Merkle root and entries are consistent."""
  what = f"credential manifest of {manifest.authority!r}"
  taxonomy = manifest.taxonomy
  if taxonomy.authority != manifest.authority or taxonomy.id != manifest.taxonomy_id:
    raise CredentialError(
      f"{what}: the embedded taxonomy does not match its recorded authority or id"
    )
  if manifest.size != len(manifest.entries):
    raise CredentialError(
      f"{what} declares {manifest.size} entries but holds {len(manifest.entries)}"
    )
  if merkle.root_from_leaf_hashes([e.leaf_hash() for e in manifest.entries]) != manifest.root:
    raise CredentialError(
      f"{what}: the Merkle root does not match its entries; the manifest is corrupt"
    )
  seen: set[str] = set()
  by_content: dict[str, Entry] = {}
  for e in manifest.entries:
    if e.id in seen:
      raise CredentialError(f"{what}: entry {e.id!r} appears twice; ids must be unique")
    seen.add(e.id)
    check_same_labels(by_content.setdefault(e.sha256, e), e, what)
    if len(e.sha256) != 64 or any(c not in "0123456789abcdef" for c in e.sha256):
      raise CredentialError(f"{what}: entry {e.id!r} has a malformed sha256 {e.sha256!r}")
    try:
      taxonomy.encode_one(e.labels)
    except TaxonomyError as exc:
      raise CredentialError(f"{what}: entry {e.id!r} has invalid labels: {exc}") from None
  return manifest


def check_same_labels(prior: Entry, entry: Entry, what: str) -> None:
  """Raise `CredentialError` when two entries credential the same content bytes with different labels."""
  if prior.sha256 == entry.sha256 and canonical.encode(dict(prior.labels)) != canonical.encode(
    dict(entry.labels)
  ):
    raise CredentialError(
      f"{what}: examples {prior.id!r} and {entry.id!r} have the same content (sha256 {entry.sha256[:16]}...) "
      "but different labels; one content must carry one set of labels, so re-label or drop one of them"
    )


def _issued_by_authority(manifest: Manifest, signers: tuple[str, ...]) -> Manifest:
  if manifest.authority not in signers:
    raise CredentialError(
      f"credential manifest of {manifest.authority!r} is signed by trusted key(s) {list(signers)} but by none "
      f"named {manifest.authority!r}: only the authority's own key may issue its credentials; trust "
      f"{manifest.authority}.pub"
    )
  return manifest


MANIFEST: DocumentType[Manifest] = register(
  DocumentType(
    name="manifest",
    kind=KIND,
    noun="credential manifest",
    to_payload=lambda m: m.document.payload,
    from_payload=lambda payload: _check_structure(Manifest(signing.SignedDocument(KIND, payload))),
    signer_roles=(AUTHORITY,),
    error=CredentialError,
    refused=CredentialError,
    on_verified=_issued_by_authority,
  )
)


def check_examples(manifest: Manifest, examples: Iterable[Example | Mapping[str, Any]]) -> None:
  """Raise `CredentialError` unless every example this authority should cover has an entry matching its bytes.

  An example is expected when it carries labels for the manifest's authority or no per-authority
  labels at all; the entry's content hash must match the example's bytes.
  """
  what = f"credential manifest of {manifest.authority!r}"
  for n, record in enumerate(examples):
    ex = as_example(record, f"example #{n}")
    if not expects_credential(ex, manifest.authority):
      continue
    if ex.id not in manifest:
      raise CredentialError(
        f"{what}: example {ex.id!r} is missing from the manifest; re-issue it to cover the example"
      )
    digest = content_hash(ex.content)
    if manifest.entry(ex.id).sha256 != digest:
      raise CredentialError(
        f"{what}: entry {ex.id!r} binds content sha256 {manifest.entry(ex.id).sha256[:16]}... but the example's "
        f"bytes hash to {digest[:16]}...; the example was altered after it was credentialed"
      )
