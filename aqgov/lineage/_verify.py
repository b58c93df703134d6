"""Verifying a run's lineage: records, chain, Merkle roots, signed heads, references, parent runs.

`verify_lineage(run_dir, trust)` reads the whole log once and raises `LineageError` at the first
problem, with `index` naming the first bad record when the problem is in a record:

- every frame digest and record envelope; seq numbers 0, 1, 2, ...; each record's `prev` is the
  hash of the record before it (a deleted, duplicated, reordered or inserted record is named);
- every tree head is signed by the run's key (the run-start `signer`) and that key is trusted;
  heads form a chain (`prev_head`), never shrink, and each head's root and last-record hash match
  the records it covers. If records were rewritten consistently (chain and digests recomputed,
  which needs no key), only the heads can catch it: the error then names the first record after
  the last head that still matches, so the rewrite lies at or after that index;
- every head is consistent with the final tree (RFC 9162 consistency proofs, `aqgov.documents`);
- a log that ends with run-end is covered entirely by a signed head and has no torn tail; nothing
  follows a signed run-end (a closed run is final);
- by default (the auditor's check) the run must be closed: `require_closed=False` accepts a live
  or crashed run, whose records after the last signed head are reported as `unsigned`;
- each effective checkpoint of the signed part is on disk, its files hash to the record's
  `files_sha256`, and its lineage item names this run, its step, the log position of its record
  and the record's item digests (`aqgov.lineage.checkpoint_files`);
- checkpoint records name the log position they were taken at; resume records supersede a range
  that ends right before them;
- policies, profiles and credential manifests named by run-start verify (file digest, document
  id, a signature by a key run-start trusts, by the authority the document names if it names one)
  when their files are in the run directory; the run key never counts as their signer;
- every override record carries a token that `aqgov.entropy.admit_override` accepts as of the
  record: signed by an override authority of the run's profile, for this run, covering the
  record's step, unexpired at the record's time, and recorded once;
- when the run has a sketch store (`RUN/sketches/`), every step record's `sketch` digest matches
  its block there (`aqgov.lineage._sketches`);
- a parent run named by run-start verifies too (its directory recorded relative to this run, or
  given), and holds the signed head this run names;
- with `witnesses`, the log is closed and each witness cosigned its final head (the checkpoint in
  `lineage/cosignatures/<size>.note` names exactly the final size and root), so a log re-signed
  with the run key, or cut back, after the witnesses saw it is caught.

A torn tail (an interrupted final write) is reported, not an error, unless the run was closed.
Records after the last signed head are reported as unsigned: they are chained but not signed, and
queries, descriptions and exports never read them (`aqgov.lineage.history`).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from aqgov.credentials import _manifest  # noqa: F401  (registers the document types checked here)
from aqgov.documents import _merkle as merkle
from aqgov.documents import _signing as signing
from aqgov.documents._document_type import signer_roles, verify
from aqgov.documents._keys import TrustStore
from aqgov.entropy import _overrides, _profile  # noqa: F401  (register the document types checked here)
from aqgov.errors import LineageError, OverrideError, SignatureError
from aqgov.lineage import _heads as log
from aqgov.lineage import _history as hist
from aqgov.lineage import _record as rec
from aqgov.lineage import _scan as logscan
from aqgov.lineage import _sketches as sketch_store
from aqgov.lineage._checkpoint_files import check_checkpoint_files
from aqgov.lineage._cosign import check_witnessed, cosigner_key
from aqgov.lineage._heads import LogHead, read_heads
from aqgov.lineage._progress import ProgressFn
from aqgov.lineage._segments import records
from aqgov.policy import _policy  # noqa: F401


class VerifyReport(NamedTuple):
  """What `verify_lineage` established."""

  run_id: str
  run_dir: Path
  size: int
  root: str
  heads: int
  signed_size: int
  signer: str
  closed: bool
  torn_bytes: int
  checked: tuple[str, ...]
  unchecked: tuple[str, ...]
  parent: VerifyReport | None
  witnessed: tuple[str, ...] = ()
  signed_by: tuple[tuple[str, str], ...] = ()  # (key id, what that trusted key signed)

  @property
  def unsigned(self) -> int:
    """Records after the last signed head (chained, not yet signed: a crash before the next head)."""
    return self.size - self.signed_size


def lineage_dir(run_dir: str | os.PathLike) -> tuple[Path, Path]:
  """(run dir, lineage dir) for either a run directory or its lineage/ directory."""
  d = Path(run_dir)
  if (d / "lineage" / "segments").is_dir():
    return d, d / "lineage"
  if (d / "segments").is_dir():
    return d.parent, d
  raise LineageError(f"{d} holds no lineage (expected {d}/lineage/segments); pass a run directory")


def _signer_ids(doc: signing.SignedDocument, trust: TrustStore) -> list[str]:
  """Ids of the trusted keys that signed `doc` (call after `verify_signatures` accepted it)."""
  return sorted({sig.key_id for sig in doc.signatures if sig.key_id in trust})


def _check_document(
  run_dir: Path, ref: Mapping, what: str, trust: TrustStore
) -> tuple[str, list[str], tuple]:
  """(description, signer key ids, signer names) of a document run-start names, once it verifies."""
  path = run_dir / ref["file"]
  data = path.read_bytes()
  if rec.record_hash(data).hex() != ref["sha256"]:
    raise LineageError(
      f"run-start names {what} {ref['id'][:16]}... but {path} does not have the recorded "
      "SHA-256: the file was replaced or altered",
      index=0,
    )
  try:
    doc = signing.SignedDocument.from_bytes(data, kind=ref["kind"])
    if doc.id != ref["id"]:
      raise LineageError(
        f"{path} holds {what} {doc.id[:16]}..., run-start names {ref['id'][:16]}...", index=0
      )
    signers = signing.verify_signatures(doc, trust, roles=signer_roles(doc.kind))
  except SignatureError as exc:
    raise LineageError(
      f"{what} {ref['id'][:16]}... ({path}) does not verify: {exc}", index=0
    ) from None
  authority = doc.payload.get("authority") if isinstance(doc.payload, Mapping) else None
  if authority and authority not in signers:
    raise LineageError(
      f"{what} {ref['id'][:16]}... ({path}) names authority {authority!r} but is signed by "
      f"{list(signers)}: only {authority}'s key may sign it",
      index=0,
    )
  return (
    f"{what} {ref['id'][:16]}... signed by {', '.join(signers)}",
    _signer_ids(doc, trust),
    signers,
  )


def _override_authorities(
  run_dir: Path, start: Mapping, signers: Mapping[str, tuple]
) -> tuple[str, ...] | None:
  """Who may sign the run's override tokens (see `GovernedTask`); None when the run has no profile."""
  refs = start.get("profiles", ())
  if not refs:
    return None
  ref = refs[0]
  if ref["id"] not in signers:
    return None
  profile = _profile.EntropyProfile.from_dict(
    signing.SignedDocument.from_bytes(
      (run_dir / ref["file"]).read_bytes(), kind=ref["kind"]
    ).payload
  )
  return profile.override_authorities or (
    (profile.authority,) if profile.authority else signers[ref["id"]]
  )


