"""Signed documents: exact-byte signatures, trust, and separation between document kinds."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aqgov.documents import _keys as keys
from aqgov.documents import _signing as signing
from aqgov.documents._signing import SignedDocument
from aqgov.errors import SignatureError

OWNER = keys.SigningKey("owner", bytes(range(32)))
AUDITOR = keys.SigningKey("auditor", bytes(range(1, 33)))
STRANGER = keys.SigningKey("stranger", bytes(range(2, 34)))
TRUST = keys.TrustStore.of([OWNER, AUDITOR])

payloads = st.dictionaries(
  st.text(min_size=1, max_size=6),
  st.integers(-1000, 1000)
  | st.text(max_size=10)
  | st.lists(st.integers(0, 9), max_size=3)
  | st.booleans(),
  max_size=5,
)


def signed(payload, *signers, kind="policy") -> SignedDocument:
  doc = SignedDocument(kind, payload)
  for key in signers:
    doc = signing.add_signature(doc, key)
  return doc


def fails_verification(data: bytes, kind: str, trust=TRUST) -> bool:
  try:
    signing.verify_signatures(SignedDocument.from_bytes(data, kind=kind), trust)
  except SignatureError:
    return True
  return False


@given(payloads)
def test_a_signed_document_round_trips_through_bytes_and_verifies(payload):
  doc = signed(payload, OWNER)
  back = SignedDocument.from_bytes(doc.to_bytes(), kind="policy")
  assert back == doc
  assert signing.verify_signatures(back, TRUST) == ("owner",)


@given(payloads, st.data())
def test_any_flipped_byte_fails_verification(payload, data):
  raw = signed(payload, OWNER).to_bytes()
  pos = data.draw(st.integers(0, len(raw) - 1))
  flipped = bytearray(raw)
  flipped[pos] ^= data.draw(st.integers(1, 255))
  assert fails_verification(bytes(flipped), "policy")


def test_every_single_byte_flip_of_one_document_fails_verification():
  raw = signed({"name": "acme-routing", "rules": [1, 2, 3]}, OWNER).to_bytes()
  for pos in range(len(raw)):
    flipped = bytearray(raw)
    flipped[pos] ^= 0x01
    assert fails_verification(bytes(flipped), "policy"), pos


def test_a_changed_payload_value_fails_verification():
  doc = signed({"weight": 1}, OWNER)
  with pytest.raises(SignatureError, match="does not verify"):
    signing.verify_signatures(doc._replace(payload={"weight": 0}), TRUST)


def test_an_untrusted_key_is_refused():
  doc = signed({"a": 1}, STRANGER)
  with pytest.raises(SignatureError, match="untrusted keys: stranger"):
    signing.verify_signatures(doc, TRUST)


def test_an_unsigned_document_is_refused():
  with pytest.raises(SignatureError, match="carries no signature"):
    signing.verify_signatures(SignedDocument("policy", {"a": 1}), TRUST)


def test_a_signature_for_one_kind_never_verifies_as_another():
  policy = signed({"a": 1}, OWNER, kind="policy")
  as_profile = SignedDocument("entropy-profile", policy.payload, policy.signatures)
  with pytest.raises(SignatureError, match="does not verify"):
    signing.verify_signatures(as_profile, TRUST)


def test_reading_bytes_of_the_wrong_kind_is_refused():
  data = signed({"a": 1}, OWNER, kind="policy").to_bytes()
  with pytest.raises(SignatureError, match="expected a signed 'credential-manifest'"):
    SignedDocument.from_bytes(data, kind="credential-manifest")


def test_a_renamed_signer_is_refused():
  doc = signed({"a": 1}, OWNER)
  renamed = doc._replace(signatures=(doc.signatures[0]._replace(signer="auditor"),))
  with pytest.raises(SignatureError, match="names signer 'auditor'"):
    signing.verify_signatures(renamed, TRUST)


def test_min_signers_counts_only_trusted_valid_signatures():
  doc = signed({"a": 1}, OWNER, STRANGER)
  assert signing.verify_signatures(doc, TRUST) == ("owner",)
  with pytest.raises(SignatureError, match="needs 2"):
    signing.verify_signatures(doc, TRUST, min_signers=2)
  assert sorted(
    signing.verify_signatures(signing.add_signature(doc, AUDITOR), TRUST, min_signers=2)
  ) == ["auditor", "owner"]


def test_signing_again_with_the_same_key_replaces_its_signature_and_keeps_the_id():
  doc = signed({"a": 1}, OWNER)
  again = signing.add_signature(doc, OWNER)
  assert len(again.signatures) == 1
  assert again.id == doc.id == SignedDocument("policy", {"a": 1}).id


def test_pae_follows_dsse_v1():
  assert signing.pae("aqgov/policy", b"xyz") == b"DSSEv1 12 aqgov/policy 3 xyz"


def test_garbage_bytes_are_not_a_signed_document():
  with pytest.raises(SignatureError, match="not a signed aqgov document"):
    SignedDocument.from_bytes(b"\x93\x01\x02\x03")


def test_document_types_are_registered_by_name_and_kind():
  from aqgov.credentials import MANIFEST
  from aqgov.documents import document_type
  from aqgov.entropy import OVERRIDE, PROFILE
  from aqgov.policy import POLICY

  for t in (POLICY, PROFILE, OVERRIDE, MANIFEST):
    assert document_type(t.name) is t and document_type(t.kind) is t
  assert (
    "run"
    not in POLICY.signer_roles
    + PROFILE.signer_roles
    + OVERRIDE.signer_roles
    + MANIFEST.signer_roles
  )
  with pytest.raises(LookupError, match="registered"):
    document_type("no-such-type")


def test_a_trust_store_without_roles_treats_keys_as_authorities_except_the_run_key():
  from aqgov.documents import generate

  owner, run = generate("owner"), generate("run")
  trust = keys.TrustStore.of([owner, run])
  assert trust.roles(owner.key_id) == ("authority",) and trust.roles(run.key_id) == ("run",)
