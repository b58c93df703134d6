"""in-toto attestation of a run: a Statement v1 in a DSSE envelope signed with Ed25519.

The statement's subjects are the effective checkpoints of the log's signed part (name
`<run id>/checkpoints/<step>/params`, digest: the SHA-256 of the params as
`aqgov.lineage.summary.params_sha256` computes it, recomputed from the checkpoint on disk and
refused unless every item digest equals its record: an attestation names only what is there; a
run that records no task, whose checkpoints nothing can restore, is attested by its checkpoint
files, which must hash to their records). The predicate (type `PREDICATE_TYPE`) binds them to the lineage: the last signed tree head (id, size,
Merkle root, last record hash, signer key id), the policy, profile and credential manifest ids the
run started under, the task reference and the parent run's head. Any DSSE verifier can check the
envelope: payloadType "application/vnd.in-toto+json", signature over
`PAE(payloadType, payload)` (`aqgov.documents.pae`), keyid = the aqgov key id (hex SHA-256 of the
raw Ed25519 public key).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from aqgov.documents import _signing as signing
from aqgov.documents._keys import SigningKey, TrustStore, load_public_key
from aqgov.errors import CheckpointError, LineageError
from aqgov.lineage import _history as hist
from aqgov.lineage import _trust as trustlib
from aqgov.lineage._checkpoint import Checkpoints
from aqgov.lineage._checkpoint_files import check_checkpoint_files
from aqgov.lineage._heads import LogHead, read_heads
from aqgov.lineage._segments import LogReader
from aqgov.lineage._task import Task, load_task
from aqgov.lineage._verify import VerifyReport, lineage_dir, verify_lineage

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://aqgov.dev/attestation/lineage/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"


def params_on_disk(
  run_dir: Path,
  start: Mapping[str, Any],
  checkpoints: Sequence[hist.CheckpointRef],
  task: Task | None = None,
  trust: TrustStore | None = None,
) -> dict[int, str]:
  """Record index -> params digest of each checkpoint, restored from disk (with the run's task as
  the template, built with the authorities run-start recorded, taken from `trust`); raises
  `LineageError` when one is missing or an item differs from its record."""
  if task is None:
    authorities = None if trust is None else trustlib.recorded_trust(start, trust, exact=False)
    task = load_task(
      start["config"]["task"], start["config"].get("task_config", {}), run_dir, trust=authorities
    )
  store = Checkpoints(run_dir / "checkpoints")
  try:
    on_disk, template, out = set(store.steps()), task.init(), {}
    for c in checkpoints:
      if c.step not in on_disk:
        raise LineageError(
          f"the checkpoint at step {c.step} ({run_dir / c.path}) is not on disk: an attestation "
          "names only checkpoints it can hash",
          index=c.index,
        )
      try:
        restored = store.restore(c.step, template)
      except CheckpointError as exc:
        raise LineageError(str(exc), index=c.index) from None
      for item, recorded in (c.digests or {"params": c.params_sha256}).items():
        if restored.digests.get(item) != recorded:
          raise LineageError(
            f"the checkpoint at step {c.step} ({run_dir / c.path}) holds {item} hashing to "
            f"{str(restored.digests.get(item))[:16]}..., but record {c.index} says {recorded[:16]}"
            "...: it was altered after it was recorded; refusing to attest it",
            index=c.index,
          )
      out[c.index] = restored.digests["params"]
    return out
  finally:
    store.close()


def params_from_files(
  run_dir: Path, scan: Any, checkpoints: Sequence[hist.CheckpointRef], run_id: str
) -> dict[int, str]:
  """Record index -> params digest of each checkpoint of a run that records no task (nothing to
  restore it with): its files must hash to the record's `files_sha256` and its lineage item name
  this run, the step, the log head and the record's item digests, so the files are exactly those
  the recorded digests were computed from when they were saved."""
  out = {}
  for c in checkpoints:
    path = run_dir / c.path
    if not path.is_dir() or c.files_sha256 is None or c.digests is None:
      raise LineageError(
        f"the checkpoint at step {c.step} ({path}) is not on disk or its record carries no file "
        "digest: an attestation names only checkpoints it can check",
        index=c.index,
      )
    head = LogHead(c.index, scan.roots_before[c.index], scan.record_hash(c.index - 1))
    check_checkpoint_files(
      path,
      index=c.index,
      step=c.step,
      run_id=run_id,
      head=head,
      files_digest=c.files_sha256,
      digests=c.digests,
    )
    out[c.index] = c.digests["params"]
  return out


def statement(
  run_dir: str | os.PathLike,
  report: VerifyReport,
  *,
  task: Task | None = None,
  trust: TrustStore | None = None,
) -> dict:
  """The in-toto Statement for a verified run (`report` from `verify_lineage`); `task` (default: the
  one run-start names, built with the authorities `trust` holds) restores the checkpoints whose
  params digests become the subjects."""
  run_dir, ldir = lineage_dir(run_dir)
  scan, history = hist.load(ldir)
  heads, _ = read_heads(ldir)
  if not heads:
    raise LineageError(f"{ldir} has no signed tree head to attest")
  head = heads[-1]
  size = int(head.payload["size"])
  start = scan.bodies[0]
  checkpoints = [c for c in history.checkpoints if c.index < size]
  if not checkpoints:
    raise LineageError(
      "the signed part of the log records no checkpoint: there is nothing to name as a subject"
    )
  if task is None and start["config"].get("task") is None:  # a loop its user owns
    digests = params_from_files(run_dir, scan, checkpoints, start["run_id"])
  else:
    digests = params_on_disk(run_dir, start, checkpoints, task, trust)
  subjects = [
    {"name": f"{report.run_id}/checkpoints/{c.step}/params", "digest": {"sha256": digests[c.index]}}
    for c in checkpoints
  ]
  predicate = {
    "run_id": report.run_id,
    "head": {
      "id": head.id,
      "size": size,
      "root": head.payload["root"],
      "last_record": head.payload["last_record"],
      "signer": start["signer"],
      "time": head.payload["time"],
    },
    "merkle_root": head.payload["root"],
    "size": size,
    "closed": report.closed and size == report.size,
    "policies": [p["id"] for p in start["policies"]],
    "profiles": [p["id"] for p in start["profiles"]],
    "credential_manifests": [{"id": m["id"], "sha256": m["sha256"]} for m in start["manifests"]],
    "trust": list(start["trust"]),
    "task": start["config"].get("task"),
    "parent": start.get("parent"),
    "checkpoints": [
      {
        "step": c.step,
        "params_sha256": c.params_sha256,
        "record": c.index,
        "path": c.path,
        "digests": dict(c.digests or {}),
        "files_sha256": c.files_sha256,
      }
      for c in checkpoints
    ],
  }
  return {
    "_type": STATEMENT_TYPE,
    "subject": subjects,
    "predicateType": PREDICATE_TYPE,
    "predicate": predicate,
  }


def envelope(payload: bytes, key: SigningKey) -> dict:
  """A DSSE envelope around `payload`, signed by `key` over PAE(PAYLOAD_TYPE, payload)."""
  sig = key.sign(signing.pae(PAYLOAD_TYPE, payload))
  return {
    "payload": base64.b64encode(payload).decode(),
    "payloadType": PAYLOAD_TYPE,
    "signatures": [{"keyid": key.key_id, "sig": base64.b64encode(sig).decode()}],
  }


def recorded_trust(run_dir: str | os.PathLike, key: SigningKey) -> TrustStore:
  """`key` plus the public keys in the run's keys/ that its run-start record says it trusted."""
  first = next(iter(LogReader(lineage_dir(run_dir)[1])), None)
  trusted = set(first.body.get("trust", ())) if first is not None else set()
  pubs = [load_public_key(p) for p in sorted((Path(run_dir) / "keys").glob("*.pub"))]
  return TrustStore.of([key, *(k for k in pubs if k.key_id in trusted)])


