"""Admission: only credentialed, untampered examples reach a batch, with namespaced device-ready labels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aqgov.credentials import _admission as adm
from aqgov.credentials import _manifest as credentials
from aqgov.credentials._admission import Admission, Rejection, RejectReason
from aqgov.credentials._loader import governed_batches
from aqgov.credentials._manifest import Example
from aqgov.credentials._taxonomy import LabelSpace
from aqgov.documents import _keys as keys
from aqgov.documents import _signing as signing
from aqgov.errors import AdmissionError, CredentialError
from aqgov.examples import sample as sample

ACME = keys.SigningKey("acme-data", bytes(range(32)))
EU = keys.SigningKey("eu-office", bytes(range(1, 33)))
MALLORY = keys.SigningKey(
  "acme-data", bytes(range(5, 37))
)  # claims acme's name, but is not trusted
TAXES = sample.taxonomies()
TRUST = keys.TrustStore.of([ACME, EU])
EXAMPLES = sample.examples()[:40]
ACME_MANIFEST = credentials.issue_manifest(ACME, TAXES["acme-data"], EXAMPLES)
EU_MANIFEST = credentials.issue_manifest(EU, TAXES["eu-office"], EXAMPLES, skip_unlabelled=True)
BOTH = [e for e in EXAMPLES if e.id in EU_MANIFEST]
ACME_ONLY = [e for e in EXAMPLES if e.id not in EU_MANIFEST]


def stranger(i: int = 0) -> Example:
  return Example(f"stranger-{i}", f"never credentialed {i}".encode(), EXAMPLES[0].labels)


def tampered(ex: Example) -> Example:
  return ex._replace(content=ex.content + b" (edited)")


def forged(manifest: credentials.Manifest) -> credentials.Manifest:
  """The manifest with one entry's labels changed after signing."""
  payload = dict(manifest.document.payload)
  entries = [dict(e) for e in payload["entries"]]
  entries[0]["labels"] = dict(entries[0]["labels"], sensitivity_tier=0)
  return credentials.Manifest(manifest.document._replace(payload=dict(payload, entries=entries)))


def gate(*manifests, **options) -> Admission:
  return Admission(TRUST, manifests or (ACME_MANIFEST, EU_MANIFEST), **options)


def test_credentialed_examples_are_admitted_with_every_authoritys_labels():
  batch = gate().admit(EXAMPLES)
  assert batch.ids == tuple(e.id for e in EXAMPLES)
  assert batch.content == tuple(e.content for e in EXAMPLES)
  assert batch.rejected == ()
  assert batch.credentialed.dtype == bool and batch.credentialed.all()
  expected = LabelSpace.of([TAXES["acme-data"], TAXES["eu-office"]]).encode_numpy(
    [e.labels for e in EXAMPLES]
  )
  assert set(batch.labels) == set(expected)
  for key, arr in batch.labels.items():
    assert isinstance(arr, jax.Array) and arr.dtype == jnp.int32 and arr.shape == (len(EXAMPLES),)
    np.testing.assert_array_equal(arr, expected[key], err_msg=key)


def test_fields_are_namespaced_and_presence_is_per_authority():
  batch = gate().admit(BOTH[:2] + ACME_ONLY[:2])
  assert batch.labels["acme-data.@present"].tolist() == [1, 1, 1, 1]
  assert batch.labels["eu-office.@present"].tolist() == [1, 1, 0, 0]
  assert "eu-office.lawful_basis" in batch.labels and "acme-data.license_class" in batch.labels


def test_admitted_labels_enter_jit():
  batch = gate().admit(EXAMPLES)
  rule = jax.jit(
    lambda lab: (
      (lab["acme-data.sensitivity_tier"] >= 2)
      | ((lab["eu-office.@present"] == 1) & (lab["eu-office.personal_data"] == 0))
    )
  )
  expected = [
    e.labels["acme-data"]["sensitivity_tier"] >= 2
    or e.labels.get("eu-office", {}).get("personal_data") == "yes"
    for e in EXAMPLES
  ]
  assert rule(batch.labels).tolist() == expected


def test_a_content_hash_mismatch_is_refused_with_a_typed_error():
  with pytest.raises(AdmissionError) as err:
    gate().admit([EXAMPLES[0], tampered(EXAMPLES[3])])
  assert err.value.reason == RejectReason.CONTENT_HASH_MISMATCH
  assert err.value.example_id == EXAMPLES[3].id
  assert EXAMPLES[3].id in str(err.value)


def test_an_example_without_credential_is_refused():
  with pytest.raises(AdmissionError) as err:
    gate().admit([stranger()])
  assert (err.value.example_id, err.value.reason) == ("stranger-0", "no-credential")


def test_an_example_credentialed_only_by_a_forged_manifest_is_refused():
  gate_ = gate(forged(ACME_MANIFEST))
  assert [(m.authority, reason) for m, reason, _ in gate_.problems] == [
    ("acme-data", RejectReason.FORGED_MANIFEST)
  ]
  with pytest.raises(AdmissionError) as err:
    gate_.admit(EXAMPLES[:1])
  assert err.value.reason == "forged-manifest"


