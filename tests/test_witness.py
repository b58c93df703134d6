"""Witnessed tree heads: C2SP signed notes, checkpoints and cosignatures, a witness on loopback,
the writer submitting heads to it, and `verify --witness` catching logs re-signed after the fact."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from aqgov.cli import main
from aqgov.documents import _keys as keys
from aqgov.documents import _merkle as merkle
from aqgov.documents import _note as notes
from aqgov.errors import LineageError, NoteError, WitnessError
from aqgov.lineage import _cosign as cosign
from aqgov.lineage._heads import LogHead
from aqgov.lineage._verify import verify_lineage
from aqgov.lineage._witness import Witness, WitnessServer, encode_request, parse_request
from aqgov.lineage._writer import LineageWriter, open_for_resume

from lineage_helpers import digests, ids, start_body, summary

# golang.org/x/mod/sumdb/note's published example: Ed25519 is deterministic, so we must match it byte for byte.
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_TEXT = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
GO_NOTE = (
  GO_TEXT
  + "\n\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)

# A production CT log checkpoint with a log signature (0x01) and a witness cosignature (0x04) among others.
CT_NOTE = """arche2025h1.staging.ct.transparency.dev
1432088532
U7WM79jrzyhGZ5/GUBTpM7NzwdyfFx61t3RovgcC4Ro=

