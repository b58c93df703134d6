"""in-toto export, checked by an independent DSSE verifier (securesystemslib), and the lineage CLI."""

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
from aqgov.documents._keys import TrustStore
from aqgov.errors import LineageError
from aqgov.lineage import _history as hist
from aqgov.lineage._export import (
  PAYLOAD_TYPE,
  PREDICATE_TYPE,
  STATEMENT_TYPE,
  export_intoto,
  verify_envelope,
)
from aqgov.lineage._heads import read_heads

import lineage_helpers as lh


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
  base = tmp_path_factory.mktemp("export")
  data = lh.examples_file(base / "examples.jsonl", n=16)
  d = base / "run"
  lh.make_run(d, data, 3, checkpoint_every=2)
  return d


@pytest.fixture(scope="module")
def run_key(run_dir) -> keys.SigningKey:
  return lh.run_key(run_dir)


def _sslib_key(key: keys.PublicKey) -> SSlibKey:
  return SSlibKey(key.key_id, "ed25519", "ed25519", {"public": key.raw.hex()})


def _independent_verify(envelope: dict, key: keys.PublicKey) -> dict:
  env = Envelope.from_dict(copy.deepcopy(envelope))
  accepted = env.verify([_sslib_key(key)], 1)
  assert list(accepted) == [key.key_id] and env.payload_type == PAYLOAD_TYPE
  return json.loads(env.payload)


def test_the_attestation_verifies_with_securesystemslib(run_dir, run_key):
  statement = _independent_verify(export_intoto(run_dir, run_key), run_key.public)
  assert statement["_type"] == STATEMENT_TYPE and statement["predicateType"] == PREDICATE_TYPE


def test_subjects_are_the_checkpoint_digests_and_the_predicate_names_the_signed_head(
  run_dir, run_key
):
  statement = verify_envelope(export_intoto(run_dir, run_key), TrustStore.of([run_key]))
  _, history = hist.load(run_dir / "lineage")
  assert [s["digest"]["sha256"] for s in statement["subject"]] == [
    c.params_sha256 for c in history.checkpoints
  ]
  heads, _ = read_heads(run_dir / "lineage")
  p = statement["predicate"]
  assert (
    p["head"]["id"] == heads[-1].id
    and p["merkle_root"] == heads[-1].payload["root"]
    and p["closed"]
  )
  assert p["task"] == lh.TASK and p["parent"] is None


@pytest.mark.parametrize("part", ["payload", "payloadType", "sig"])
def test_a_tampered_envelope_is_rejected_by_the_independent_verifier(run_dir, run_key, part):
  env = export_intoto(run_dir, run_key)
  if part == "payload":
    statement = json.loads(base64.b64decode(env["payload"]))
    statement["subject"][0]["digest"]["sha256"] = "0" * 64
    env["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
  elif part == "payloadType":
    env["payloadType"] = "application/json"
  else:
    sig = bytearray(base64.b64decode(env["signatures"][0]["sig"]))
    sig[0] ^= 1
    env["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
  with pytest.raises(VerificationError):
    Envelope.from_dict(copy.deepcopy(env)).verify([_sslib_key(run_key.public)], 1)
  with pytest.raises(LineageError):
    verify_envelope(env, TrustStore.of([run_key]))


def test_an_envelope_signed_by_another_key_is_rejected(run_dir, run_key):
  other = keys.generate("other")
  env = export_intoto(run_dir, other, trust=TrustStore.of([run_key]))
  with pytest.raises(VerificationError):
    Envelope.from_dict(copy.deepcopy(env)).verify([_sslib_key(run_key.public)], 1)


def test_export_refuses_a_lineage_that_does_not_verify(run_dir, run_key):
  with pytest.raises(LineageError, match="not trusted"):
    export_intoto(run_dir, keys.generate("stranger"))


def test_the_cli_verifies_shows_queries_and_exports_a_run(run_dir, run_key, tmp_path):
  runner = CliRunner()
  pub = str(run_dir / "keys" / "run.pub")
  _, other_pub = keys.write_keypair(keys.generate("other"), tmp_path / "keys")
  # several keys after one --trust, as a shell glob such as RUN/keys/*.pub expands
  out = runner.invoke(main, ["lineage", "verify", str(run_dir), "--trust", pub, str(other_pub)])
  assert out.exit_code == 0 and out.stdout.startswith("OK run ") and "(closed)" in out.output, (
    out.output
  )
  assert (
    "warning: trusted key file" in out.stderr
  )  # RUN/keys/run.pub: chosen by whoever holds the directory
  out = runner.invoke(main, ["lineage", "show", str(run_dir)])
  assert out.exit_code == 0 and "checkpoints" in out.output and "hidden" in out.output, out.output
  out = runner.invoke(main, ["lineage", "query", str(run_dir), "--group", "head", "--json"])
  rows = [json.loads(line) for line in out.output.splitlines()]
  assert out.exit_code == 0 and rows and all(r["weight"] > 0 for r in rows)
  target = tmp_path / "attestation.json"
  out = runner.invoke(
    main, ["lineage", "export", str(run_dir), "--intoto", str(target)]
  )  # key from the key dir
  assert out.exit_code == 0, out.output
  _independent_verify(json.loads(target.read_text()), run_key.public)


def test_the_cli_names_the_first_bad_record(run_dir, tmp_path):
  d = tmp_path / "run"
  shutil.copytree(run_dir, d)
  seg = lh.segment_path(d / "lineage")
  header, frames = lh.split_frames(seg.read_bytes())
  seg.write_bytes(header + b"".join(frames[:3] + frames[4:]))
  out = CliRunner().invoke(
    main, ["lineage", "verify", str(d), "--trust", str(d / "keys" / "run.pub")]
  )
  assert out.exit_code == 1 and "LineageError" in out.output and "record 3" in out.output