def test_an_example_credentialed_only_by_an_untrusted_key_is_refused():
  impostor = credentials.issue_manifest(MALLORY, TAXES["acme-data"], EXAMPLES)
  with pytest.raises(AdmissionError) as err:
    gate(impostor).admit(EXAMPLES[:1])
  assert err.value.reason == "untrusted-key"


def test_a_manifest_signed_by_another_trusted_authority_counts_as_untrusted():
  payload = ACME_MANIFEST.document.payload
  by_eu = credentials.Manifest(
    signing.add_signature(signing.SignedDocument(credentials.KIND, payload), EU)
  )
  assert gate(by_eu).problems[0][1] == RejectReason.UNTRUSTED_KEY


def test_collect_mode_returns_rejections_with_reasons_and_admits_the_rest():
  impostor = credentials.issue_manifest(MALLORY, TAXES["acme-data"], [stranger(2)])
  batch = gate(ACME_MANIFEST, impostor, on_reject="collect").admit(
    [EXAMPLES[0], tampered(EXAMPLES[1]), stranger(1), stranger(2), EXAMPLES[2]]
  )
  assert batch.ids == (EXAMPLES[0].id, EXAMPLES[2].id)
  assert batch.rejected == (
    Rejection(EXAMPLES[1].id, RejectReason.CONTENT_HASH_MISMATCH),
    Rejection("stranger-1", RejectReason.NO_CREDENTIAL),
    Rejection("stranger-2", RejectReason.UNTRUSTED_KEY),
  )
  assert all(len(a) == 2 for a in batch.labels.values())


@given(st.lists(st.sampled_from(["good", "tampered", "stranger"]), max_size=12))
def test_exactly_the_untampered_credentialed_examples_are_admitted(kinds):
  rows, expected_ids, expected_rejections = [], [], []
  for i, kind in enumerate(kinds):
    ex = EXAMPLES[i]
    if kind == "good":
      rows.append(ex)
      expected_ids.append(ex.id)
    elif kind == "tampered":
      rows.append(tampered(ex))
      expected_rejections.append(Rejection(ex.id, RejectReason.CONTENT_HASH_MISMATCH))
    else:
      rows.append(stranger(i))
      expected_rejections.append(Rejection(f"stranger-{i}", RejectReason.NO_CREDENTIAL))
  batch = gate(on_reject="collect").admit(rows)
  assert list(batch.ids) == expected_ids
  assert list(batch.rejected) == expected_rejections
  if expected_rejections:
    with pytest.raises(AdmissionError):
      gate().admit(rows)


def test_uncredentialed_mode_admits_examples_without_credentials_unlabelled():
  batch = gate(admit_uncredentialed=True).admit([EXAMPLES[0], stranger()])
  assert batch.ids == (EXAMPLES[0].id, "stranger-0")
  assert batch.credentialed.tolist() == [True, False]
  assert batch.labels["@credentialed"].tolist() == [1, 0]
  assert batch.labels["acme-data.@present"].tolist() == [1, 0]
  assert batch.labels["acme-data.license_class"][1] == 0


def test_uncredentialed_mode_admits_forged_and_untrusted_credentials_unlabelled():
  batch = gate(forged(ACME_MANIFEST), admit_uncredentialed=True).admit(EXAMPLES[:3])
  assert batch.credentialed.tolist() == [False, False, False]


def test_uncredentialed_mode_never_admits_tampered_bytes():
  with pytest.raises(AdmissionError) as err:
    gate(admit_uncredentialed=True).admit([tampered(EXAMPLES[0])])
  assert err.value.reason == "content-hash-mismatch"
  batch = gate(admit_uncredentialed=True, on_reject="collect").admit([tampered(EXAMPLES[0])])
  assert batch.ids == () and batch.rejected == (
    Rejection(EXAMPLES[0].id, RejectReason.CONTENT_HASH_MISMATCH),
  )


def test_required_authorities_must_have_credentialed_the_example():
  gate_ = gate(require=("eu-office",), on_reject="collect")
  batch = gate_.admit([BOTH[0], ACME_ONLY[0]])
  assert batch.ids == (BOTH[0].id,)
  assert batch.rejected == (Rejection(ACME_ONLY[0].id, RejectReason.MISSING_AUTHORITY),)
  uncredentialed = gate(require=("eu-office",), admit_uncredentialed=True).admit([ACME_ONLY[0]])
  assert uncredentialed.credentialed.tolist() == [False]


def test_requiring_an_authority_without_a_verified_manifest_is_refused():
  with pytest.raises(CredentialError, match="required authorities \\['model-owner'\\]"):
    gate(require=("model-owner",))


def test_a_tampered_example_is_refused_even_if_another_authority_matches():
  eu_only = credentials.issue_manifest(EU, TAXES["eu-office"], [BOTH[0]], skip_unlabelled=True)
  other = tampered(BOTH[0])
  resigned_acme = credentials.issue_manifest(ACME, TAXES["acme-data"], [other])
  with pytest.raises(AdmissionError, match="altered content"):
    gate(resigned_acme, eu_only).admit([other])


