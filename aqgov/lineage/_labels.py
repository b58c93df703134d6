"""An example's credential labels, resolved through the manifests a run started with.

The labels a lineage query filters on are not in the log: the log records example ids, and the
credential manifests run-start names (copied into `RUN/manifests/`) carry each id's labels. A
manifest counts only when its file has the SHA-256 and document id run-start recorded (the signed
record binds it); with a trust store the authorities' signatures are checked as well (what
`verify_lineage` checks). An id no manifest covers is uncredentialed (`@credentialed` is 0), and a
field of an authority that did not label the example compares False (see `aqgov.policy`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from aqgov.credentials._manifest import Manifest
from aqgov.credentials._taxonomy import LabelSpace, Taxonomy
from aqgov.documents._keys import TrustStore
from aqgov.documents._signing import SignedDocument
from aqgov.errors import AqgovError, LineageError
from aqgov.lineage import _record as rec
from aqgov.policy._conditions import compile_expr


class RunLabels(NamedTuple):
  """The run's credential manifests and the label space their taxonomies make."""

  manifests: tuple[Manifest, ...]
  space: LabelSpace

  def labels_of(self, example_id: str) -> dict[str, Mapping[str, Any]] | None:
    """`{authority: labels}` of one example, None when no manifest credentials it."""
    out = {m.authority: m.entry(example_id).labels for m in self.manifests if example_id in m}
    return out or None

  def table(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
    """The label table: int32 arrays [len(ids)] keyed like `LabelSpace.encode`."""
    return self.space.encode_numpy([self.labels_of(i) for i in ids])


def run_labels(
  run_dir: str | os.PathLike, start: Mapping[str, Any], trust: TrustStore | None = None
) -> RunLabels:
  """The manifests run-start names, each checked against its record (and `trust`, when given)."""
  from aqgov.lineage._verify import _check_document

  root = Path(run_dir)
  doc_trust = None
  if trust is not None:
    recorded = set(start.get("trust", ()))
    doc_trust = TrustStore(
      {k: v for k, v in trust.keys.items() if k in recorded and k != start["signer"]}
    )
  manifests = []
  for ref in start.get("manifests", ()):
    path = root / ref["file"]
    try:
      data = path.read_bytes()
    except OSError as exc:
      raise LineageError(
        f"run-start names credential manifest {ref['id'][:16]}... but {path} cannot be read "
        f"({exc.strerror or exc}); labels are resolved through the run's manifests: restore it"
      ) from None
    if doc_trust is not None:
      _check_document(root, ref, "credential manifest", doc_trust)
    elif rec.record_hash(data).hex() != ref["sha256"]:
      raise LineageError(
        f"{path} does not have the SHA-256 run-start recorded for credential manifest "
        f"{ref['id'][:16]}...: the file was replaced or altered; its labels cannot be used"
      )
    try:
      manifest = Manifest(SignedDocument.from_bytes(data, kind=ref["kind"]))
    except AqgovError as exc:
      raise LineageError(f"credential manifest {path}: {exc}") from None
    if manifest.id != ref["id"]:
      raise LineageError(f"{path} holds manifest {manifest.id[:16]}..., run-start names another")
    manifests.append(manifest)
  return RunLabels(tuple(manifests), label_space([m.taxonomy for m in manifests]))


def label_space(taxonomies: Sequence[Taxonomy]) -> LabelSpace:
  """One label space over the taxonomies (an authority's taxonomy counted once)."""
  seen: dict[str, Taxonomy] = {}
  for t in taxonomies:
    seen.setdefault(t.authority, t)
  return LabelSpace.of(tuple(seen.values()))


def matching(where: str, space: LabelSpace, table: Mapping[str, np.ndarray]) -> np.ndarray:
  """bool [n]: which rows of a label table satisfy the policy expression `where`."""
  if not space.taxonomies:
    raise LineageError(
      f"--where {where!r} filters on credential labels, but this run started with no credential "
      "manifest: there are no labels to filter on"
    )
  condition = compile_expr(where, space)
  return np.asarray(condition(dict(table)), bool).reshape(-1)
