"""Credential manifests: issue, verify, prove entries, and refuse anything altered."""

from __future__ import annotations

import base64
import json
import os

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from aqgov.cli import main
from aqgov.credentials import _manifest as credentials
from aqgov.credentials._manifest import MANIFEST, Example, InclusionProof, Manifest, check_examples
from aqgov.credentials._taxonomy import Taxonomy
from aqgov.documents import _keys as keys
from aqgov.documents import _merkle as merkle
from aqgov.documents import _signing as signing
from aqgov.documents._document_type import read, verify, write
from aqgov.errors import CredentialError
from aqgov.examples import sample as sample

ACME = keys.SigningKey("acme-data", bytes(range(32)))
EU = keys.SigningKey("eu-office", bytes(range(1, 33)))
TAXONOMIES = sample.taxonomies()
TRUST = keys.TrustStore.of([ACME, EU])


def verified(manifest: Manifest, trust: keys.TrustStore, examples_to_check=None) -> tuple[str, ...]:
  """Verify the manifest (and, given examples, their hashes); the names of its trusted signers."""
  verify(MANIFEST, manifest.document, trust)
  if examples_to_check is not None:
    check_examples(manifest, examples_to_check)
  return tuple(s.signer for s in manifest.document.signatures if s.key_id in trust)


def acme_labels(i: int) -> dict:
  return {
    "license_class": ["cc-by", "proprietary", "unknown"][i % 3],
    "sensitivity_tier": i % 4,
    "jurisdictions": [["EU"], ["US"], ["UK", "EU"]][i % 3],
    "source": f"src-{i % 2}",
  }


def examples(n: int = 9) -> list[Example]:
  return [Example(f"ex-{i}", f"example text number {i}".encode(), acme_labels(i)) for i in range(n)]


def issue(n: int = 9):
  return credentials.issue_manifest(ACME, TAXONOMIES["acme-data"], examples(n))


def write_jsonl(path, rows) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def flip(data: bytes, pos: int, mask: int) -> bytes:
  out = bytearray(data)
  out[pos] ^= mask
  return bytes(out)


# --- issue and verify -----------------------------------------------------------------------------


def test_an_issued_manifest_verifies_with_its_examples():
  manifest = issue()
  assert verified(manifest, TRUST, examples()) == ("acme-data",)
  assert manifest.size == 9 and manifest.authority == "acme-data"
  assert (
    manifest.taxonomy == TAXONOMIES["acme-data"]
    and manifest.taxonomy_id == TAXONOMIES["acme-data"].id
  )


def test_entries_bind_id_content_hash_and_labels():
  entry = issue().entry("ex-4")
  assert entry.sha256 == credentials.content_hash(b"example text number 4")
  assert entry.labels == acme_labels(4)


def test_flag_labels_are_stored_once_each_in_taxonomy_order():
  ex = Example("x", b"x", dict(acme_labels(0), jurisdictions=["UK", "EU", "UK"]))
  manifest = credentials.issue_manifest(ACME, TAXONOMIES["acme-data"], [ex])
  assert manifest.entry("x").labels["jurisdictions"] == ["EU", "UK"]


def test_manifest_bytes_do_not_depend_on_example_order():
  shuffled = examples()[::-1]
  assert (
    credentials.issue_manifest(ACME, TAXONOMIES["acme-data"], shuffled).to_bytes()
    == issue().to_bytes()
  )


def test_file_round_trip_preserves_the_manifest(tmp_path):
  path = write(MANIFEST, issue().document, tmp_path / "sub" / "acme.manifest")
  back = Manifest(read(MANIFEST, path))
  assert back.to_bytes() == issue().to_bytes()
  verified(back, TRUST, examples())
  assert os.listdir(path.parent) == ["acme.manifest"]