def _check_overrides(
  scan: logscan.LogScan, trust: TrustStore, run_id: str, authorities: tuple[str, ...] | None
) -> list[tuple[str, str]]:
  """Check every override record with `admit_override`; (signer key id, what) for each."""
  used: set[str] = set()
  signed = []
  for i, body in sorted(scan.bodies.items()):
    if scan.kinds[i] != rec.OVERRIDE:
      continue
    try:
      if body["token_kind"] != _overrides.KIND:
        raise OverrideError(
          f"the record says it carries a {body['token_kind']!r} document, not an override token"
        )
      doc = signing.SignedDocument.from_bytes(body["token"], kind=_overrides.KIND)
      if doc.id != body["token_id"]:
        raise LineageError(
          f"record {i}: override token id does not match the token it carries", index=i
        )
      at = dt.datetime.fromtimestamp(float(body["time"]), dt.UTC)
      _overrides.admit_override(
        doc, trust, run_id, now=at, step=int(body["step"]), authorities=authorities, used=used
      )
    except (OverrideError, SignatureError) as exc:
      raise LineageError(f"record {i}: override token does not verify: {exc}", index=i) from None
    used.add(doc.id)
    signed += [
      (k, f"override {doc.id[:16]}... at step {body['step']}") for k in _signer_ids(doc, trust)
    ]
  return signed


def _find_parent(
  run_dir: Path, parent: Mapping, parent_dirs: Mapping[str, str | os.PathLike]
) -> Path | None:
  candidates = []
  if parent["run_id"] in parent_dirs:
    candidates.append(Path(parent_dirs[parent["run_id"]]))
  if parent.get("dir"):
    candidates.append(run_dir / parent["dir"])
  for c in candidates:
    if (c / "lineage" / "segments").is_dir():
      return c
  return None


