"""A deployment gate: requirements checked against a verified lineage, and a signed Verification
Summary Attestation (SLSA VSA v1, in-toto Statement v1 in a DSSE envelope) of the outcome.

Requirement grammar (one requirement per line; words are case-insensitive, spaces free):

  no example where EXPR reached GROUP    no (step, example) row of the signed log whose example's
                                         credential labels satisfy EXPR (the policy expression
                                         language) reached GROUP (`aqgov.lineage.query`)
  every step closed under signed heads   every record of the log is covered by a signed tree head
                                         (no unsigned tail)
  run closed and verified                the run ended with a signed run-end record
  entropy within bounds for GROUP        no step recorded an out-of-bounds measurement on GROUP,
                                         other than one an authority's override admitted
  no unresolved escalation               every escalation record is followed by an override record
  witness cosigned                       a witness named with `witnesses=` cosigned the final head

Every requirement presumes the lineage verifies against the trusted keys; when it does not, every
requirement fails with that reason. A rules file is TOML: `require = ["...", ...]` and an
optional `name`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from aqgov.documents._files import read_text
from aqgov.documents._keys import SigningKey, TrustStore
from aqgov.documents._toml import loads_toml
from aqgov.errors import AqgovError, GateError
from aqgov.lineage import _history as hist
from aqgov.lineage._export import STATEMENT_TYPE, envelope
from aqgov.lineage._heads import read_heads
from aqgov.lineage._verify import VerifyReport, lineage_dir, verify_lineage

VSA_PREDICATE_TYPE = "https://slsa.dev/verification_summary/v1"
VERIFIER_ID = "https://aqgov.dev/gate/v1"
GATE_LEVEL = "AQGOV_GOVERNANCE_GATE_PASSED"


class Requirement(NamedTuple):
  """One parsed requirement: its kind, its arguments and the text it was written as."""

  kind: str  # "no-example-reached", "signed-heads", "closed", "entropy", "escalation", "witness"
  text: str
  expr: str | None = None
  group: str | None = None


class RequirementResult(NamedTuple):
  requirement: str
  passed: bool
  detail: str


class GateResult(NamedTuple):
  """Each requirement's result and the verification they rest on (None when it failed)."""

  passed: bool
  results: tuple[RequirementResult, ...]
  report: VerifyReport | None
  error: str | None  # why verification failed


_GROUP = r"(?P<group>[A-Za-z0-9_.-]+)"
_FORMS = tuple(
  (re.compile(pattern, re.IGNORECASE), kind)
  for pattern, kind in (
    (rf"no example where (?P<expr>.+) reached {_GROUP}", "no-example"),
    (r"every step closed under signed heads", "signed-heads"),
    (r"run closed and verified", "closed"),
    (rf"entropy within bounds for {_GROUP}", "entropy"),
    (r"no unresolved escalations?", "escalation"),
    (r"witness cosigned", "witness"),
  )
)


def parse_requirement(text: str) -> Requirement:
  """A requirement of the grammar in the module doc; `GateError` listing the forms otherwise."""
  norm = " ".join(str(text).split())
  for pattern, kind in _FORMS:
    m = pattern.fullmatch(norm)
    if m is not None:
      got = m.groupdict()
      return Requirement(kind, norm, got.get("expr"), got.get("group"))
  raise GateError(
    f"requirement {norm!r} is not one the gate knows; write one of: 'no example where EXPR "
    "reached GROUP', 'every step closed under signed heads', 'run closed and verified', "
    "'entropy within bounds for GROUP', 'no unresolved escalation', 'witness cosigned'"
  )


def read_rules(path: str | os.PathLike) -> tuple[str, list[str]]:
  """(name, requirement texts) of a TOML rules file (`require = [...]`, optional `name`)."""
  doc = loads_toml(read_text(path, GateError, "rules file"), GateError, f"rules file {path}")
  req = doc.get("require")
  if not isinstance(req, list) or not all(isinstance(r, str) for r in req) or not req:
    raise GateError(
      f'rules file {path} must hold `require = ["...", ...]`, a non-empty list of requirements'
    )
  extra = sorted(set(doc) - {"require", "name"})
  if extra:
    raise GateError(f"rules file {path} has unknown keys {extra}; it holds `name` and `require`")
  return str(doc.get("name", Path(path).stem)), list(req)


def _check(req: Requirement, run_dir: Path, report: VerifyReport) -> RequirementResult:
  from aqgov.lineage._query import query
  from aqgov.lineage._views import events

  if req.kind == "no-example":
    found = query(run_dir, req.group, where=req.expr, sort="step", top=3)
    if found.count == 0:
      return RequirementResult(req.text, True, f"no such example reached {req.group}")
    first = ", ".join(f"{m.example_id} at step {m.step}" for m in found.rows)
    return RequirementResult(req.text, False, f"{found.count} row(s), first {first}")
  if req.kind == "signed-heads":
    ok = report.unsigned == 0 and report.signed_size > 0
    return RequirementResult(
      req.text,
      ok,
      f"{report.signed_size} of {report.size} records under signed heads ({report.heads} heads)",
    )
  if req.kind == "closed":
    return RequirementResult(
      req.text, report.closed, "closed by a signed run-end" if report.closed else "run not closed"
    )
  if req.kind == "witness":
    ok = bool(report.witnessed)
    detail = (
      f"cosigned by {', '.join(report.witnessed)}"
      if ok
      else "no witness cosignature was checked (name the witness with --witness)"
    )
    return RequirementResult(req.text, ok, detail)
  evs = events(run_dir)
  if req.kind == "entropy":
    bad = [
      e
      for e in evs
      if e.kind == "out-of-bounds" and e.group == req.group and e.action != "admitted"
    ]
    steps = sorted({e.step for e in bad})
    return RequirementResult(
      req.text,
      not bad,
      "no out-of-bounds measurement"
      if not bad
      else f"out of bounds at {len(steps)} step(s), first {steps[:5]}: {bad[0].detail} -> "
      f"{bad[0].action}",
    )
  open_ = [e for e in evs if e.kind == "escalation" and not e.resolved]
  return RequirementResult(
    req.text,
    not open_,
    "no unresolved escalation"
    if not open_
    else f"{len(open_)} unresolved, first at step {open_[0].step}",
  )