def test_writing_replaces_an_existing_manifest_whole(tmp_path):
  path = tmp_path / "m.manifest"
  write(MANIFEST, issue(20).document, path)
  write(MANIFEST, issue(3).document, path)
  assert Manifest(read(MANIFEST, path)).size == 3
  assert os.listdir(tmp_path) == ["m.manifest"]


def test_issuing_key_must_carry_the_authority_name():
  with pytest.raises(CredentialError, match="aqgov keys new acme-data"):
    credentials.issue_manifest(EU, TAXONOMIES["acme-data"], examples())


def test_issuing_refuses_duplicate_ids_and_invalid_labels():
  with pytest.raises(CredentialError, match="'ex-0' appears twice"):
    credentials.issue_manifest(ACME, TAXONOMIES["acme-data"], examples() + examples(1))
  bad = Example("ex-bad", b"x", dict(acme_labels(0), sensitivity_tier=9))
  with pytest.raises(CredentialError, match=r"'ex-bad'.*acme-data.sensitivity_tier = 9.*\[0, 3\]"):
    credentials.issue_manifest(ACME, TAXONOMIES["acme-data"], [bad])


def test_labels_keyed_by_authority_pick_the_issuers_entry_and_skip_the_rest():
  rows = [
    Example(
      "a",
      b"a",
      {"acme-data": acme_labels(0), "eu-office": {"lawful_basis": "none", "personal_data": "no"}},
    ),
    Example("b", b"b", {"acme-data": acme_labels(1)}),
  ]
  eu = credentials.issue_manifest(EU, TAXONOMIES["eu-office"], rows, skip_unlabelled=True)
  assert [e.id for e in eu.entries] == ["a"]
  with pytest.raises(CredentialError, match="'b' has no labels for 'eu-office'"):
    credentials.issue_manifest(EU, TAXONOMIES["eu-office"], rows)


# --- verification failures ------------------------------------------------------------------------


def test_verify_refuses_an_untrusted_key():
  with pytest.raises(CredentialError, match="untrusted keys: acme-data"):
    verified(issue(), keys.TrustStore.of([EU]))


def test_verify_refuses_a_trusted_key_of_another_authority():
  impostor = keys.SigningKey("eu-office", EU.seed)
  doc = signing.add_signature(
    signing.SignedDocument(credentials.KIND, issue().document.payload), impostor
  )
  with pytest.raises(CredentialError, match="by none named 'acme-data'"):
    verified(credentials.Manifest(doc), TRUST)


def resigned(payload: dict) -> credentials.Manifest:
  return credentials.Manifest(
    signing.add_signature(signing.SignedDocument(credentials.KIND, payload), ACME)
  )


def resigned_with_entries(entries: list[dict]) -> credentials.Manifest:
  """A properly signed manifest whose root and size match `entries`, however wrong they are."""
  root = merkle.root_from_leaf_hashes([credentials.Entry(**e).leaf_hash() for e in entries])
  return resigned(
    dict(issue(3).document.payload, entries=entries, size=len(entries), root=root.hex())
  )


def test_verify_names_a_duplicate_entry_even_when_properly_signed():
  entries = issue(3).document.payload["entries"]
  with pytest.raises(CredentialError, match="entry 'ex-1' appears twice"):
    verified(resigned_with_entries(entries + [entries[1]]), TRUST)


def test_verify_names_an_entry_with_labels_the_taxonomy_refuses():
  entries = [dict(e) for e in issue(3).document.payload["entries"]]
  entries[2]["labels"] = dict(entries[2]["labels"], license_class="gpl")
  with pytest.raises(CredentialError, match="entry 'ex-2' has invalid labels.*'gpl'"):
    verified(resigned_with_entries(entries), TRUST)


def test_verify_names_an_entry_with_a_malformed_hash():
  entries = [dict(e) for e in issue(3).document.payload["entries"]]
  entries[0]["sha256"] = "XYZ"
  with pytest.raises(CredentialError, match="entry 'ex-0' has a malformed sha256"):
    verified(resigned_with_entries(entries), TRUST)