def verify_lineage(
  run_dir: str | os.PathLike,
  trust: TrustStore,
  *,
  parent_dirs: Mapping[str, str | os.PathLike] | None = None,
  require_closed: bool = True,
  require_references: bool = True,
  check_checkpoints: bool = True,
  check_consistency: bool = True,
  witnesses: Sequence = (),
  progress: ProgressFn | None = None,
  _depth: int = 0,
) -> VerifyReport:
  """Verify the lineage of `run_dir` against the `trust`ed keys (see the module doc for the checks).

  The defaults are the auditor's: the run must be closed, and every referenced document, parent run
  and effective checkpoint must be present and check out. `parent_dirs` maps a parent run id to its
  directory when it is not where run-start recorded it. `require_closed=False` accepts an open log
  (a live or crashed run; `VerifyReport.unsigned` counts its unsigned tail); `require_references=False`
  lists a missing reference (document, parent run, checkpoint) as unchecked instead of failing;
  `check_checkpoints=False` skips the checkpoint directories.
  `witnesses` (public keys, `.pub` paths or verifier-key strings) must each have cosigned the final
  head of a closed log. `progress(records read, records signed)` follows the pass over the log.
  """
  run_dir, ldir = lineage_dir(run_dir)
  parent_dirs = dict(parent_dirs or {})
  heads, heads_torn = read_heads(ldir)
  sizes = [int(h.payload["size"]) for h in heads]
  scan = logscan.scan(
    ldir,
    bodies=(rec.RUN_START, rec.CHECKPOINT, rec.RUN_RESUME, rec.OVERRIDE, rec.RUN_END),
    roots_at=sizes,
    roots_before=(rec.CHECKPOINT,),
    check=(rec.STEP, rec.EVENT, rec.ESCALATION),
    progress=progress,
    expected=sizes[-1] if sizes else None,
  )
  if scan.size == 0:
    raise LineageError(f"{ldir} holds no complete record", index=0)
  start = scan.bodies[0]
  run_id, signer = start["run_id"], start["signer"]
  if signer not in trust:
    raise LineageError(
      f"run {run_id} is signed by key {signer[:16]}..., which is not trusted; pass the run's "
      f"public key with --trust (it is in {run_dir / 'keys'})"
    )
  run_key = trust.get(signer)
  run_trust = log.run_trust(run_key)

  _check_heads(heads, sizes, scan, run_id, run_trust, check_consistency)
  signed_size = sizes[-1] if sizes else 0
  ended = [i for i, kind in enumerate(scan.kinds[:signed_size]) if kind == rec.RUN_END]
  if ended and ended[0] != scan.size - 1:
    raise LineageError(
      f"record {ended[0] + 1} follows the signed run-end at record {ended[0]}: a closed run is "
      "final, so these records were appended after it was closed",
      index=ended[0] + 1,
    )
  closed = scan.kinds[-1] == rec.RUN_END
  torn = (scan.torn.nbytes if scan.torn else 0) + (heads_torn.nbytes if heads_torn else 0)
  if closed and signed_size != scan.size:
    raise LineageError(
      f"the log ends with run-end but its last signed head covers {signed_size} of "
      f"{scan.size} records: the final tree head was removed",
      index=signed_size,
    )
  if closed and torn:
    raise LineageError(
      f"the log was closed but {torn} bytes follow its last complete frame: bytes were appended "
      "after close",
      index=scan.size,
    )
  if require_closed and not closed:
    raise LineageError(
      f"run {run_id} was not closed (no run-end record): it crashed, is still running, or was cut "
      f"back to an earlier signed head; {scan.size - signed_size} records are not covered by a "
      "signed head. Verify a live run with --allow-open (require_closed=False)",
      index=scan.size,
    )

  witnessed: tuple[str, ...] = ()
  if witnesses:
    if not closed:
      raise LineageError(
        f"run {run_id} is not closed: checked against witnesses, a log must end with run-end, "
        "since a log cut back to an earlier cosigned head looks just like a crashed one; resume "
        "and close the run, or verify without witnesses",
        index=scan.size,
      )
    witnessed = check_witnessed(
      ldir, run_id, scan.head(), run_key, [cosigner_key(w) for w in witnesses]
    )
  _check_records(scan, trust)
  # documents and overrides count only under keys run-start trusts, never the run key
  doc_trust = TrustStore(
    {k: v for k, v in trust.keys.items() if k in set(start.get("trust", ())) and k != signer}
  )
  checked, unchecked = [], []
  signed_by = [(signer, f"{len(heads)} tree head(s) of run {run_id}")]
  doc_signers: dict[str, tuple] = {}
  for field, what in (
    ("policies", "policy"),
    ("profiles", "profile"),
    ("manifests", "credential manifest"),
  ):
    for ref in start.get(field, ()):
      if (run_dir / ref["file"]).is_file():
        line, ids, names = _check_document(run_dir, ref, what, doc_trust)
        checked.append(line)
        doc_signers[ref["id"]] = names
        signed_by += [(k, f"{what} {ref['id'][:16]}...") for k in ids]
      elif require_references:
        raise LineageError(
          f"run-start names {what} {ref['id'][:16]}... but {run_dir / ref['file']} is missing",
          index=0,
        )
      else:
        unchecked.append(f"{what} {ref['id'][:16]}... ({ref['file']} not present)")
  authorities = _override_authorities(run_dir, start, doc_signers)
  if authorities is None and start.get("profiles") and rec.OVERRIDE in scan.kinds:
    unchecked.append("override authorities (the run's profile is not present)")
  signed_by += _check_overrides(scan, doc_trust, run_id, authorities)
  if check_checkpoints:
    _check_checkpoints(run_dir, scan, signed_size, run_id, require_references, checked, unchecked)
  if sketch_store.store_dir(run_dir).is_dir():
    n = sketch_store.check_blocks(run_dir, _step_bodies(ldir, scan.size))
    checked.append(f"{n} sketch block(s) in {sketch_store.DIRNAME}/ match their step records")
  if (run_dir / "index" / "index.json").is_file():
    from aqgov.lineage._index import check_index

    checked.append(check_index(run_dir, ldir, start, scan, signed_size))

  parent_report = None
  parent = start.get("parent")
  if parent:
    pdir = _find_parent(run_dir, parent, parent_dirs)
    if pdir is None:
      if require_references:
        raise LineageError(
          f"parent run {parent['run_id']} not found (recorded at {parent.get('dir')!r}); "
          "pass its directory with --parent-dir",
          index=0,
        )
      unchecked.append(f"parent run {parent['run_id']} (directory not found; pass --parent-dir)")
    elif _depth > 64:
      raise LineageError("parent runs nest more than 64 deep; is there a cycle?", index=0)
    else:
      try:
        parent_report = verify_lineage(
          pdir,
          trust,
          parent_dirs=parent_dirs,
          require_closed=require_closed,
          require_references=require_references,
          check_checkpoints=check_checkpoints,
          check_consistency=check_consistency,
          _depth=_depth + 1,
        )
      except LineageError as exc:
        raise LineageError(
          f"parent run {parent['run_id']} ({pdir}) does not verify: {exc}", index=0
        ) from None
      _check_parent_head(pdir, parent, parent_report)
      checked.append(
        f"parent run {parent['run_id']} at head {parent['head_id'][:16]}... (size {parent['size']})"
      )

  return VerifyReport(
    run_id,
    run_dir,
    scan.size,
    scan.roots[scan.size].hex(),
    len(heads),
    signed_size,
    run_key.name,
    closed,
    torn,
    tuple(checked),
    tuple(unchecked),
    parent_report,
    witnessed,
    tuple(signed_by),
  )