\u2014 arche2025h1.staging.ct.transparency.dev zTM8sQAAAZ5W0WdjBAMARjBEAiBjW5IQf9pvsYLfQFX6hoGREPMHbdQ3urbllzalApkptQIgIpwtEroeW2BXaHAI4kJXFbon5Ch9MNL5zRNZ55lvGt0=
\u2014 arche2025h1.staging.ct.transparency.dev ui8GwCF1+kWqZrxGdhj4aX3gcw7XUlXQQabg/27lefwhUkzbC3NygNI75MdhL1bfTW9g8Ei59RA23oHP7Ry1k3ZFWwQ=
\u2014 transparency.dev/DEV:witness-little-garden 2AQqhwAAAABqEiEgzgFIqqhbUoDwjMWE6UP8nd8/KYTzwZ2rhIgcqoXHAwVkjZr4AscylP3v7sEodkRAErumC2q44vdgJY096st5BQ==
\u2014 witness1.smartit.nu/witness1 pIyCDwAAAABqEiEghIp82KWebrw7/oHQwlTAm3g2RKS4+eebl8eO0WH+/iEcxZ75W3u5hNI7TOQtmJbqmNWVuE0tgh0XwzdZsDsUAQ==
\u2014 remora.n621.de 2net5wAAAABqEiEgPlfF3V06o0Y+fHM+J5J9s27wgxxcOVSpZ/2g/KSiXCg9DEZI+aVCIobWX9sXTynk5XeU/zZ0WBxtqB0DrAWfBw==
\u2014 witness.stagemole.eu Z/euoAAAAABqEiEgw0i+7g2ENfDAWHmtRzCfKTHSDwYDJA2NmKeGi9Y8FtEyOUvVr+AJmIY/2TUFucgKi7lI7cUiOvKFYe/TmN9DAg==
"""
CT_LOG_VKEY = (
  "arche2025h1.staging.ct.transparency.dev+ba2f06c0+AU0vHmlGCS/PdN8b2OaGmKprLI8HKM+dJ472xgFYh15f"
)
CT_WITNESS_VKEY = "remora.n621.de+da77ade7+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw2"


# ---- notes, checkpoints, cosignatures -------------------------------------------------------------


def test_sign_note_reproduces_the_go_reference_note_and_verifies_it():
  seed = base64.b64decode(GO_SKEY.split("+", 4)[4])[1:]
  key = keys.SigningKey("peter", seed)
  vkey = notes.parse_verifier_key(GO_VKEY)
  assert notes.note_key(key, "PeterNeumann").verifier_key == GO_VKEY
  note = notes.Note(GO_TEXT, (notes.sign_note(GO_TEXT, key, "PeterNeumann"),))
  assert note.to_bytes().decode() == GO_NOTE
  assert notes.parse_note(GO_NOTE.encode()) == note
  assert notes.verify_note(note, [vkey]) == (vkey,)
  with pytest.raises(NoteError, match="does not verify"):
    notes.verify_note(notes.parse_note(GO_NOTE.replace("cryptography", "cryptographY")), [vkey])


def test_a_real_witness_cosignature_and_log_signature_verify_and_unknown_ones_are_ignored():
  note = notes.parse_note(CT_NOTE)
  cp = notes.parse_checkpoint(note.text)
  assert (cp.origin, cp.size) == ("arche2025h1.staging.ct.transparency.dev", 1432088532)
  for vkey in (CT_LOG_VKEY, CT_WITNESS_VKEY):
    assert notes.verify_note(note, [notes.parse_verifier_key(vkey)]) == (
      notes.parse_verifier_key(vkey),
    )
  altered = notes.Note(note.text.replace("1432088532", "1432088533"), note.signatures)
  with pytest.raises(NoteError, match="does not verify"):
    notes.verify_note(altered, [notes.parse_verifier_key(CT_WITNESS_VKEY)])
  with pytest.raises(NoteError, match="no signature by a known key"):
    notes.verify_note(note, [notes.parse_verifier_key(GO_VKEY)])


def test_checkpoint_and_cosignature_round_trip_and_tampering_is_refused():
  log, wit = keys.generate("log"), keys.generate("wit")
  cp = notes.Checkpoint("aqgov.example/run/r1", 7, bytes(range(32)))
  text = cp.text()
  assert notes.parse_checkpoint(text) == cp
  cosig = notes.cosign(text, wit, "aqgov.example/witness/w", 1_700_000_000)
  note = notes.Note(text, (notes.sign_note(text, log, cp.origin), cosig))
  back = notes.parse_note(note.to_bytes())
  assert back == note and notes.cosignature_time(back.signatures[1]) == 1_700_000_000
  wkey = notes.note_key(wit, "aqgov.example/witness/w", notes.COSIGNATURE_V1)
  assert notes.parse_verifier_key(wkey.verifier_key) == wkey
  assert notes.verify_note(back, [wkey]) == (wkey,)
  assert notes.verify_note(
    back, [notes.note_key(wit, None, notes.COSIGNATURE_V1)]
  )  # any name, key hash fits
  # a cosignature is not a plain signature: the same key as type 0x01 does not match it
  with pytest.raises(NoteError, match="no signature by a known key"):
    notes.verify_note(notes.Note(text, (cosig,)), [notes.note_key(wit, "aqgov.example/witness/w")])
  forged_time = cosig._replace(sig=(1_700_000_001).to_bytes(8, "big") + cosig.sig[8:])
  with pytest.raises(NoteError, match="does not verify"):
    notes.verify_note(notes.Note(text, (forged_time,)), [wkey])


@pytest.mark.parametrize(
  "bad",
  [
    "no blank line\n\u2014 a AAAAAAA=\n",
    "text\n\n",
    "text\n\n\u2014 a AAAA\n",  # too short for hash + signature
    "text\n\n\u2014 a not-base64!\n",
    "text\n\n\u2014 a b AAAAAAA=\n",  # a space in the name
    "text\n\n- a AAAAAAA=\n",  # not an em dash
    "te\x01xt\n\n\u2014 a AAAAAAA=\n",  # a control character
    "text\n\n\u2014 a AAAAAAA=",  # no final newline
  ],
)
def test_malformed_notes_are_refused(bad):
  with pytest.raises(NoteError):
    notes.parse_note(bad)


@pytest.mark.parametrize(
  "bad",
  [
    "o\n01\n" + "A" * 43 + "=\n",
    "o\n1\nAAAA\n",
    "o\n1\n",
    "o\n1\n" + "A" * 43 + "=\n\n",
    "o\n-1\n" + "A" * 43 + "=\n",
  ],
)
def test_malformed_checkpoints_are_refused(bad):
  with pytest.raises(NoteError):
    notes.parse_checkpoint(bad)


def test_verifier_keys_with_a_wrong_hash_or_type_are_refused():
  with pytest.raises(NoteError, match="key hash"):
    notes.parse_verifier_key(GO_VKEY.replace("c74f20a3", "c74f20a4"))
  with pytest.raises(NoteError):
    notes.parse_verifier_key("PeterNeumann+c74f20a3")


# ---- the witness on loopback ----------------------------------------------------------------------

ORIGIN = cosign.origin_of("run-1")


@pytest.fixture()
def setup(tmp_path):
  run_key, wit_key = keys.generate("run"), keys.generate("wit")
  witness = Witness(
    wit_key,
    "aqgov.example/witness/w1",
    {ORIGIN: [notes.note_key(run_key, ORIGIN)]},
    tmp_path / "state",
  )
  server = WitnessServer(witness)
  server.start()
  yield run_key, witness, server, tmp_path
  server.shutdown()
  server.server_close()


def _tree(n: int, salt: bytes = b"") -> merkle.MerkleTree:
  return merkle.MerkleTree([merkle.leaf_hash(salt + bytes([i])) for i in range(n)])


def _note(key, tree: merkle.MerkleTree, size: int) -> notes.Note:
  return cosign.checkpoint_note("run-1", LogHead(size, tree.root_at(size), b"\0" * 32), key)


def test_submit_cosigns_extensions_and_refuses_rollbacks_forks_and_bad_proofs(setup):
  run_key, witness, server, _ = setup
  tree, url, wkey = _tree(12), server.url, witness.note_key
  sigs = cosign.submit(url, _note(run_key, tree, 5), 0, [], witness_key=wkey)
  assert notes.verify_note(_note(run_key, tree, 5).with_signatures(sigs), [wkey])
  assert witness.state(ORIGIN).size == 5
  cosign.submit(url, _note(run_key, tree, 9), 5, tree.consistency_proof(5, 9), witness_key=wkey)

  def status(note, old, proof):
    with pytest.raises(WitnessError) as err:
      cosign.submit(url, note, old, proof)
    return err.value.status

  assert status(_note(run_key, tree, 7), 9, []) == 400  # rollback: old > size
  assert (
    status(_note(run_key, tree, 7), 5, tree.consistency_proof(5, 7)) == 409
  )  # rollback: stale old
  forked = _tree(12, b"x")
  assert status(_note(run_key, forked, 9), 9, []) == 409  # fork: same size, other root
  assert (
    status(_note(run_key, forked, 11), 9, forked.consistency_proof(9, 11)) == 422
  )  # fork: proof fails
  assert status(_note(keys.generate("run"), tree, 11), 9, tree.consistency_proof(9, 11)) == 403
  other = cosign.checkpoint_note("run-2", LogHead(3, tree.root_at(3), b"\0" * 32), run_key)
  assert status(other, 0, []) == 404
  assert witness.state(ORIGIN) == (9, tree.root_at(9))  # nothing refused changed the state


def test_a_409_is_retried_once_from_the_witness_size_with_a_fresh_proof(setup):
  run_key, witness, server, tmp_path = setup
  tree = _tree(10)
  cosign.submit(server.url, _note(run_key, tree, 4), 0, [])
  asked = []

  def prove(old):
    asked.append(old)
    return tree.consistency_proof(old, 10)

  sigs = cosign.submit(
    server.url, _note(run_key, tree, 10), 0, [], prove=prove, witness_key=witness.note_key
  )
  assert asked == [4] and len(sigs) == 1 and witness.state(ORIGIN).size == 10
  with pytest.raises(
    WitnessError
  ) as err:  # without prove, the 409 is reported with the witness's size
    cosign.submit(server.url, _note(run_key, _tree(12), 12), 4, [])
  assert (err.value.status, err.value.size) == (409, 10)
  # the state survives a restart of the witness
  again = Witness(witness.key, witness.name, witness.logs, tmp_path / "state")
  assert again.state(ORIGIN) == (10, tree.root)


def test_request_bodies_round_trip_and_malformed_ones_get_400(setup):
  run_key, witness, _, _ = setup
  tree = _tree(6)
  note = _note(run_key, tree, 6)
  req = parse_request(encode_request(3, tree.consistency_proof(3, 6), note))
  assert (req.old, list(req.proof), req.note) == (3, tree.consistency_proof(3, 6), note)
  for body in (
    b"old 03\n\n" + note.to_bytes(),
    b"old 1\nAAAA\n\n" + note.to_bytes(),
    b"new 0\n\n" + note.to_bytes(),
    b"old 0\n" + note.to_bytes(),
    b"\xff",
  ):
    assert witness.add_checkpoint(body).status == 400


# ---- the writer, verify --witness, the CLI --------------------------------------------------------


def _witnessed_log(lineage_dir: Path, key, url: str, wkey, steps: int = 12, **kw) -> LogHead:
  w = LineageWriter.create(
    lineage_dir, key, start_body(key), head_every=4, fsync="never", witnesses=[(url, wkey)], **kw
  )
  for s in range(1, steps + 1):
    w.append(summary(s), ids(s), digests(s))
  return w.close()


def _cli_verify(run: Path, *witnesses: str):
  args = ["lineage", "verify", str(run), "--trust", str(run / "keys" / "run.pub")]
  for w in witnesses:
    args += ["--witness", w]
  return CliRunner().invoke(main, args)


def test_a_witnessed_run_verifies_and_a_log_resigned_after_the_fact_does_not(setup):
  run_key, witness, server, tmp_path = setup
  run = tmp_path / "run"
  keys.write_keypair(run_key, run / "keys")
  head = _witnessed_log(run / "lineage", run_key, server.url, witness.note_key.verifier_key)
  stored = sorted(p.name for p in (run / "lineage" / "cosignatures").iterdir())
  assert f"{head.size:012d}.note" in stored
  assert witness.state(ORIGIN) == (head.size, head.root)
  wit_pub = tmp_path / "wit.pub"
  wit_pub.write_text(keys.public_key_json(witness.key.public))
  report = verify_lineage(
    run, keys.TrustStore.of([run_key]), witnesses=[witness.note_key.verifier_key]
  )
  assert report.witnessed == (witness.name,)
  for w in (witness.note_key.verifier_key, str(wit_pub)):
    ok = _cli_verify(run, w)
    assert ok.exit_code == 0 and "cosigned by witness" in ok.output, ok.output
  stranger = notes.note_key(
    keys.generate("x"), "aqgov.example/witness/x", notes.COSIGNATURE_V1
  ).verifier_key
  assert "no valid signature by witness" in _cli_verify(run, stranger).output

  # the operator holds the run key: cut the log back to an earlier signed head, close it again, re-sign
  cut = tmp_path / "cut"
  shutil.copytree(run, cut)
  _truncate_to(cut / "lineage", 6)
  w, _ = open_for_resume(cut / "lineage", run_key, fsync="never")
  w.close()
  assert verify_lineage(cut, keys.TrustStore.of([run_key])).closed  # the run key alone cannot tell
  bad = _cli_verify(cut, witness.note_key.verifier_key)
  assert bad.exit_code == 1 and "no cosigned checkpoint" in bad.output, bad.output
  # ... and even with a stored note of the final size, its root is not the one the witness saw
  shutil.copy(
    run / "lineage" / "cosignatures" / f"{head.size:012d}.note",
    cut
    / "lineage"
    / "cosignatures"
    / f"{verify_lineage(cut, keys.TrustStore.of([run_key])).size:012d}.note",
  )
  assert "rewritten or rolled back" in _cli_verify(cut, witness.note_key.verifier_key).output
  # the witness refuses to cosign the re-signed log
  with pytest.raises(WitnessError):
    cosign.cosign_final_head(cut / "lineage", run_key, [(server.url, witness.note_key)])


def _truncate_to(lineage_dir: Path, size: int) -> None:
  """Keep the first `size` records and the heads that cover no more (an operator's rewrite)."""
  from lineage_helpers import split_frames

  seg = sorted((lineage_dir / "segments").glob("*.seg"))[0]
  header, frames = split_frames(seg.read_bytes())
  seg.write_bytes(header + b"".join(frames[:size]))
  heads = lineage_dir / "heads.seg"
  hdr, hframes = split_frames(heads.read_bytes())
  from aqgov.lineage._heads import read_heads

  docs, _ = read_heads(lineage_dir)
  keep = [f for f, d in zip(hframes, docs, strict=True) if int(d.payload["size"]) <= size]
  heads.write_bytes(hdr + b"".join(keep))


def test_an_unreachable_witness_fails_the_close_but_leaves_an_intact_log(setup, tmp_path):
  run_key, witness, server, _ = setup
  run = tmp_path / "down"
  key_path, _ = keys.write_keypair(run_key, tmp_path / "down-keys")
  with pytest.raises(WitnessError, match="no cosignature from witness"):
    _witnessed_log(
      run / "lineage", run_key, "http://127.0.0.1:9", witness.note_key, witness_timeout=2.0
    )
  trust = keys.TrustStore.of([run_key])
  assert verify_lineage(run, trust).closed  # the log is complete and closed
  with pytest.raises(LineageError, match="no cosigned checkpoint"):
    verify_lineage(run, trust, witnesses=[witness.note_key])
  # once the witness is reachable the final head is cosigned after the fact
  result = CliRunner().invoke(
    main,
    [
      "witness",
      "cosign",
      str(run),
      "--key",
      str(key_path),
      "--witness",
      f"{server.url}={witness.note_key.verifier_key}",
    ],
  )
  assert result.exit_code == 0, result.output
  assert verify_lineage(run, trust, witnesses=[witness.note_key]).witnessed == (witness.name,)


def test_verify_with_witnesses_requires_a_closed_log(setup):
  run_key, witness, server, tmp_path = setup
  run = tmp_path / "open"
  keys.write_keypair(run_key, run / "keys")
  w = LineageWriter.create(
    run / "lineage",
    run_key,
    start_body(run_key),
    head_every=2,
    fsync="never",
    witnesses=[(server.url, witness.note_key)],
  )
  for s in range(1, 5):
    w.append(summary(s), ids(s), digests(s))
  w.flush(sign_head=True)
  w.abandon()
  with pytest.raises(LineageError, match="not closed"):
    verify_lineage(run, keys.TrustStore.of([run_key]), witnesses=[witness.note_key])


def test_witness_serve_cli_parses_its_logs(tmp_path):
  from aqgov.cli.witness import _log_entry

  run_key = keys.generate("run")
  _, pub = keys.write_keypair(run_key, tmp_path)
  origin, k = _log_entry(f"{ORIGIN}={pub}")
  assert (origin, k) == (ORIGIN, notes.note_key(run_key, ORIGIN))
  assert _log_entry(f"{ORIGIN}={k.verifier_key}") == (origin, k)
  out = CliRunner().invoke(main, ["witness", "vkey", str(pub), "--name", ORIGIN, "--log"])
  assert out.output.strip() == k.verifier_key


def test_a_governed_run_is_witnessed_and_its_resume_keeps_the_recorded_witnesses(setup):
  from aqgov.lineage._run import GovernedRun

  from lineage_helpers import batches, examples_file, make_run, trust_of

  run_key, witness, server, tmp_path = setup
  data = examples_file(tmp_path / "examples.jsonl")
  run = tmp_path / "governed"
  stopped = make_run(
    run,
    data,
    3,
    key=run_key,
    run_id="run-1",
    close=False,
    witnesses=[(server.url, witness.note_key.verifier_key)],
  )
  stopped.abandon()  # a closed run is final: only a stopped one resumes
  resumed = GovernedRun.resume(run, key=run_key)
  resumed.step(batches(data, resumed.next_step))
  head = resumed.close()
  assert witness.state(ORIGIN) == (head.size, head.root)
  assert verify_lineage(run, trust_of(run), witnesses=[witness.note_key]).size == head.size
