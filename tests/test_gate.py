"""The deployment gate: requirements over a verified lineage, exit codes, rules files, and a
Verification Summary Attestation checked by an independent DSSE verifier (securesystemslib)."""

from __future__ import annotations

import base64
import copy
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from securesystemslib.dsse import Envelope
from securesystemslib.exceptions import VerificationError
from securesystemslib.signer import SSlibKey

from aqgov.cli import main
from aqgov.documents import _keys as keys
from aqgov.errors import GateError
from aqgov.lineage import _history as hist
from aqgov.lineage import evaluate, parse_requirement
from aqgov.lineage._gate import VSA_PREDICATE_TYPE
from aqgov.lineage._heads import read_heads

import lineage_helpers as lh

PASSING = (
  "no example where sensitivity_tier >= 2 reached core",
  "every step closed under signed heads",
  "run closed and verified",
  "entropy within bounds for adapter",
  "no unresolved escalation",
)


@pytest.fixture(scope="module")
def run(governed_run):
  return governed_run


def _trust_args(run_dir: Path, auth) -> list[str]:
  return [
    "--trust",
    *map(str, auth.public_keys),
    "--run-key",
    str(lh.run_key_path(run_dir).with_suffix(".pub")),
  ]


def _gate(run_dir, auth, *args):
  return CliRunner().invoke(main, ["gate", str(run_dir), *_trust_args(run_dir, auth), *args])


def _requires(*texts: str) -> list[str]:
  return [a for t in texts for a in ("--require", t)]


def test_the_requirement_grammar_parses_each_form_and_keeps_the_expression():
  r = parse_requirement("No example where  acme-data.sensitivity_tier >= 2  reached core")
  assert (r.kind, r.expr, r.group) == ("no-example", "acme-data.sensitivity_tier >= 2", "core")
  assert parse_requirement("Witness cosigned").kind == "witness"
  assert parse_requirement("entropy within bounds for head").group == "head"
  with pytest.raises(GateError, match="not one the gate knows"):
    parse_requirement("the model is safe")


def test_a_run_meeting_every_requirement_passes_with_exit_0(run):
  run_dir, auth = run
  result = _gate(run_dir, auth, *_requires(*PASSING))
  assert result.exit_code == 0, result.output
  assert result.stdout.strip().endswith("PASS") and "FAIL" not in result.stdout


def test_a_run_breaking_a_requirement_fails_with_exit_1_and_says_which(run):
  run_dir, auth = run
  result = _gate(
    run_dir,
    auth,
    *_requires(
      "no example where sensitivity_tier >= 2 reached adapter",
      "entropy within bounds for core",
      "witness cosigned",
      "every step closed under signed heads",
    ),
  )
  assert result.exit_code == 1, result.output
  outcome = evaluate(
    run_dir,
    [
      "no example where sensitivity_tier >= 2 reached adapter",
      "entropy within bounds for core",
      "witness cosigned",
      "every step closed under signed heads",
    ],
    lh.trust_of(run_dir),
  )
  assert [r.passed for r in outcome.results] == [False, False, False, True]
  assert "row(s), first ex-" in outcome.results[0].detail
  assert "out of bounds at 4 step(s)" in outcome.results[1].detail


@pytest.mark.parametrize(
  "requirement, message",
  [
    ("everything is fine", "not one the gate knows"),
    ("no example where tier >= 2 reached core", "no trusted taxonomy defines field 'tier'"),
    ("no example where sensitivity_tier >= 2 reached nowhere", "not one of this run's groups"),
    ("entropy within bounds for nowhere", "not one of this run's groups"),
  ],
)
def test_bad_input_exits_2_with_a_clear_message(run, requirement, message):
  run_dir, auth = run
  result = _gate(run_dir, auth, "--require", requirement)
  assert result.exit_code == 2 and message in result.stderr, result.output


def test_a_rules_file_holds_the_requirements(run, tmp_path):
  run_dir, auth = run
  rules = tmp_path / "deploy.toml"
  rules.write_text(
    'name = "deploy"\nrequire = [\n' + "".join(f'  "{r}",\n' for r in PASSING) + "]\n"
  )
  result = _gate(run_dir, auth, "--rules", str(rules))
  assert result.exit_code == 0 and "gate deploy" in result.stdout, result.output
  rules.write_text('require = "not a list"\n')
  assert _gate(run_dir, auth, "--rules", str(rules)).exit_code == 2
  rules.write_text("require = [\n")
  assert _gate(run_dir, auth, "--rules", str(rules)).exit_code == 2