def _step_bodies(ldir: Path, size: int):
  for index, _, body in records(ldir, kinds=(rec.STEP,), stop=size):
    yield index, body


def _check_heads(
  heads, sizes, scan: logscan.LogScan, run_id: str, run_trust: TrustStore, consistency: bool
) -> None:
  good_size = 0
  for k, h in enumerate(heads):
    p = h.payload
    try:
      verify(log.HEAD, h, run_trust)
    except SignatureError as exc:
      raise LineageError(
        f"tree head {k} is not a valid signature by the run's key: {exc}", index=good_size
      ) from None
    if p.get("run_id") != run_id:
      raise LineageError(
        f"tree head {k} belongs to run {p.get('run_id')!r}, not {run_id!r}", index=good_size
      )
    expected_prev = heads[k - 1].id if k else None
    if p.get("prev_head") != expected_prev:
      raise LineageError(
        f"tree head {k} does not follow tree head {k - 1}: a signed head was removed or reordered",
        index=good_size,
      )
    size = sizes[k]
    if k and size < sizes[k - 1]:
      raise LineageError(
        f"tree head {k} covers {size} records, fewer than head {k - 1} ({sizes[k - 1]})", index=size
      )
    if size > scan.size:
      raise LineageError(
        f"tree head {k} covers {size} records but the log holds {scan.size}: records "
        f"{scan.size}..{size - 1} were deleted or truncated",
        index=scan.size,
      )
    if bytes.fromhex(p["root"]) != scan.roots[size] or bytes.fromhex(
      p["last_record"]
    ) != scan.record_hash(size - 1):
      raise LineageError(
        f"records {good_size}..{size - 1} do not match signed tree head {k}: the log was rewritten "
        f"from record {good_size} or later",
        index=good_size,
      )
    good_size = size
  if consistency and heads:
    tree = merkle.MerkleTree(scan.leaf_hashes())
    final = tree.root
    for k, size in enumerate(sizes):
      proof = tree.consistency_proof(size) if size < scan.size else []
      if not merkle.verify_consistency(size, scan.size, scan.roots[size], final, proof):
        raise LineageError(
          f"tree head {k} (size {size}) is not consistent with the final tree", index=size
        )