def test_verify_refuses_a_root_that_does_not_match_the_entries():
  payload = dict(issue(3).document.payload, root="00" * 32)
  with pytest.raises(CredentialError, match="Merkle root does not match"):
    verified(resigned(payload), TRUST)


def test_verify_names_an_example_whose_bytes_changed():
  changed = examples()
  changed[5] = changed[5]._replace(content=b"example text number 5, edited")
  with pytest.raises(CredentialError, match="entry 'ex-5' binds content sha256"):
    verified(issue(), TRUST, changed)


def test_verify_names_an_example_missing_from_the_manifest():
  extra = examples() + [Example("ex-new", b"new", acme_labels(0))]
  with pytest.raises(CredentialError, match="example 'ex-new' is missing"):
    verified(issue(), TRUST, extra)


@pytest.fixture(scope="module")
def manifest_bytes() -> bytes:
  return issue(5).to_bytes()


def refused(data: bytes) -> bool:
  try:
    verified(credentials.Manifest.from_bytes(data), TRUST)
  except CredentialError:
    return True
  return False


@given(st.data())
def test_any_flipped_byte_in_a_manifest_fails_verification(manifest_bytes, data):
  pos = data.draw(st.integers(0, len(manifest_bytes) - 1))
  assert refused(flip(manifest_bytes, pos, data.draw(st.integers(1, 255))))


def test_every_single_bit_flip_of_a_manifest_file_fails_verification(tmp_path, manifest_bytes):
  path = tmp_path / "m.manifest"
  for pos in range(len(manifest_bytes)):
    path.write_bytes(flip(manifest_bytes, pos, 0x80 >> (pos % 8)))
    with pytest.raises(CredentialError):
      verify(MANIFEST, read(MANIFEST, path), TRUST)


def test_truncated_or_foreign_files_are_refused(tmp_path, manifest_bytes):
  path = tmp_path / "m.manifest"
  path.write_bytes(manifest_bytes[:-7])
  with pytest.raises(CredentialError, match="m.manifest"):
    Manifest(read(MANIFEST, path))
  path.write_bytes(
    signing.add_signature(signing.SignedDocument("policy", {"a": 1}), ACME).to_bytes()
  )
  with pytest.raises(CredentialError, match="expected a signed 'credential-manifest'"):
    Manifest(read(MANIFEST, path))
  with pytest.raises(CredentialError, match="does not exist"):
    Manifest(read(MANIFEST, tmp_path / "absent.manifest"))


# --- inclusion proofs -----------------------------------------------------------------------------


@given(st.integers(1, 40), st.data())
def test_every_entry_has_an_inclusion_proof_that_verifies(n, data):
  manifest = issue(n)
  ex_id = f"ex-{data.draw(st.integers(0, n - 1))}"
  proof = manifest.inclusion_proof(ex_id)
  assert credentials.verify_entry(manifest.entry(ex_id), proof, manifest.root, manifest.size)


@given(st.integers(2, 40), st.data())
def test_an_inclusion_proof_fails_for_another_entry_altered_labels_or_altered_path(n, data):
  manifest = issue(n)
  i, j = data.draw(st.lists(st.integers(0, n - 1), min_size=2, max_size=2, unique=True))
  entry, proof = manifest.entry(f"ex-{i}"), manifest.inclusion_proof(f"ex-{i}")
  assert not credentials.verify_entry(
    manifest.entry(f"ex-{j}"), proof, manifest.root, manifest.size
  )
  relabelled = entry._replace(
    labels=dict(entry.labels, sensitivity_tier=(entry.labels["sensitivity_tier"] + 1) % 4)
  )
  assert not credentials.verify_entry(relabelled, proof, manifest.root, manifest.size)
  assert not credentials.verify_entry(
    entry._replace(sha256="0" * 64), proof, manifest.root, manifest.size
  )
  if proof.path:
    k = data.draw(st.integers(0, len(proof.path) - 1))
    path = list(proof.path)
    path[k] = flip(path[k], data.draw(st.integers(0, 31)), data.draw(st.integers(1, 255)))
    assert not credentials.verify_entry(
      entry, InclusionProof(proof.index, tuple(path)), manifest.root, manifest.size
    )


