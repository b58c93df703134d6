"""Routing policies: forms, validation, canonical ids, signing, files, composition, rule order."""

from __future__ import annotations

import dataclasses
import os
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aqgov.documents import _keys as keys
from aqgov.documents._document_type import load, read, sign, verify, write
from aqgov.documents._keys import TrustStore
from aqgov.documents._signing import SignedDocument
from aqgov.errors import AqgovError, PolicyError, SignatureError
from aqgov.policy._compile import compile_policy
from aqgov.policy._policy import (
  POLICY,
  Policy,
  PolicySet,
  Rule,
  compose,
)

from policy_reference import GROUPS, POLICY_TOML, SPACE, batches, leaf_weight, policies

PARAMS = {g: {"w": np.zeros((2,), np.float32)} for g in GROUPS}
MODEL = {k: {"w": np.zeros((2,), np.float32)} for k in ("embed", "blocks", "adapter", "head")}
ALICE, BOB = keys.generate("alice"), keys.generate("bob")


def python_policy() -> Policy:
  return Policy(
    name="acme-routing",
    groups={
      "embed": ["embed/**"],
      "core": ["blocks/**"],
      "adapter": ["adapter/**"],
      "head": ["head/**"],
    },
    rules=[
      Rule(when="license_class == 'unknown'", route={}),
      Rule(when="sensitivity_tier >= 2 or 'EU' in jurisdictions", route={"adapter": 1.0}),
    ],
    default={"embed": 1.0, "core": 1.0, "head": 1.0},
  )


def acme(**labels):
  base = {"license_class": "cc-by", "sensitivity_tier": 0, "jurisdictions": [], "source": "wiki"}
  return {"acme-data": {**base, **labels}}


# -- forms and ids ------------------------------------------------------------------------------


def test_toml_and_python_forms_are_equal_with_the_same_id():
  toml = Policy.from_toml(POLICY_TOML)
  assert toml == python_policy()
  assert toml.id == python_policy().id


def test_create_is_the_python_form():
  p = python_policy()
  assert Policy.create(p.name, dict(p.groups), p.rules, p.default) == p


def test_the_id_is_the_sha256_of_the_canonical_form():
  from aqgov.documents import _canonical as canonical

  p = python_policy()
  assert p.id == canonical.digest_hex(p.to_dict()) and len(p.id) == 64


def test_the_id_ignores_spacing_route_key_order_pattern_order_and_zero_weights():
  a = Policy(
    "p",
    {"core": ["blocks/**", "mlp/**"], "head": ["head/**"]},
    [Rule("sensitivity_tier>=2", {"core": 0.5, "head": 1.0})],
    {"head": 1},
  )
  b = Policy(
    "p",
    {"core": ["mlp/**", "blocks/**"], "head": ["head/**"]},
    [Rule("  sensitivity_tier >= 2 ", {"head": 1.0, "core": 0.5})],
    {"head": 1.0, "core": 0.0},
  )
  assert a == b and a.id == b.id


def test_the_id_depends_on_rule_order_and_group_order():
  rules = [
    Rule("sensitivity_tier >= 2", {"core": 1.0}),
    Rule("sensitivity_tier >= 1", {"head": 1.0}),
  ]
  groups = {"core": ["blocks/**"], "head": ["head/**"]}
  base = Policy("p", groups, rules)
  assert Policy("p", groups, rules[::-1]).id != base.id
  assert Policy("p", dict(reversed(list(groups.items()))), rules).id != base.id


def test_the_id_changes_with_any_weight():
  p = python_policy()
  assert dataclasses.replace(p, default={"embed": 1.0, "core": 0.5, "head": 1.0}).id != p.id


@given(policies())
def test_canonical_dict_and_toml_round_trip(policy):
  assert Policy.from_dict(policy.to_dict()) == policy
  assert Policy.from_toml(policy.to_toml()) == policy
  assert Policy.from_toml(policy.to_toml()).id == policy.id


def test_policies_pickle():
  p = python_policy()
  assert pickle.loads(pickle.dumps(p)) == p


