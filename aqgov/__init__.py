"""aqgov: governed training for JAX/Optax.

Signed policies decide which example may shape which part of the model; entropy profiles are
enforced inside the jitted step; every step leaves a signed, tamper-evident lineage record.
"""

from aqgov import canonical, credentials, merkle, paths, sample
from aqgov.errors import (
    AdmissionError,
    AqgovError,
    BatchCouplingError,
    CheckpointError,
    CredentialError,
    GovernanceEscalation,
    KeyFileError,
    LineageError,
    NonFiniteError,
    OverrideError,
    PolicyError,
    ProfileError,
    ReplayDivergence,
    RoutingError,
    SignatureError,
    TaxonomyError,
    UnsupportedPrimitiveError,
)
from aqgov.compiled import (
    CompiledPolicy,
    UncoveredParametersWarning,
    compile_policy,
    explain,
    explain_table,
    param_shapes,
)
from aqgov.admission import Admission, AdmittedBatch, RejectReason, Rejection, Verdict, admit
from aqgov.credentials import (
    Entry,
    Example,
    InclusionProof,
    Manifest,
    issue_manifest,
    read_examples,
    read_manifest,
    verify_entry,
    verify_manifest,
    write_manifest,
)
from aqgov.keys import PublicKey, SigningKey, TrustStore
from aqgov.loader import governed_batches
from aqgov.policy import (
    Policy,
    PolicySet,
    Rule,
    compose,
    read_policy,
    read_signed_policy,
    sign_policy,
    verify_policy,
    write_signed_policy,
)
from aqgov.cotangent import cotangent_value_and_grad, norm_methods
from aqgov.grads import routed_value_and_grad
from aqgov.routing import route, routed, strict
from aqgov import entropy
from aqgov.enforce import EnforceState, Event, Events, check_escalation, decode_events, enforce, enforce_state
from aqgov.overrides import Override, issue_override, read_override, verify_override, write_override
from aqgov.profile import (
    Bound,
    EntropyProfile,
    Representation,
    read_profile,
    read_signed_profile,
    sign_profile,
    verify_profile,
    write_profile,
    write_signed_profile,
)
from aqgov import lineage
from aqgov.lineage import (
    GovernedRun,
    LineageWriter,
    StepSummary,
    Task,
    TrainState,
    export_intoto,
    fingerprint,
    membership,
    params_sha256,
    summarize,
    verify_lineage,
)
from aqgov.lineage.replay import replay
from aqgov.signing import SignedDocument
from aqgov.taxonomy import Field, LabelSpace, Taxonomy

__version__ = "0.1.0"