def test_a_tampered_run_fails_every_requirement(run, tmp_path):
  run_dir, auth = run
  d = tmp_path / "run"
  shutil.copytree(run_dir, d)
  seg = sorted((d / "lineage" / "segments").glob("*.seg"))[0]
  data = bytearray(seg.read_bytes())
  data[len(data) // 2] ^= 1
  seg.write_bytes(bytes(data))
  outcome = evaluate(d, list(PASSING), lh.trust_of(run_dir))
  assert not outcome.passed and outcome.report is None
  assert all("does not verify" in r.detail for r in outcome.results)
  assert _gate(d, auth, *_requires(*PASSING)).exit_code == 1


def _sslib_key(key: keys.PublicKey) -> SSlibKey:
  return SSlibKey(key.key_id, "ed25519", "ed25519", {"public": key.raw.hex()})


@pytest.fixture(scope="module")
def vsa(run, tmp_path_factory) -> dict:
  run_dir, auth = run
  out = tmp_path_factory.mktemp("vsa") / "vsa.json"
  result = _gate(
    run_dir,
    auth,
    *_requires(*PASSING),
    "--attest",
    str(out),
    "--key",
    str(lh.run_key_path(run_dir)),
  )
  assert result.exit_code == 0, result.output
  return json.loads(out.read_text())


def test_the_vsa_verifies_with_securesystemslib_under_the_run_key(run, vsa):
  run_dir, _ = run
  key = lh.run_key(run_dir).public
  env = Envelope.from_dict(copy.deepcopy(vsa))
  assert list(env.verify([_sslib_key(key)], 1)) == [key.key_id]
  statement = json.loads(env.payload)
  assert statement["predicateType"] == VSA_PREDICATE_TYPE
  _, history = hist.load(run_dir / "lineage")
  assert [s["digest"]["sha256"] for s in statement["subject"]] == [
    c.params_sha256 for c in history.checkpoints
  ]
  p = statement["predicate"]
  assert p["verificationResult"] == "PASSED" and p["verifiedLevels"]
  start = next(iter(lh.segments.LogReader(run_dir / "lineage"))).body
  assert p["aqgov"]["policies"] == [x["id"] for x in start["policies"]]
  heads, _ = read_heads(run_dir / "lineage")
  assert p["aqgov"]["lineage_head"]["id"] == heads[-1].id
  assert [r["requirement"] for r in p["aqgov"]["requirements"]] == list(PASSING)
  assert all(r["passed"] for r in p["aqgov"]["requirements"])


def test_the_vsa_is_refused_under_another_key_and_when_altered(run, vsa):
  key = lh.run_key(run[0]).public
  env = Envelope.from_dict(copy.deepcopy(vsa))
  with pytest.raises(VerificationError):
    env.verify([_sslib_key(keys.generate("someone-else").public)], 1)
  statement = json.loads(env.payload)
  statement["predicate"]["verificationResult"] = "FAILED"
  altered = {
    **copy.deepcopy(vsa),
    "payload": base64.b64encode(json.dumps(statement).encode()).decode(),
  }
  with pytest.raises(VerificationError):
    Envelope.from_dict(altered).verify([_sslib_key(key)], 1)


def test_a_failing_gate_attests_failed(run, tmp_path):
  run_dir, auth = run
  out = tmp_path / "vsa.json"
  authority = auth.keys["acme-data"]
  result = _gate(
    run_dir,
    auth,
    *_requires("entropy within bounds for core"),
    "--attest",
    str(out),
    "--key",
    str(auth.root / "keys" / "acme-data.key"),
  )
  assert result.exit_code == 1, result.output
  env = Envelope.from_dict(json.loads(out.read_text()))
  assert list(env.verify([_sslib_key(authority.public)], 1)) == [authority.key_id]
  p = json.loads(env.payload)["predicate"]
  assert p["verificationResult"] == "FAILED" and p["verifiedLevels"] == []


def _log_with_escalation(run: Path, *, override: bool) -> keys.SigningKey:
  from aqgov.lineage import _bodies as bodies
  from aqgov.lineage import _record as rec
  from aqgov.lineage._writer import LineageWriter

  key = keys.generate("run")
  w = LineageWriter.create(run / "lineage", key, lh.start_body(key), head_every=2, fsync="never")
  for s in (1, 2):
    w.append(lh.summary(s), lh.ids(s), lh.digests(s))
  w.append_record(rec.ESCALATION, bodies.escalation_body(step=2, message="adapter collapsed"))
  if override:
    w.append_record(
      rec.OVERRIDE,
      bodies.override_body(step=2, token_kind="override", token_id="ab" * 32, token=b"t"),
    )
  w.close()
  lh.publish_key(run, key)
  return key


def test_an_escalation_no_override_followed_fails_the_gate(tmp_path):
  key = _log_with_escalation(tmp_path / "run", override=False)
  from aqgov.documents._keys import TrustStore

  outcome = evaluate(tmp_path / "run", ["no unresolved escalation"], TrustStore.of([key]))
  assert outcome.report is not None and not outcome.passed
  assert "1 unresolved, first at step 2" in outcome.results[0].detail


def test_an_override_after_an_escalation_resolves_it_in_the_events_view(tmp_path):
  from aqgov.lineage import events

  _log_with_escalation(tmp_path / "run", override=True)
  kinds = [(e.kind, e.resolved) for e in events(tmp_path / "run")]
  assert kinds == [("escalation", True), ("override", None)]