def test_class_names_are_rules_then_default_then_uncredentialed():
  p = Policy("p", {"core": ["blocks/**"]}, [Rule("true", {}, name="all"), Rule("false", {})])
  assert p.class_names == ("all", "rule2", "default", "uncredentialed")


def test_group_of_path_is_the_first_matching_group():
  p = Policy("p", {"first": ["blocks/0/**"], "rest": ["blocks/**"]})
  assert p.group_of_path("blocks/0/kernel") == "first"
  assert p.group_of_path("blocks/1/kernel") == "rest"
  assert p.group_of_path("head/kernel") is None


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"rules": [Rule("true", {"core": 1.5})]}, "weights lie in [0, 1]"),
    ({"rules": [Rule("true", {"core": -0.1})]}, "weights lie in [0, 1]"),
    ({"rules": [Rule("true", {"core": True})]}, "write a number in [0, 1]"),
    ({"rules": [Rule("true", {"core": float("nan")})]}, "weights lie in [0, 1]"),
    ({"rules": [Rule("true", {"cor": 1.0})]}, "group 'cor', which is not declared"),
    ({"default": {"heads": 1.0}}, "default.route"),
    ({"uncredentialed": {"x": 1.0}}, "uncredentialed.route"),
    ({"groups": {"core": ["blocks//x"]}}, "malformed"),
    ({"groups": {"core": ["blocks/a**"]}}, "whole segment"),
    ({"groups": {"core": []}}, "non-empty list of glob patterns"),
    ({"groups": {}}, "at least one group"),
    ({"groups": {"bad name": ["x/**"]}}, "group name"),
    ({"rules": [Rule("sensitivity_tier >=", {})]}, "rules[0]"),
    ({"rules": [Rule("true", {}, "a"), Rule("false", {}, "a")]}, "unique"),
    ({"rules": [Rule("true", {}, "default")]}, "reserved"),
    ({"uncovered": 2.0}, "weights lie in [0, 1]"),
  ],
)
def test_invalid_policies_raise_policy_errors_saying_where_and_what_to_do(kwargs, message):
  args = {"name": "p", "groups": {"core": ["blocks/**"]}, **kwargs}
  with pytest.raises(PolicyError) as info:
    Policy(**args)
  assert message in str(info.value)


@pytest.mark.parametrize(
  "text, message",
  [
    ("name = 'p'\n[groups]\ncore = ['x/**']\n[defaults]\nroute = {}", "unknown top-level key"),
    ("[groups]\ncore = ['x/**']", "top-level name"),
    ("name = 'p'\n[groups]\ncore = ['x/**']\n[[rules]]\nroute = {}", "missing 'when"),
    ("name = 'p'\n[groups]\ncore = ['x/**']\n[[rules]]\nwhen = 'true'\nroutes = {}", "unknown key"),
    ("name = 'p'\n[groups]\ncore = ['x/**']\n[default]\nroute = {}\nweight = 1", "only 'route"),
    ("name = 'p'\n[groups\n", "not valid TOML"),
  ],
)
def test_invalid_toml_raises_policy_errors(text, message):
  with pytest.raises(PolicyError, match=message):
    Policy.from_toml(text)


def test_read_reads_a_path(tmp_path):
  path = tmp_path / "p.toml"
  path.write_text(POLICY_TOML)
  assert Policy.read(path) == Policy.read(str(path)) == python_policy()


def test_a_missing_policy_file_is_a_policy_error_saying_so():
  with pytest.raises(PolicyError, match="does not exist"):
    Policy.read("no/such/policy.toml")


def test_from_toml_takes_only_text(tmp_path):
  with pytest.raises(PolicyError, match="Policy.read"):
    Policy.from_toml(tmp_path / "p.toml")


# -- signing and files -----------------------------------------------------------------------------


def test_signed_policy_verifies_to_the_same_policy():
  signed = sign(POLICY, python_policy(), ALICE)
  assert signed.kind == "routing-policy" and signed.id == python_policy().id
  assert verify(POLICY, signed, TrustStore.of([ALICE])) == python_policy()