def test_an_inclusion_proof_for_an_unknown_example_is_refused():
  with pytest.raises(CredentialError, match="no entry for example 'nope'"):
    issue().inclusion_proof("nope")


# --- examples files -------------------------------------------------------------------------------


def test_read_examples_decodes_text_and_base64_content(tmp_path):
  path = write_jsonl(
    tmp_path / "e.jsonl",
    [
      {"id": "t", "content": "héllo", "labels": acme_labels(0)},
      {"id": "b", "content_b64": base64.b64encode(b"\x00\xff").decode()},
    ],
  )
  (tmp_path / "e.jsonl").write_text((tmp_path / "e.jsonl").read_text() + "\n\n")
  assert credentials.read_examples(path) == [
    Example("t", "héllo".encode(), acme_labels(0)),
    Example("b", b"\x00\xff", None),
  ]


@pytest.mark.parametrize(
  "line, message",
  [
    ("{not json", "e.jsonl:2: not valid JSON"),
    ('["a"]', "e.jsonl:2: expected a mapping"),
    ('{"content": "x"}', "e.jsonl:2: 'id' must be a non-empty string"),
    ('{"id": "x"}', "e.jsonl:2 \\(id 'x'\\): give exactly one of"),
    ('{"id": "x", "content": "a", "content_b64": "YQ=="}', "exactly one of"),
    ('{"id": "x", "content_b64": "not base64!"}', "not valid base64"),
    ('{"id": "x", "content": 5}', "'content' must be text"),
    ('{"id": "x", "content": "a", "labels": [1]}', "'labels' must be a mapping"),
  ],
)
def test_bad_example_lines_are_named(tmp_path, line, message):
  path = tmp_path / "e.jsonl"
  path.write_text('{"id": "ok", "content": "fine"}\n' + line + "\n")
  with pytest.raises(CredentialError, match=message):
    credentials.read_examples(path)


def test_sample_examples_cover_both_authorities():
  rows = sample.examples()
  assert len(rows) == 240 and len({r.id for r in rows}) == 240
  assert all(credentials.labels_for(r, "acme-data") is not None for r in rows)
  assert 80 < sum(credentials.labels_for(r, "eu-office") is not None for r in rows) < 160


# --- command line ---------------------------------------------------------------------------------


@pytest.fixture
def authority_dir(tmp_path):
  runner = CliRunner()
  for name in ("acme-data", "eu-office", "stranger"):
    assert (
      runner.invoke(main, ["keys", "new", name, "--out", str(tmp_path / "keys")]).exit_code == 0
    )
  return tmp_path


def cli(*args):
  return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_issue_then_verify_round_trip(authority_dir):
  keydir, out = authority_dir / "keys", authority_dir / "acme.manifest"
  result = cli(
    "credentials",
    "issue",
    "--key",
    keydir / "acme-data.key",
    "--taxonomy",
    sample.taxonomy_path("acme-data"),
    "--examples",
    sample.examples_path(),
    "--out",
    out,
  )
  assert result.exit_code == 0, result.output
  assert "240 credential(s)" in result.output
  result = cli(
    "credentials",
    "verify",
    out,
    "--trust",
    keydir / "acme-data.pub",
    "--trust",
    keydir / "eu-office.pub",
    "--examples",
    sample.examples_path(),
  )
  assert result.exit_code == 0, result.output
  assert "signed by acme-data" in result.output and "240 example(s) checked" in result.output


