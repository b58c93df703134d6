"""aqgov: governed training for JAX/Optax.

Signed policies decide which example may shape which part of the model; entropy profiles are
enforced inside the jitted step; every step leaves a signed, tamper-evident lineage record.
"""

from aqgov import canonical, merkle, paths
from aqgov.errors import (
    AdmissionError,
    AqgovError,
    BatchCouplingError,
    CheckpointError,
    CredentialError,
    GovernanceEscalation,
    KeyFileError,
    LineageError,
    OverrideError,
    PolicyError,
    ProfileError,
    ReplayDivergence,
    RoutingError,
    SignatureError,
    TaxonomyError,
    UnsupportedPrimitiveError,
)
from aqgov.keys import PublicKey, SigningKey, TrustStore
from aqgov.signing import SignedDocument
from aqgov.taxonomy import Field, LabelSpace, Taxonomy

__version__ = "0.1.0"