def export_intoto(
  run_dir: str | os.PathLike,
  key: SigningKey,
  *,
  trust: TrustStore | None = None,
  task: Task | None = None,
) -> dict:
  """Verify the run (against `trust`, by default `recorded_trust`; a live run is attested up to its
  last signed head, with `closed` false) and attest it.

  Returns the DSSE envelope as a JSON-ready dict.
  """
  trust = trust if trust is not None else recorded_trust(run_dir, key)
  report = verify_lineage(run_dir, trust, require_closed=False)
  payload = json.dumps(
    statement(run_dir, report, task=task, trust=trust), sort_keys=True, separators=(",", ":")
  ).encode("utf-8")
  return envelope(payload, key)


def verify_envelope(env: dict, trust: TrustStore) -> dict:
  """The statement inside `env` if a trusted key signed it (aqgov's own check; any DSSE verifier works)."""
  try:
    payload = base64.b64decode(env["payload"], validate=True)
    if env["payloadType"] != PAYLOAD_TYPE:
      raise LineageError(f"payloadType is {env['payloadType']!r}, expected {PAYLOAD_TYPE!r}")
    message = signing.pae(env["payloadType"], payload)
    good = [
      s
      for s in env["signatures"]
      if s["keyid"] in trust
      and trust.get(s["keyid"]).verify(message, base64.b64decode(s["sig"], validate=True))
    ]
  except (KeyError, TypeError, ValueError) as exc:
    raise LineageError(f"not a DSSE envelope ({exc})") from None
  if not good:
    raise LineageError("no trusted key signed this envelope (or it was altered after signing)")
  return json.loads(payload)
