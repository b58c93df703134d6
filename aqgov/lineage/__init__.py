"""Signed, tamper-evident lineage of governed training runs.

summary     the arrays a jitted step reports (`StepSummary`), parameter fingerprints and hashes
record      the canonical record schema (docs/lineage-schema.md)
log         append-only segments, Merkle tree, signed tree heads, the asynchronous writer, resume
verify      `verify_lineage`: records, chain, heads, references, parent runs
history     which records still describe the params after resumes (the resume rule)
checkpoint  Orbax checkpoints bound to the lineage
task        the `Task` protocol training and replay share
replay      re-execute recorded steps and check fingerprints and hashes
query       membership queries and run descriptions
export      in-toto Statement v1 in a DSSE envelope
run         `GovernedRun`: the run directory and the governed loop

The functions `history.history` and `replay.replay` are not re-exported here, so that the
submodules keep their names; `aqgov.replay` is the replay function.
"""

from aqgov.lineage.checkpoint import Checkpoints
from aqgov.lineage.export import export_intoto, verify_envelope
from aqgov.lineage.history import CheckpointRef, History
from aqgov.lineage.log import LineageWriter, LogHead, LogReader, open_for_resume, read_heads, scan
from aqgov.lineage.query import Membership, describe, membership
from aqgov.lineage.replay import ReplayResult
from aqgov.lineage.run import GovernedRun, RunLayout
from aqgov.lineage.summary import StepSummary, fingerprint, params_sha256, summarize
from aqgov.lineage.task import Task, TrainState, load_task
from aqgov.lineage.verify import VerifyReport, consistency_proof, verify_lineage