def _check_records(scan: logscan.LogScan, trust: TrustStore) -> None:
  checkpoint_steps = {}
  for i, body in sorted(scan.bodies.items()):
    kind = scan.kinds[i]
    if kind == rec.CHECKPOINT:
      if (
        int(body["lineage_size"]) != i
        or bytes.fromhex(body["lineage_root"]) != scan.roots_before[i]
      ):
        raise LineageError(
          f"record {i}: checkpoint at step {body['step']} names log position "
          f"{body['lineage_size']}, but it is record {i}",
          index=i,
        )
      checkpoint_steps[i] = int(body["step"])
    elif kind == rec.RUN_RESUME:
      start, end = body["superseded"]
      ck = body.get("checkpoint_record")
      if not 0 < start <= end == i:
        raise LineageError(
          f"record {i}: resume supersedes records {start}..{end - 1}, which must end right "
          "before the resume record",
          index=i,
        )
      if ck is not None and checkpoint_steps.get(ck) != int(body["checkpoint_step"]):
        raise LineageError(
          f"record {i}: resume names checkpoint record {ck} at step {body['checkpoint_step']}, "
          "which the log does not hold",
          index=i,
        )


def _check_checkpoints(
  run_dir: Path,
  scan: logscan.LogScan,
  signed_size: int,
  run_id: str,
  required: bool,
  checked: list[str],
  unchecked: list[str],
) -> None:
  """Each effective checkpoint of the signed part against its record (see the module doc)."""
  for ref in hist.history(scan, signed_size).checkpoints:
    path = run_dir / ref.path
    missing = None
    if not path.is_dir():
      missing = f"checkpoint at step {ref.step} ({ref.path} not present)"
    elif ref.files_sha256 is None or ref.digests is None:
      missing = (
        f"checkpoint at step {ref.step} (record {ref.index} carries no file and item digests)"
      )
    if missing is not None:
      if required:
        raise LineageError(
          f"record {ref.index}: {missing}; an audit checks every effective checkpoint (pass "
          "--allow-missing to list it as unchecked)",
          index=ref.index,
        )
      unchecked.append(missing)
      continue
    head = LogHead(ref.index, scan.roots_before[ref.index], scan.record_hash(ref.index - 1))
    check_checkpoint_files(
      path,
      index=ref.index,
      step=ref.step,
      run_id=run_id,
      head=head,
      files_digest=ref.files_sha256,
      digests=ref.digests,
    )
    checked.append(
      f"checkpoint at step {ref.step} (files and lineage item match record {ref.index})"
    )


def _check_parent_head(pdir: Path, parent: Mapping, report: VerifyReport) -> None:
  if report.run_id != parent["run_id"]:
    raise LineageError(
      f"run-start names parent run {parent['run_id']}, but {pdir} holds run {report.run_id}",
      index=0,
    )
  heads, _ = read_heads(pdir / "lineage")
  for h in heads:
    if h.id == parent["head_id"]:
      if int(h.payload["size"]) != int(parent["size"]) or h.payload["root"] != parent["root"]:
        raise LineageError(
          f"parent head {parent['head_id'][:16]}... does not say what run-start recorded", index=0
        )
      return
  raise LineageError(
    f"parent run {parent['run_id']} ({pdir}) holds no signed head {parent['head_id'][:16]}...; "
    "this run does not continue that log",
    index=0,
  )


def consistency_proof(run_dir: str | os.PathLike, old_size: int) -> tuple[LogHead, list[bytes]]:
  """The current head and an RFC 9162 proof that the first `old_size` records are a prefix of it,
  for an auditor who holds only an older signed head."""
  _, ldir = lineage_dir(run_dir)
  scan = logscan.scan(ldir)
  tree = merkle.MerkleTree(scan.leaf_hashes())
  return scan.head(), (tree.consistency_proof(old_size) if old_size < scan.size else [])
