"""Taxonomies, credential manifests and admission at the loader."""

from aqgov.credentials._admission import (
  Admission,
  AdmittedBatch,
  Rejection,
  RejectReason,
  Verdict,
  admit,
)
from aqgov.credentials._loader import (
  governed_batches,
)
from aqgov.credentials._manifest import (
  MANIFEST,
  Entry,
  Example,
  InclusionProof,
  Manifest,
  as_example,
  check_examples,
  content_hash,
  issue_manifest,
  read_examples,
  verify_entry,
)
from aqgov.credentials._taxonomy import (
  CREDENTIALED,
  PRESENT,
  Field,
  LabelSpace,
  Taxonomy,
  string_code,
)

__all__ = [
  "Admission",
  "admit",
  "AdmittedBatch",
  "as_example",
  "check_examples",
  "content_hash",
  "CREDENTIALED",
  "Entry",
  "Example",
  "Field",
  "governed_batches",
  "InclusionProof",
  "issue_manifest",
  "LabelSpace",
  "Manifest",
  "MANIFEST",
  "PRESENT",
  "read_examples",
  "Rejection",
  "RejectReason",
  "string_code",
  "Taxonomy",
  "Verdict",
  "verify_entry",
]
