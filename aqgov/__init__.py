"""aqgov: governed training for JAX/Optax.

Signed policies decide which example may shape which part of the model; entropy profiles are
enforced inside the jitted step; every step leaves a signed, tamper-evident lineage record.

The layers, bottom up (each imports only those below it): `aqgov.documents` (canonical bytes,
keys, signatures, Merkle trees), `aqgov.credentials` (taxonomies, manifests, admission),
`aqgov.policy`, `aqgov.routing`, `aqgov.entropy`, `aqgov.lineage`, `aqgov.governed`; then the
`aqgov.cli` and `aqgov.examples`. This module re-exports what a user of the README needs.
"""

from aqgov.credentials import Admission, Taxonomy
from aqgov.documents import SigningKey, TrustStore
from aqgov.entropy import EntropyProfile, enforce, measure
from aqgov.errors import (
  AdmissionError,
  AqgovError,
  BatchCouplingError,
  CredentialError,
  GovernanceEscalation,
  LineageError,
  NonFiniteError,
  OverrideError,
  PolicyError,
  ProfileError,
  ReplayDivergence,
  ReplayUnavailable,
  SignatureError,
)
from aqgov.governed import GovernedTask, governed_step
from aqgov.lineage import GovernedRun, attribute, replay, verify_lineage
from aqgov.policy import CompiledPolicy, Policy, compile_policy
from aqgov.routing import SketchSpec, route, routed, routed_value_and_grad, strict

__version__ = "0.1.0"

__all__ = [
  "Admission",
  "AdmissionError",
  "AqgovError",
  "BatchCouplingError",
  "CompiledPolicy",
  "CredentialError",
  "EntropyProfile",
  "GovernanceEscalation",
  "GovernedRun",
  "GovernedTask",
  "LineageError",
  "NonFiniteError",
  "OverrideError",
  "Policy",
  "PolicyError",
  "ProfileError",
  "ReplayDivergence",
  "ReplayUnavailable",
  "SignatureError",
  "SigningKey",
  "SketchSpec",
  "Taxonomy",
  "TrustStore",
  "attribute",
  "compile_policy",
  "enforce",
  "governed_step",
  "measure",
  "replay",
  "route",
  "routed",
  "routed_value_and_grad",
  "strict",
  "verify_lineage",
]