def test_an_untrusted_signer_is_refused():
  signed = sign(POLICY, python_policy(), ALICE)
  with pytest.raises(SignatureError, match="untrusted"):
    verify(POLICY, signed, TrustStore.of([BOB]))


def test_an_unsigned_policy_is_refused():
  with pytest.raises(SignatureError, match="no signature"):
    verify(
      POLICY, SignedDocument("routing-policy", python_policy().to_dict()), TrustStore.of([ALICE])
    )


def test_re_signing_adds_a_signer_and_min_signers_counts_them():
  once = sign(POLICY, python_policy(), ALICE)
  twice = sign(POLICY, once, BOB)
  assert twice.signers == ("alice", "bob") and twice.id == once.id
  verify(POLICY, twice, TrustStore.of([ALICE, BOB]), min_signers=2)
  with pytest.raises(SignatureError, match="needs 2"):
    verify(POLICY, once, TrustStore.of([ALICE, BOB]), min_signers=2)
  assert sign(POLICY, twice, ALICE).signers == ("bob", "alice")


def test_a_signed_payload_that_is_not_in_normal_form_is_refused():
  payload = python_policy().to_dict()
  payload["rules"][0]["when"] = "license_class=='unknown'"
  with pytest.raises(PolicyError, match="normal form"):
    verify(
      POLICY, sign(POLICY, SignedDocument("routing-policy", payload), ALICE), TrustStore.of([ALICE])
    )


def test_a_signed_document_of_another_kind_is_not_a_policy():
  other = SignedDocument("entropy-profile", python_policy().to_dict())
  with pytest.raises(PolicyError):
    verify(POLICY, other, TrustStore.of([ALICE]))


SIGNED_BYTES = sign(POLICY, python_policy(), ALICE).to_bytes()


@settings(max_examples=60)
@given(st.integers(0, len(SIGNED_BYTES) - 1), st.integers(1, 255))
def test_any_flipped_byte_of_a_signed_policy_fails_verification(index, flip):
  data = bytearray(SIGNED_BYTES)
  data[index] ^= flip
  with pytest.raises(AqgovError):
    verify(
      POLICY, SignedDocument.from_bytes(bytes(data), kind="routing-policy"), TrustStore.of([ALICE])
    )


def test_signed_policy_files_round_trip_and_leave_no_temporary_files(tmp_path):
  path = tmp_path / "sub" / "p.signed"
  write(POLICY, sign(POLICY, python_policy(), ALICE), path)
  assert os.listdir(path.parent) == ["p.signed"]
  assert verify(POLICY, read(POLICY, path), TrustStore.of([ALICE])) == python_policy()


def test_read_policy_reads_toml_and_signed_files_to_the_same_policy(tmp_path):
  (tmp_path / "p.toml").write_text(POLICY_TOML)
  write(POLICY, sign(POLICY, python_policy(), ALICE), tmp_path / "p.signed")
  assert (
    load(POLICY, tmp_path / "p.toml").id
    == load(POLICY, tmp_path / "p.signed").id
    == python_policy().id
  )


def test_reading_garbage_as_a_policy_raises_a_policy_error(tmp_path):
  (tmp_path / "junk").write_bytes(b"\x93\xff\x00")
  with pytest.raises(PolicyError):
    load(POLICY, tmp_path / "junk")
  with pytest.raises(PolicyError):
    load(POLICY, tmp_path / "missing")


# -- composition -----------------------------------------------------------------------------------


def test_composition_id_is_order_independent_and_duplicates_count_once():
  a, b = python_policy(), Policy("other", {"core": ["blocks/**"]}, default={"core": 0.5})
  assert compose([a, b]).id == compose([b, a]).id
  assert compose([a, a, b]).policies == (a, b)


