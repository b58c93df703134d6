"""Signed, tamper-evident lineage of governed training runs.

_summary     the arrays a jitted step reports (`StepSummary`, `routed_summary`), parameter
             fingerprints and hashes
_record      the canonical record schema (docs/lineage-schema.md)
_segments    framed segment files and `LogReader`, which checks every record it reads
_scan        `scan`: one pass for record hashes, Merkle roots and chosen bodies
_heads       `LogHead` and the signed tree heads
_writer      the asynchronous `LineageWriter` and `open_for_resume`
_witness     a C2SP tlog witness (`Witness`, `WitnessServer`)
_cosign      signed heads as checkpoints submitted to witnesses, and their cosignatures checked
_log         the log's names in one module (for the run)
_verify      `verify_lineage`: records, chain, heads, references, parent runs
_history     which records still describe the params after resumes (the resume rule)
_checkpoint  Orbax checkpoints bound to the lineage
_checkpoint_files  a checkpoint directory's file digest and lineage item, checked without Orbax
_task        the `Task` protocol training and replay share
_replay      re-execute recorded steps and check fingerprints and hashes
_sketches    the sketch store: per-step gradient sketch blocks bound to their step records
_attribute   routing-aware TracIn attribution from sketches (or checkpoints), signed results
_labels      credential labels of example ids, through the run's manifests
_index       the signed columnar index queries read (`build_index`, `load_columns`)
_query       membership and label queries (`query`), and run descriptions
_views       entropy against the profile's bounds, and governance events
_gate        deployment requirements and their Verification Summary Attestation
_regulator   SPDX 3.0.1, CycloneDX 1.6 ML-BOM and the EU GPAI training-content summary
_progress    progress callbacks of long passes, drawn as rich progress bars on a terminal
_export      in-toto Statement v1 in a DSSE envelope
_run         `GovernedRun`: the run directory, the governed loop, or the user's own loop recorded
"""

from aqgov.lineage._attribute import (
  ATTRIBUTION,
  AttributionResult,
  Score,
  attribute,
  self_influence,
  verify_attribution,
)
from aqgov.lineage._checkpoint import Checkpoints
from aqgov.lineage._cosign import WitnessRef, check_witnessed, cosign_final_head, origin_of, submit
from aqgov.lineage._export import export_intoto, verify_envelope
from aqgov.lineage._gate import GateResult, attest, evaluate, parse_requirement, read_rules
from aqgov.lineage._heads import LogHead, read_heads
from aqgov.lineage._history import CheckpointRef, History, history
from aqgov.lineage._index import build_index, load_columns
from aqgov.lineage._progress import ProgressFn, progress_bar
from aqgov.lineage._query import (
  Membership,
  QueryResult,
  Refusal,
  describe,
  membership,
  query,
  refusals,
)
from aqgov.lineage._regulator import cyclonedx_bom, eu_gpai_summary, run_facts, spdx_document
from aqgov.lineage._replay import ReplayResult, replay
from aqgov.lineage._run import GovernedRun, RunLayout
from aqgov.lineage._scan import scan
from aqgov.lineage._segments import LogReader
from aqgov.lineage._summary import (
  StepSummary,
  fingerprint,
  params_sha256,
  routed_summary,
  summarize,
)
from aqgov.lineage._task import Task, TrainState, load_task
from aqgov.lineage._verify import VerifyReport, consistency_proof, verify_lineage
from aqgov.lineage._views import EntropyRow, GovernanceEvent, entropy, events
from aqgov.lineage._witness import Witness, WitnessServer
from aqgov.lineage._writer import LineageWriter, open_for_resume

__all__ = [
  "ATTRIBUTION",
  "AttributionResult",
  "CheckpointRef",
  "Checkpoints",
  "EntropyRow",
  "GateResult",
  "GovernanceEvent",
  "GovernedRun",
  "History",
  "LineageWriter",
  "LogHead",
  "LogReader",
  "Membership",
  "ProgressFn",
  "QueryResult",
  "Refusal",
  "ReplayResult",
  "RunLayout",
  "Score",
  "StepSummary",
  "Task",
  "TrainState",
  "VerifyReport",
  "Witness",
  "WitnessRef",
  "WitnessServer",
  "attest",
  "attribute",
  "build_index",
  "check_witnessed",
  "consistency_proof",
  "cosign_final_head",
  "cyclonedx_bom",
  "describe",
  "entropy",
  "eu_gpai_summary",
  "evaluate",
  "events",
  "export_intoto",
  "fingerprint",
  "history",
  "load_columns",
  "load_task",
  "membership",
  "open_for_resume",
  "origin_of",
  "params_sha256",
  "parse_requirement",
  "progress_bar",
  "query",
  "read_heads",
  "read_rules",
  "refusals",
  "replay",
  "routed_summary",
  "run_facts",
  "scan",
  "self_influence",
  "spdx_document",
  "submit",
  "summarize",
  "verify_attribution",
  "verify_envelope",
  "verify_lineage",
]