def test_cli_issue_skips_examples_without_the_authoritys_labels(authority_dir):
  keydir, out = authority_dir / "keys", authority_dir / "eu.manifest"
  result = cli(
    "credentials",
    "issue",
    "--key",
    keydir / "eu-office.key",
    "--taxonomy",
    sample.taxonomy_path("eu-office"),
    "--examples",
    sample.examples_path(),
    "--out",
    out,
  )
  assert result.exit_code == 0, result.output
  size = Manifest(read(MANIFEST, out)).size
  assert (
    f"{size} credential(s)" in result.output and f"skipped {240 - size} example(s)" in result.output
  )
  result = cli(
    "credentials",
    "verify",
    out,
    "--trust",
    keydir / "eu-office.pub",
    "--examples",
    sample.examples_path(),
  )
  assert result.exit_code == 0, result.output
  assert f"{size} example(s) checked" in result.output


def test_cli_issue_accepts_flat_labels(authority_dir):
  rows = [{"id": e.id, "content": e.content.decode(), "labels": e.labels} for e in examples(4)]
  path = write_jsonl(authority_dir / "flat.jsonl", rows)
  result = cli(
    "credentials",
    "issue",
    "--key",
    authority_dir / "keys" / "acme-data.key",
    "--taxonomy",
    sample.taxonomy_path("acme-data"),
    "--examples",
    path,
    "--out",
    authority_dir / "m.manifest",
  )
  assert (
    result.exit_code == 0 and "4 credential(s)" in result.output and "skipped" not in result.output
  )


def test_cli_verify_fails_naming_the_altered_example(authority_dir):
  keydir, out = authority_dir / "keys", authority_dir / "acme.manifest"
  cli(
    "credentials",
    "issue",
    "--key",
    keydir / "acme-data.key",
    "--taxonomy",
    sample.taxonomy_path("acme-data"),
    "--examples",
    sample.examples_path(),
    "--out",
    out,
  )
  rows = [json.loads(line) for line in sample.examples_path().read_text().splitlines()]
  rows[17]["content"] += " (edited)"
  path = write_jsonl(authority_dir / "edited.jsonl", rows)
  result = cli(
    "credentials", "verify", out, "--trust", keydir / "acme-data.pub", "--examples", path
  )
  assert result.exit_code == 1
  assert f"entry '{rows[17]['id']}'" in result.output and "altered" in result.output


def test_cli_verify_fails_for_an_untrusted_key_or_a_flipped_byte(authority_dir):
  keydir, out = authority_dir / "keys", authority_dir / "acme.manifest"
  cli(
    "credentials",
    "issue",
    "--key",
    keydir / "acme-data.key",
    "--taxonomy",
    sample.taxonomy_path("acme-data"),
    "--examples",
    sample.examples_path(),
    "--out",
    out,
  )
  result = cli("credentials", "verify", out, "--trust", keydir / "stranger.pub")
  assert result.exit_code == 1 and "CredentialError" in result.output
  data = out.read_bytes()
  out.write_bytes(flip(data, len(data) // 2, 0x01))
  result = cli("credentials", "verify", out, "--trust", keydir / "acme-data.pub")
  assert result.exit_code == 1 and "CredentialError" in result.output


def test_cli_issue_refuses_a_key_of_another_authority(authority_dir):
  result = cli(
    "credentials",
    "issue",
    "--key",
    authority_dir / "keys" / "stranger.key",
    "--taxonomy",
    sample.taxonomy_path("acme-data"),
    "--examples",
    sample.examples_path(),
    "--out",
    authority_dir / "m.manifest",
  )
  assert (
    result.exit_code == 1 and "cannot issue credentials for authority 'acme-data'" in result.output
  )
  assert not (authority_dir / "m.manifest").exists()


def test_sample_paths_name_the_shipped_files():
  eu = Taxonomy.read(sample.taxonomy_path("eu-office"))
  assert [f.name for f in eu.fields] == ["lawful_basis", "personal_data"]
  assert sample.examples_path().name == "examples.jsonl" and sample.examples_path().is_file()
  with pytest.raises(ValueError, match="sample authorities"):
    sample.taxonomy_path("nobody")