def test_a_group_name_with_different_patterns_in_two_policies_is_refused():
  a = Policy("a", {"core": ["blocks/**"]})
  b = Policy("b", {"core": ["blocks/0/**"]})
  with pytest.raises(PolicyError, match="rename one of them"):
    compose([a, b])


def test_two_different_policies_with_one_name_are_refused():
  with pytest.raises(PolicyError, match="both named"):
    compose([Policy("a", {"core": ["x/**"]}), Policy("a", {"head": ["y/**"]})])


def test_compose_accepts_a_single_policy_and_a_policy_set():
  p = python_policy()
  assert compose(p) == compose(PolicySet((p,))) == PolicySet((p,))


@given(policies(name="a"), policies(name="b"), batches)
def test_composition_is_the_elementwise_minimum_most_restrictive_wins(a, b, examples):
  labels = SPACE.encode(examples)
  both = np.asarray(compile_policy([a, b], PARAMS, SPACE).group_weights(labels))
  only_a = np.asarray(compile_policy(a, PARAMS, SPACE).group_weights(labels))
  only_b = np.asarray(compile_policy(b, PARAMS, SPACE).group_weights(labels))
  assert np.array_equal(both, np.minimum(only_a, only_b))
  for i, ex in enumerate(examples):
    assert both[i].tolist() == [leaf_weight([a, b], f"{g}/w", ex) for g in GROUPS]


# -- rule order, default and uncredentialed routes -----------------------------------------------------


def weights_of(policy, examples):
  c = compile_policy(policy, MODEL, SPACE)
  w = np.asarray(c.group_weights(SPACE.encode(examples)))
  return [dict(zip(c.group_names, row.tolist())) for row in w]


def test_the_first_matching_rule_wins():
  # license 'unknown' matches rule 1 even though tier 3 would also match rule 2
  w = weights_of(
    python_policy(), [acme(license_class="unknown", sensitivity_tier=3), acme(sensitivity_tier=3)]
  )
  assert w[0] == {"embed": 0.0, "core": 0.0, "adapter": 0.0, "head": 0.0}
  assert w[1] == {"embed": 0.0, "core": 0.0, "adapter": 1.0, "head": 0.0}


def test_an_example_no_rule_matches_takes_the_default_route():
  (w,) = weights_of(python_policy(), [acme()])
  assert w == {"embed": 1.0, "core": 1.0, "adapter": 0.0, "head": 1.0}


def test_the_default_route_defaults_to_excluded_everywhere():
  (w,) = weights_of(dataclasses.replace(python_policy(), default={}), [acme()])
  assert set(w.values()) == {0.0}


def test_uncredentialed_examples_are_excluded_everywhere_by_default():
  (w,) = weights_of(python_policy(), [None])
  assert set(w.values()) == {0.0}


def test_uncredentialed_examples_take_the_uncredentialed_route_when_given():
  (w,) = weights_of(dataclasses.replace(python_policy(), uncredentialed={"adapter": 0.25}), [None])
  assert w == {"embed": 0.0, "core": 0.0, "adapter": 0.25, "head": 0.0}


# -- signer roles ----------------------------------------------------------------------------------


def test_a_run_key_never_verifies_as_a_policy_signer():
  for run_key in (keys.generate("run"), keys.generate("trainer", roles=("run",))):
    with pytest.raises(SignatureError, match="only authority or governance keys"):
      verify(POLICY, sign(POLICY, python_policy(), run_key), TrustStore.of([run_key]))


def test_a_governance_key_may_sign_a_policy():
  steward = keys.generate("steward", roles=("governance",))
  assert (
    verify(POLICY, sign(POLICY, python_policy(), steward), TrustStore.of([steward]))
    == python_policy()
  )


def test_roles_are_kept_in_key_files(tmp_path):
  _, pub = keys.write_keypair(keys.generate("runner", roles=("run",)), tmp_path)
  assert keys.load_public_key(pub).roles == ("run",)
  assert keys.load_signing_key(tmp_path / "runner.key").roles == ("run",)
  assert TrustStore.from_paths([pub]).roles(keys.load_public_key(pub).key_id) == ("run",)