def evaluate(
  run_dir: str | os.PathLike,
  requirements: Sequence[str],
  trust: TrustStore,
  *,
  witnesses: Sequence[str] = (),
  parent_dirs: dict[str, str] | None = None,
) -> GateResult:
  """Verify the run against `trust` (a live run too) and check each requirement."""
  if not requirements:
    raise GateError("give at least one requirement (--require or --rules)")
  parsed = [parse_requirement(r) for r in requirements]
  root, _ = lineage_dir(run_dir)
  try:
    report = verify_lineage(
      root, trust, require_closed=False, witnesses=witnesses, parent_dirs=parent_dirs or {}
    )
  except AqgovError as exc:
    why = f"the lineage does not verify: {type(exc).__name__}: {exc}"
    return GateResult(
      False, tuple(RequirementResult(r.text, False, why) for r in parsed), None, why
    )
  groups = hist.load(lineage_dir(root)[1])[0].bodies[0]["groups"]
  for r in parsed:
    if r.group is not None and r.group not in groups:
      raise GateError(
        f"requirement {r.text!r} names group {r.group!r}, not one of this run's groups: "
        f"{', '.join(groups)}"
      )
  results = tuple(_check(r, root, report) for r in parsed)
  return GateResult(all(r.passed for r in results), results, report, None)


def vsa_statement(
  run_dir: str | os.PathLike,
  result: GateResult,
  requirements: Sequence[str],
  *,
  policy_name: str = "aqgov-gate",
  time_s: float | None = None,
) -> dict:
  """The in-toto Statement (predicate: SLSA VSA v1) of a gate result on a verified run. Subjects are
  the params digests of the signed part's effective checkpoints (whose files `verify_lineage`
  checked); the predicate names the run's policy ids, the lineage head and each result."""
  if result.report is None:
    raise GateError(f"nothing to attest: {result.error}")
  root, ldir = lineage_dir(run_dir)
  scan, history = hist.load(ldir)
  start = scan.bodies[0]
  heads, _ = read_heads(ldir)
  head = next(h for h in reversed(heads) if int(h.payload["size"]) == history.size)
  checkpoints = [c for c in history.checkpoints if c.index < history.size]
  texts = [" ".join(r.split()) for r in requirements]
  policy_text = json.dumps({"name": policy_name, "require": texts}, sort_keys=True)
  when = dt.datetime.fromtimestamp(
    dt.datetime.now(dt.UTC).timestamp() if time_s is None else time_s, dt.UTC
  )
  from importlib.metadata import version

  predicate = {
    "verifier": {"id": VERIFIER_ID, "version": {"aqgov": version("aqgov")}},
    "timeVerified": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
    "resourceUri": f"aqgov:run/{result.report.run_id}",
    "policy": {
      "uri": f"aqgov:gate/{policy_name}",
      "digest": {"sha256": hashlib.sha256(policy_text.encode()).hexdigest()},
    },
    "inputAttestations": [],
    "verificationResult": "PASSED" if result.passed else "FAILED",
    "verifiedLevels": [GATE_LEVEL] if result.passed else [],
    "slsaVersion": "1.0",
    "aqgov": {
      "run_id": result.report.run_id,
      "policies": [p["id"] for p in start["policies"]],
      "profiles": [p["id"] for p in start["profiles"]],
      "credential_manifests": [m["id"] for m in start["manifests"]],
      "lineage_head": {
        "id": head.id,
        "size": int(head.payload["size"]),
        "root": head.payload["root"],
        "signer": start["signer"],
      },
      "closed": result.report.closed,
      "requirements": [r._asdict() for r in result.results],
    },
  }
  return {
    "_type": STATEMENT_TYPE,
    "subject": [
      {
        "name": f"{result.report.run_id}/checkpoints/{c.step}/params",
        "digest": {"sha256": c.params_sha256},
      }
      for c in checkpoints
    ],
    "predicateType": VSA_PREDICATE_TYPE,
    "predicate": predicate,
  }


def attest(
  run_dir: str | os.PathLike,
  result: GateResult,
  requirements: Sequence[str],
  key: SigningKey,
  *,
  policy_name: str = "aqgov-gate",
) -> dict:
  """The VSA statement in a DSSE envelope signed by `key` (any DSSE verifier checks it)."""
  statement = vsa_statement(run_dir, result, requirements, policy_name=policy_name)
  payload = json.dumps(statement, sort_keys=True, separators=(",", ":")).encode("utf-8")
  return envelope(payload, key)
