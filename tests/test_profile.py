"""Entropy profiles: TOML and Python forms, canonical id, signing, files, malformed input."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from aqgov.documents import _canonical as canonical
from aqgov.documents import _keys as keys
from aqgov.documents._document_type import load, read, sign, verify, write
from aqgov.documents._files import atomic_write
from aqgov.documents._signing import SignedDocument
from aqgov.entropy._profile import (
  PROFILE,
  Bound,
  EntropyProfile,
  Representation,
)
from aqgov.errors import ProfileError, SignatureError

TOML = """
name = "lab"
description = "attention must not collapse"

[[representation]]
path = "attention/blocks/*"
group = "core"
kind = "attention"
heads = 4
causal = true

[[representation]]
path = "features/**"
group = "head"
kind = "features"

[[bound]]
group = "core"
metric = "attention_entropy"
low = 0.4
action = "reroute"
fallback = 0
duration = 5

[[bound]]
group = "core"
metric = "attention_entropy"
low = 0.1
heads = [2]
steps = [0, 100]
action = "pause"

[[bound]]
group = "head"
metric = "effective_rank"
low = 2
high = 64
action = "escalate"
"""


def python_form() -> EntropyProfile:
  return EntropyProfile(
    name="lab",
    description="attention must not collapse",
    representations=[
      Representation(path="features/**", group="head", kind="features"),
      Representation(
        path="attention/blocks/*", group="core", kind="attention", heads=4, causal=True
      ),
    ],
    bounds=[
      Bound(group="head", metric="effective_rank", low=2.0, high=64.0, action="escalate"),
      Bound(
        group="core", metric="attention_entropy", low=0.1, heads=[2], steps=(0, 100), action="pause"
      ),
      Bound(
        group="core",
        metric="attention_entropy",
        low=0.4,
        action="reroute",
        fallback=0.0,
        duration=5,
      ),
    ],
  )


@pytest.fixture(scope="module")
def authority():
  return keys.generate("safety-team")


def test_toml_and_python_forms_are_the_same_profile():
  assert EntropyProfile.from_toml(TOML) == python_form()
  assert EntropyProfile.from_toml(TOML).id == python_form().id


def test_toml_round_trips():
  profile = EntropyProfile.from_toml(TOML)
  assert EntropyProfile.from_toml(profile.to_toml()) == profile


def test_canonical_dict_round_trips_through_canonical_bytes():
  profile = python_form()
  doc = canonical.decode(canonical.encode(profile.to_dict()))
  assert EntropyProfile.from_dict(doc) == profile


def test_id_is_the_digest_of_the_canonical_form_and_ignores_entry_order():
  profile = python_form()
  assert profile.id == canonical.digest_hex(profile.to_dict())
  reordered = EntropyProfile(
    name="lab",
    description=profile.description,
    representations=profile.representations[::-1],
    bounds=profile.bounds[::-1],
  )
  assert reordered.id == profile.id


def test_id_changes_with_any_bound():
  profile = python_form()
  looser = EntropyProfile(
    name="lab",
    description=profile.description,
    representations=profile.representations,
    bounds=profile.bounds[:-1]
    + (Bound(group="head", metric="effective_rank", low=1.5, high=64.0, action="escalate"),),
  )
  assert looser.id != profile.id


def test_reroute_defaults_are_explicit_in_the_canonical_form():
  bound = Bound(group="core", metric="renyi2", low=0.1, action="reroute")
  assert (bound.fallback, bound.duration) == (0.0, 1)


def test_signed_profile_verifies_and_yields_the_profile(authority):
  signed = sign(PROFILE, python_form(), authority)
  assert signed.kind == "entropy-profile" and signed.id == python_form().id
  assert verify(PROFILE, signed, keys.TrustStore.of([authority])) == python_form()


def test_tampered_profile_fails_verification(authority):
  signed = sign(PROFILE, python_form(), authority)
  payload = dict(signed.payload)
  payload["bounds"] = [dict(b, low=0.0) if b["low"] is not None else b for b in payload["bounds"]]
  with pytest.raises(SignatureError, match="does not verify"):
    verify(PROFILE, signed._replace(payload=payload), keys.TrustStore.of([authority]))


def test_untrusted_or_unsigned_profile_fails_verification(authority):
  stranger = keys.generate("stranger")
  with pytest.raises(SignatureError, match="trusted"):
    verify(PROFILE, sign(PROFILE, python_form(), stranger), keys.TrustStore.of([authority]))
  with pytest.raises(SignatureError, match="no signature"):
    verify(
      PROFILE,
      SignedDocument("entropy-profile", python_form().to_dict()),
      keys.TrustStore.of([authority]),
    )


def test_signed_profile_survives_a_file_round_trip(tmp_path, authority):
  path = write(PROFILE, sign(PROFILE, python_form(), authority), tmp_path / "lab.profile")
  assert verify(PROFILE, read(PROFILE, path), keys.TrustStore.of([authority])) == python_form()
  assert load(PROFILE, path) == python_form()
  assert [p.name for p in tmp_path.iterdir()] == ["lab.profile"]


def test_toml_file_round_trip(tmp_path):
  path = atomic_write(tmp_path / "lab.toml", python_form().to_toml().encode())
  assert EntropyProfile.read(path) == load(PROFILE, path) == python_form()


def test_a_missing_profile_file_is_a_profile_error_saying_so(tmp_path):
  with pytest.raises(ProfileError, match="does not exist"):
    EntropyProfile.read(tmp_path / "absent.toml")


def test_a_signed_document_of_another_kind_is_not_a_profile(tmp_path, authority):
  from aqgov.documents import _signing as signing

  other = signing.add_signature(SignedDocument("routing-policy", {"name": "x"}), authority)
  path = tmp_path / "policy.signed"
  path.write_bytes(other.to_bytes())
  with pytest.raises(SignatureError, match="entropy-profile"):
    read(PROFILE, path)


def test_sample_demo_profile_loads():
  path = Path(str(resources.files("aqgov").joinpath("data", "profiles", "demo-profile.toml")))
  profile = EntropyProfile.read(path)
  assert set(profile.groups) == {"embed", "core", "adapter", "head"}
  assert profile.heads("core") == 4


BASE = TOML[: TOML.rindex("[[bound]]")]


@pytest.mark.parametrize(
  "body, message",
  [
    ('metric = "entropy_of_everything"\nlow = 1\naction = "pause"', "unknown metric"),
    ('metric = "renyi2"\nlow = 0.1\naction = "explode"', "action = 'explode'"),
    ('metric = "renyi2"\nlow = 0.1\nhihg = 3\naction = "pause"', "unknown key(s) ['hihg']"),
    ('metric = "renyi2"\nlow = 0.7\nhigh = 0.5\naction = "pause"', "low 0.7 > high 0.5"),
    (
      'metric = "renyi2"\nlow = 0.1\naction = "pause"\nfallback = 0.5',
      "only apply to action = 'reroute'",
    ),
    ('metric = "renyi2"\nlow = 0.1\naction = "pause"\nheads = [0]', "`heads` only applies"),
    ('metric = "renyi2"\nlow = 0.1\naction = "pause"\nsteps = [5, 5]', "is empty"),
    ('metric = "renyi2"\nlow = "two"\naction = "pause"', "finite number"),
    ('metric = "renyi2"\naction = "pause"', "give `low`, `high` or both"),
    (
      'metric = "renyi2"\nlow = 0.1\naction = "reroute"\nfallback = 2',
      "must be a weight in [0, 1]",
    ),
  ],
)
def test_malformed_bound_is_a_profile_error_naming_where(body, message):
  text = BASE + '[[bound]]\ngroup = "head"\n' + body + "\n"
  with pytest.raises(ProfileError) as info:
    EntropyProfile.from_toml(text)
  assert message in str(info.value)
  assert "[[bound]] #3" in str(info.value)


def test_attention_bound_without_attention_representation_is_a_profile_error():
  with pytest.raises(ProfileError, match="no \\[\\[representation\\]\\] of kind 'attention'"):
    EntropyProfile(
      name="x", bounds=[Bound(group="core", metric="attention_entropy", low=0.1, action="pause")]
    )


def test_head_index_out_of_range_is_a_profile_error():
  with pytest.raises(ProfileError, match="head 4 does not exist"):
    EntropyProfile(
      name="x",
      representations=[Representation(path="a", group="core", kind="attention", heads=4)],
      bounds=[Bound(group="core", metric="attention_entropy", low=0.1, heads=[4], action="pause")],
    )


def test_equally_specific_overlapping_bounds_are_a_profile_error():
  with pytest.raises(ProfileError, match="both set `low`"):
    EntropyProfile(
      name="x",
      bounds=[
        Bound(group="core", metric="gradient_entropy", low=0.1, steps=(0, 10), action="pause"),
        Bound(group="core", metric="gradient_entropy", low=0.2, steps=(5, 20), action="escalate"),
      ],
    )


def test_low_and_high_may_come_from_separate_bounds():
  profile = EntropyProfile(
    name="x",
    bounds=[
      Bound(group="core", metric="gradient_entropy", low=0.1, action="pause"),
      Bound(group="core", metric="gradient_entropy", high=0.9, action="escalate"),
    ],
  )
  assert len(profile.bounds) == 2


def test_attention_representation_needs_heads():
  with pytest.raises(ProfileError, match="heads"):
    Representation(path="attention/*", group="core", kind="attention")


def test_invalid_toml_is_a_profile_error():
  with pytest.raises(ProfileError, match="not valid TOML"):
    EntropyProfile.from_toml("name = 'x'\n[[bound]\n")


def test_profile_without_a_name_is_a_profile_error():
  with pytest.raises(ProfileError, match="name"):
    EntropyProfile.from_toml("description = 'no name'\n")


# --- command line -------------------------------------------------------------------------------


def _cli(*args):
  from click.testing import CliRunner

  from aqgov.cli import main

  return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture()
def keypair(tmp_path):
  return keys.write_keypair(keys.generate("safety"), tmp_path / "keys")


def test_cli_signs_verifies_and_identifies_a_profile(tmp_path, keypair):
  key_path, pub_path = keypair
  source = tmp_path / "lab.toml"
  source.write_text(TOML)
  signed = tmp_path / "lab.profile"
  assert _cli("profile", "sign", source, "--key", key_path, "--out", signed).exit_code == 0
  result = _cli("profile", "verify", signed, "--trust", pub_path)
  assert result.exit_code == 0 and python_form().id in result.output
  assert (
    _cli("profile", "id", source).output.strip()
    == _cli("profile", "id", signed).output.strip()
    == python_form().id
  )


def test_cli_refuses_a_tampered_signed_profile(tmp_path, keypair):
  key_path, pub_path = keypair
  doc = sign(PROFILE, python_form(), keys.load_signing_key(key_path))
  tampered = doc._replace(payload=dict(doc.payload, name="other"))
  path = tmp_path / "bad.profile"
  path.write_bytes(tampered.to_bytes())
  result = _cli("profile", "verify", path, "--trust", pub_path)
  assert result.exit_code == 1 and "does not verify" in result.output


def test_cli_issues_an_override_that_verifies_for_its_run_only(tmp_path, keypair):
  from aqgov.entropy._overrides import OVERRIDE, admit_override

  key_path, pub_path = keypair
  out = tmp_path / "t.override"
  result = _cli(
    "override",
    "issue",
    "--key",
    key_path,
    "--run",
    "RUN1",
    "--steps",
    "10-20",
    "--groups",
    "core",
    "--metrics",
    "attention_entropy",
    "--reason",
    "warm-up dip",
    "--expires",
    "2999-01-01T00:00:00Z",
    "--out",
    out,
  )
  assert result.exit_code == 0, result.output
  o = admit_override(read(OVERRIDE, out), keys.TrustStore.from_paths([pub_path]), "RUN1")
  assert o.steps == ((10, 21),) and o.groups == ("core",) and o.metrics == ("attention_entropy",)
  assert _cli("override", "verify", out, "--trust", pub_path, "--run", "RUN1").exit_code == 0
  refused = _cli("override", "verify", out, "--trust", pub_path, "--run", "RUN2")
  assert refused.exit_code == 1 and "not 'RUN2'" in refused.output
