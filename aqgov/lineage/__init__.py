"""Signed, tamper-evident lineage of governed training runs.

_summary     the arrays a jitted step reports (`StepSummary`), parameter fingerprints and hashes
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
_query       membership queries and run descriptions
_progress    progress callbacks of long passes, drawn as rich progress bars on a terminal
_export      in-toto Statement v1 in a DSSE envelope
_run         `GovernedRun`: the run directory and the governed loop
"""

from aqgov.lineage._checkpoint import Checkpoints
from aqgov.lineage._cosign import WitnessRef, check_witnessed, cosign_final_head, origin_of, submit
from aqgov.lineage._export import export_intoto, verify_envelope
from aqgov.lineage._heads import LogHead, read_heads
from aqgov.lineage._history import CheckpointRef, History, history
from aqgov.lineage._progress import ProgressFn, progress_bar
from aqgov.lineage._query import Membership, describe, membership
from aqgov.lineage._replay import ReplayResult, replay
from aqgov.lineage._run import GovernedRun, RunLayout
from aqgov.lineage._scan import scan
from aqgov.lineage._segments import LogReader
from aqgov.lineage._summary import StepSummary, fingerprint, params_sha256, summarize
from aqgov.lineage._task import Task, TrainState, load_task
from aqgov.lineage._verify import VerifyReport, consistency_proof, verify_lineage
from aqgov.lineage._witness import Witness, WitnessServer
from aqgov.lineage._writer import LineageWriter, open_for_resume

__all__ = [
  "ProgressFn",
  "progress_bar",
  "CheckpointRef",
  "Checkpoints",
  "GovernedRun",
  "History",
  "LineageWriter",
  "LogHead",
  "LogReader",
  "Membership",
  "ReplayResult",
  "RunLayout",
  "StepSummary",
  "Task",
  "TrainState",
  "VerifyReport",
  "Witness",
  "WitnessRef",
  "WitnessServer",
  "check_witnessed",
  "cosign_final_head",
  "consistency_proof",
  "describe",
  "export_intoto",
  "fingerprint",
  "history",
  "load_task",
  "membership",
  "origin_of",
  "open_for_resume",
  "params_sha256",
  "read_heads",
  "replay",
  "scan",
  "submit",
  "summarize",
  "verify_envelope",
  "verify_lineage",
]