def test_manifests_of_one_authority_over_different_shards_combine():
  first = credentials.issue_manifest(ACME, TAXES["acme-data"], EXAMPLES[:20])
  second = credentials.issue_manifest(ACME, TAXES["acme-data"], EXAMPLES[15:])
  assert gate(first, second).admit(EXAMPLES).ids == tuple(e.id for e in EXAMPLES)


def test_conflicting_credentials_from_one_authority_are_refused():
  ex = EXAMPLES[0]
  acme = ex.labels["acme-data"]
  relabelled = ex._replace(
    labels={"acme-data": dict(acme, sensitivity_tier=(acme["sensitivity_tier"] + 1) % 4)}
  )
  other = credentials.issue_manifest(ACME, TAXES["acme-data"], [relabelled])
  with pytest.raises(CredentialError, match=f"credential example '{ex.id}' differently"):
    gate(ACME_MANIFEST, other)


def test_a_given_label_space_fixes_the_keys_and_must_match_the_manifests():
  space = LabelSpace.of([TAXES["eu-office"], TAXES["acme-data"]])
  batch = gate(label_space=space).admit(EXAMPLES[:2])
  assert list(batch.labels) == space.keys()
  with pytest.raises(CredentialError, match="outside the given label space"):
    gate(label_space=LabelSpace.of(TAXES["acme-data"]))


def test_each_manifest_is_verified_once(monkeypatch):
  calls = []
  real = adm.verify
  monkeypatch.setattr(
    adm, "verify", lambda *a, **k: calls.append(a[1].payload["authority"]) or real(*a, **k)
  )
  gate_ = gate()
  for _ in range(3):
    gate_.admit(EXAMPLES)
  assert sorted(calls) == ["acme-data", "eu-office"]


def test_admit_accepts_jsonl_shaped_records_and_the_one_shot_function():
  records = [{"id": e.id, "content": e.content.decode()} for e in EXAMPLES[:3]]
  batch = adm.admit(records, TRUST, [ACME_MANIFEST])
  assert batch.ids == tuple(e.id for e in EXAMPLES[:3])


def test_transform_outputs_are_stacked_on_a_batch_axis():
  def transform(ex: Example):
    tokens = np.frombuffer(ex.content[:16].ljust(16, b" "), dtype=np.uint8)
    return {"tokens": tokens, "length": np.int32(len(ex.content))}

  batch = gate().admit(EXAMPLES[:5], transform=transform)
  assert batch.inputs["tokens"].shape == (5, 16) and batch.inputs["tokens"].dtype == np.uint8
  assert batch.inputs["length"].tolist() == [len(e.content) for e in EXAMPLES[:5]]


# --- loader adapter -------------------------------------------------------------------------------


def test_governed_batches_fill_each_batch_with_admitted_examples():
  rows = list(EXAMPLES[:10])
  rows.insert(3, stranger())
  batches = list(governed_batches(rows, gate(on_reject="collect"), 4))
  assert [len(b.ids) for b in batches] == [4, 4, 2]
  assert batches[0].rejected == (Rejection("stranger-0", RejectReason.NO_CREDENTIAL),)
  assert [i for b in batches for i in b.ids] == [e.id for e in EXAMPLES[:10]]


def test_governed_batches_can_drop_the_remainder():
  batches = list(governed_batches(EXAMPLES[:10], gate(), 4, drop_remainder=True))
  assert [len(b.ids) for b in batches] == [4, 4]
  assert all(a.shape == (4,) for b in batches for a in b.labels.values())


def test_governed_batches_raise_at_the_first_rejection_by_default():
  stream = governed_batches([EXAMPLES[0], tampered(EXAMPLES[1])], gate(), 1)
  assert next(stream).ids == (EXAMPLES[0].id,)
  with pytest.raises(AdmissionError, match=EXAMPLES[1].id):
    next(stream)


def test_governed_batches_apply_the_transform():
  batches = list(
    governed_batches(EXAMPLES[:6], gate(), 3, transform=lambda ex: np.float32(len(ex.content)))
  )
  assert [b.inputs.shape for b in batches] == [(3,), (3,)]


def test_governed_batches_refuse_a_non_positive_batch_size():
  with pytest.raises(ValueError, match="batch_size"):
    next(governed_batches(EXAMPLES, gate(), 0))


def test_governed_batches_read_a_grain_map_dataset():
  grain = pytest.importorskip(
    "grain", reason="grain is an optional extra (pip install 'aqgov[grain]')"
  )
  records = [{"id": e.id, "content": e.content.decode()} for e in EXAMPLES[:12]]
  dataset = grain.MapDataset.source(records).filter(lambda r: int(r["id"][-1]) % 2 == 0)
  batches = list(governed_batches(dataset, gate(), 4))
  kept = [r["id"] for r in records if int(r["id"][-1]) % 2 == 0]
  assert [i for b in batches for i in b.ids] == kept
  assert [len(b.ids) for b in batches] == [4, 2]
