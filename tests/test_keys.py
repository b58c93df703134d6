"""Ed25519 keys: files, permissions, key ids, secrecy, and the trust store."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat

import pytest
from click.testing import CliRunner

from aqgov.cli import main
from aqgov.documents import _keys as keys
from aqgov.errors import KeyFileError, SignatureError


def secret_forms(seed: bytes) -> list[str]:
  return [base64.b64encode(seed).decode(), seed.hex(), repr(seed)[2:-1]]


@pytest.fixture
def runner() -> CliRunner:
  return CliRunner()


def test_cli_writes_a_0600_private_key_and_a_public_key(runner, tmp_path):
  result = runner.invoke(main, ["keys", "new", "acme-data", "--out", str(tmp_path)])
  assert result.exit_code == 0, result.output
  key_path, pub_path = tmp_path / "acme-data.key", tmp_path / "acme-data.pub"
  assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
  assert keys.load_signing_key(key_path).public == keys.load_public_key(pub_path)


def test_cli_never_prints_the_private_key(runner, tmp_path):
  result = runner.invoke(main, ["keys", "new", "acme-data", "--out", str(tmp_path)])
  seed = keys.load_signing_key(tmp_path / "acme-data.key").seed
  for form in secret_forms(seed):
    assert form not in result.output
  shown = runner.invoke(main, ["keys", "id", str(tmp_path / "acme-data.pub")])
  assert all(form not in shown.output for form in secret_forms(seed))


def test_key_id_is_sha256_of_the_raw_public_key(tmp_path):
  key = keys.generate("owner")
  _, pub_path = keys.write_keypair(key, tmp_path)
  raw = base64.b64decode(json.loads(pub_path.read_text())["public"])
  assert key.key_id == hashlib.sha256(raw).hexdigest() == keys.key_id(raw)
  assert CliRunner().invoke(main, ["keys", "id", str(pub_path)]).output.strip() == key.key_id


def test_cli_refuses_to_overwrite_a_private_key(runner, tmp_path):
  assert runner.invoke(main, ["keys", "new", "owner", "--out", str(tmp_path)]).exit_code == 0
  before = (tmp_path / "owner.key").read_bytes()
  result = runner.invoke(main, ["keys", "new", "owner", "--out", str(tmp_path)])
  assert result.exit_code == 1
  assert "refusing to overwrite" in result.output
  assert (tmp_path / "owner.key").read_bytes() == before


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_loading_a_group_or_world_readable_key_is_refused(tmp_path, mode):
  key_path, _ = keys.write_keypair(keys.generate("owner"), tmp_path)
  os.chmod(key_path, mode)
  with pytest.raises(KeyFileError, match="chmod 600"):
    keys.load_signing_key(key_path)


def test_repr_and_str_never_show_the_secret():
  key = keys.generate("owner")
  for text in (repr(key), str(key), f"{key}", repr([key])):
    assert all(form not in text for form in secret_forms(key.seed))
    assert "owner" in text


def test_signatures_verify_only_for_the_exact_message():
  key = keys.generate("owner")
  sig = key.sign(b"message")
  assert key.public.verify(b"message", sig)
  assert not key.public.verify(b"messagE", sig)
  assert not key.public.verify(b"message", sig[:-1] + bytes([sig[-1] ^ 1]))
  assert not keys.generate("other").public.verify(b"message", sig)


def test_a_public_key_file_with_an_altered_key_id_is_refused(tmp_path):
  _, pub_path = keys.write_keypair(keys.generate("owner"), tmp_path)
  doc = json.loads(pub_path.read_text())
  doc["key_id"] = "0" * 64
  pub_path.write_text(json.dumps(doc))
  with pytest.raises(KeyFileError, match="does not match"):
    keys.load_public_key(pub_path)


@pytest.mark.parametrize(
  "body", ["not json", json.dumps({"type": "rsa"}), json.dumps({"type": "ed25519"})]
)
def test_malformed_key_files_raise_key_file_error(tmp_path, body):
  path = tmp_path / "bad.pub"
  path.write_text(body)
  with pytest.raises(KeyFileError):
    keys.load_public_key(path)


def test_missing_key_file_is_named(tmp_path):
  with pytest.raises(KeyFileError, match="does not exist"):
    keys.load_public_key(tmp_path / "nope.pub")


@pytest.mark.parametrize("name", ["", "a/b", ".hidden"])
def test_unusable_key_names_are_refused(name):
  with pytest.raises(KeyFileError):
    keys.generate(name)


def test_trust_store_knows_only_its_keys(tmp_path):
  a, b = keys.generate("a"), keys.generate("b")
  _, pub_a = keys.write_keypair(a, tmp_path)
  trust = keys.TrustStore.from_paths([pub_a])
  assert a.key_id in trust and b.key_id not in trust
  assert trust.get(a.key_id) == a.public
  assert trust.by_name("a") == a.public
  with pytest.raises(SignatureError, match="not in the trust store"):
    trust.get(b.key_id)
  with pytest.raises(SignatureError, match="no trusted key named"):
    trust.by_name("b")
