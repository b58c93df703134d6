"""Admission: the gate between the data loader and training.

Each example's bytes are hashed and looked up in every trusted credential manifest. An example is
admitted with its labels from every authority that credentialed it (namespaced `authority.field`
arrays from a `LabelSpace`). By default an example without a valid credential is never admitted:
`admit` raises `AdmissionError`, or in "collect" mode returns it among `rejected` with a typed
reason. With `admit_uncredentialed=True` (a policy decision) such examples are admitted with no
labels (`@credentialed == 0`), which the compiled policy routes to its uncredentialed route
(excluded everywhere by default). Bytes that do not match their credential are never admitted.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import numpy as np

from aqgov.credentials._manifest import (
  MANIFEST,
  Entry,
  Example,
  Manifest,
  as_example,
  check_same_labels,
  content_hash,
  trusted_for_authority,
)
from aqgov.credentials._taxonomy import LabelSpace, Taxonomy
from aqgov.documents import _canonical as canonical
from aqgov.documents._document_type import verify
from aqgov.documents._keys import TrustStore
from aqgov.documents._signing import SignedDocument
from aqgov.errors import AdmissionError, CredentialError


class RejectReason(enum.StrEnum):
  """Why an example was not admitted with credentials."""

  CONTENT_HASH_MISMATCH = (
    "content-hash-mismatch"  # bytes differ from what an authority credentialed
  )
  NO_CREDENTIAL = "no-credential"  # no trusted manifest names the example
  FORGED_MANIFEST = "forged-manifest"  # only a manifest that fails verification names it
  UNTRUSTED_KEY = "untrusted-key"  # only a manifest signed by an untrusted key names it
  MISSING_AUTHORITY = "missing-authority"  # a required authority did not credential it


class Rejection(NamedTuple):
  """An example that was not admitted, and why."""

  example_id: str
  reason: RejectReason


class Verdict(NamedTuple):
  """Admission decision for one example.

  `admitted` with `labels` (by authority) for a credentialed example; `admitted` with `labels=None`
  for one admitted as uncredentialed (then `rejection` still says why it lacks a credential).
  """

  example: Example
  admitted: bool
  labels: Mapping[str, Mapping[str, Any]] | None
  rejection: Rejection | None = None
  message: str = ""


class AdmittedBatch(NamedTuple):
  """Admitted examples, device-ready labels, and what was turned away.

  `labels` maps `LabelSpace` keys to int32 [B] arrays; `credentialed` is a bool [B] mask (False for
  examples admitted as uncredentialed); `inputs` is the user transform's output stacked on a leading
  batch axis (None without a transform).
  """

  ids: tuple[str, ...]
  content: tuple[bytes, ...]
  labels: dict[str, jax.Array]
  credentialed: np.ndarray
  rejected: tuple[Rejection, ...]
  inputs: Any = None


class ManifestProblem(NamedTuple):
  """A manifest that contributes no credentials, and why."""

  manifest: Manifest
  reason: RejectReason
  message: str


def _index_manifests(manifests: Sequence[Manifest], trust: TrustStore):
  """Split manifests into verified ones (indexed by authority, then id) and bad ones (id -> reason)."""
  good: dict[str, dict[str, Entry]] = {}
  taxonomies: dict[str, Taxonomy] = {}
  bad: dict[str, RejectReason] = {}
  problems: list[ManifestProblem] = []
  by_content: dict[str, dict[str, Entry]] = {}  # authority -> content sha256 -> first entry
  for m in manifests:
    if not trusted_for_authority(m, trust):
      reason, message = (
        RejectReason.UNTRUSTED_KEY,
        f"no trusted key named {m.authority!r} signed it",
      )
    else:
      try:
        verify(MANIFEST, m.document, trust)
        reason, message = None, ""
      except CredentialError as exc:
        reason, message = RejectReason.FORGED_MANIFEST, str(exc)
    if reason is not None:
      problems.append(ManifestProblem(m, reason, message))
      for e in m.entries:
        bad.setdefault(e.id, reason)
      continue
    tax = m.taxonomy
    if taxonomies.setdefault(m.authority, tax).id != tax.id:
      raise CredentialError(
        f"two trusted manifests of {m.authority!r} use different taxonomies; re-issue them under one taxonomy"
      )
    index = good.setdefault(m.authority, {})
    contents = by_content.setdefault(m.authority, {})
    for e in m.entries:
      prior = index.setdefault(e.id, e)
      if prior.sha256 != e.sha256 or canonical.encode(dict(prior.labels)) != canonical.encode(
        dict(e.labels)
      ):
        raise CredentialError(
          f"two trusted manifests of {m.authority!r} credential example {e.id!r} differently; "
          "revoke one of them before training"
        )
      check_same_labels(
        contents.setdefault(e.sha256, e), e, f"trusted manifests of {m.authority!r}"
      )
  return good, taxonomies, bad, tuple(problems)


class Admission:
  """Verified manifests and the rules for admitting examples against them.

  Args:
    trust: authority keys whose manifests count.
    manifests: credential manifests (or their signed documents); each is verified once, here.
      Manifests that fail (forged, corrupt, untrusted) contribute no labels; they only explain
      rejections.
    admit_uncredentialed: admit examples with no valid credential as uncredentialed (labels None).
    require: authorities that must have credentialed an example for it to count as credentialed.
    on_reject: "raise" (AdmissionError at the first rejected example) or "collect".
    label_space: fixed label space (for example the one a policy was compiled with); by default
      the trusted manifests' taxonomies, ordered by authority name.
  """

  def __init__(
    self,
    trust: TrustStore,
    manifests: Iterable[Manifest | SignedDocument],
    *,
    admit_uncredentialed: bool = False,
    require: Sequence[str] = (),
    on_reject: Literal["raise", "collect"] = "raise",
    label_space: LabelSpace | None = None,
  ):
    if on_reject not in ("raise", "collect"):
      raise ValueError(f"on_reject must be 'raise' or 'collect', got {on_reject!r}")
    self.trust = trust
    self.manifests = tuple(Manifest(m) if isinstance(m, SignedDocument) else m for m in manifests)
    self.admit_uncredentialed = admit_uncredentialed
    self.on_reject = on_reject
    self._index, taxonomies, self._bad, self.problems = _index_manifests(self.manifests, trust)
    if label_space is None:
      label_space = LabelSpace.of(taxonomies[a] for a in sorted(taxonomies))
    else:
      for authority, tax in taxonomies.items():
        if authority not in {t.authority for t in label_space.taxonomies}:
          raise CredentialError(
            f"trusted manifest of {authority!r} is outside the given label space; add its taxonomy"
          )
        if label_space.taxonomy(authority).id != tax.id:
          raise CredentialError(
            f"manifest of {authority!r} uses a different taxonomy than the given label space"
          )
    self.label_space = label_space
    unknown = [a for a in require if a not in self._index]
    if unknown:
      raise CredentialError(
        f"required authorities {unknown} have no verified manifest; trusted: {sorted(self._index)}"
      )
    self.require = tuple(require)

  @property
  def authorities(self) -> tuple[str, ...]:
    """Authorities with at least one verified manifest."""
    return tuple(sorted(self._index))

  def decide(self, example: Example | Mapping[str, Any]) -> Verdict:
    """The admission decision for one example (never raises for a rejection)."""
    ex = as_example(example)
    digest = content_hash(ex.content)
    labels: dict[str, Mapping[str, Any]] = {}
    for authority, index in self._index.items():
      entry = index.get(ex.id)
      if entry is None:
        continue
      if entry.sha256 != digest:
        return Verdict(
          ex,
          False,
          None,
          Rejection(ex.id, RejectReason.CONTENT_HASH_MISMATCH),
          f"example {ex.id!r}: its bytes hash to {digest[:16]}... but {authority!r} credentialed "
          f"{entry.sha256[:16]}...; altered content is never admitted",
        )
      labels[authority] = entry.labels
    missing = [a for a in self.require if a not in labels]
    if labels and not missing:
      return Verdict(ex, True, labels)
    if labels:
      reason, message = (
        RejectReason.MISSING_AUTHORITY,
        f"example {ex.id!r} is not credentialed by required {missing}",
      )
    else:
      reason = self._bad.get(ex.id, RejectReason.NO_CREDENTIAL)
      message = {
        RejectReason.NO_CREDENTIAL: f"example {ex.id!r} has no credential in any trusted manifest",
        RejectReason.FORGED_MANIFEST: f"example {ex.id!r} is credentialed only by a manifest that fails verification",
        RejectReason.UNTRUSTED_KEY: f"example {ex.id!r} is credentialed only by a manifest from an untrusted key",
      }[reason]
    if not self.admit_uncredentialed:
      message += "; credential it, or let the policy admit uncredentialed examples"
    return Verdict(ex, self.admit_uncredentialed, None, Rejection(ex.id, reason), message)

  def screen(self, example: Example | Mapping[str, Any]) -> Verdict:
    """`decide`, raising `AdmissionError` for a rejected example when `on_reject="raise"`."""
    verdict = self.decide(example)
    if not verdict.admitted and self.on_reject == "raise":
      raise AdmissionError(
        f"{verdict.message} (reason: {verdict.rejection.reason})",
        example_id=verdict.example.id,
        reason=str(verdict.rejection.reason),
      )
    return verdict

  def admit(
    self, examples: Iterable[Example | Mapping[str, Any]], *, transform=None
  ) -> AdmittedBatch:
    """Admit a batch. Raises `AdmissionError` on a rejection unless `on_reject="collect"`.

    `transform(example) -> pytree` turns each admitted example into model inputs, stacked with numpy.
    """
    return self.assemble([self.screen(record) for record in examples], transform=transform)

  def assemble(self, verdicts: Sequence[Verdict], *, transform=None) -> AdmittedBatch:
    """An `AdmittedBatch` from decided examples: admitted ones in order, the rest as `rejected`."""
    admitted = [v for v in verdicts if v.admitted]
    labels = self.label_space.encode([v.labels for v in admitted])
    inputs = None
    if transform is not None and admitted:
      trees = [transform(v.example) for v in admitted]
      inputs = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)
    return AdmittedBatch(
      ids=tuple(v.example.id for v in admitted),
      content=tuple(v.example.content for v in admitted),
      labels=labels,
      credentialed=np.asarray([v.labels is not None for v in admitted], dtype=bool).reshape(
        len(admitted)
      ),
      rejected=tuple(v.rejection for v in verdicts if not v.admitted),
      inputs=inputs,
    )


def admit(
  examples: Iterable[Example | Mapping[str, Any]],
  trust: TrustStore,
  manifests: Iterable[Manifest],
  *,
  transform=None,
  **options,
) -> AdmittedBatch:
  """One-shot `Admission(trust, manifests, **options).admit(examples, transform=transform)`."""
  return Admission(trust, manifests, **options).admit(examples, transform=transform)
