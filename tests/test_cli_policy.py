"""`aqgov policy sign | verify | explain | id`, and the sample policies shipped in the package."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
from click.testing import CliRunner

from aqgov.cli import main
from aqgov.credentials._taxonomy import LabelSpace, Taxonomy
from aqgov.documents._document_type import read
from aqgov.policy._compile import compile_policy
from aqgov.policy._explain import param_shapes
from aqgov.policy._policy import POLICY, Policy

from policy_reference import ACME_TOML, EU_TOML, POLICY_TOML

DATA = Path(str(resources.files("aqgov").joinpath("data")))
SAMPLE_POLICIES = {
  "acme-routing": DATA / "policies" / "acme-routing.toml",
  "eu-office": DATA / "policies" / "eu-office.toml",
}


def run(*args: str):
  return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture()
def workdir(tmp_path):
  for name in ("alice", "bob"):
    assert run("keys", "new", name, "--out", tmp_path / "keys").exit_code == 0
  (tmp_path / "p.toml").write_text(POLICY_TOML)
  (tmp_path / "acme.toml").write_text(ACME_TOML)
  (tmp_path / "eu.toml").write_text(EU_TOML)
  (tmp_path / "shapes.json").write_text(
    json.dumps(
      {
        "embed": {"tokens": [16, 4]},
        "blocks/0/mlp": {"up": [4, 8]},
        "adapter": {"down": [4, 2]},
        "head": {"kernel": [4, 16]},
        "final_norm": {"scale": [4]},
      }
    )
  )
  return tmp_path


def test_sign_writes_a_signed_policy_that_verifies(workdir):
  out = run(
    "policy",
    "sign",
    workdir / "p.toml",
    "--key",
    workdir / "keys/alice.key",
    "--out",
    workdir / "p.signed",
  )
  assert out.exit_code == 0, out.output
  assert Policy.from_toml(POLICY_TOML).id in out.output
  out = run("policy", "verify", workdir / "p.signed", "--trust", workdir / "keys/alice.pub")
  assert out.exit_code == 0 and "ok" in out.output and "alice" in out.output


def test_signing_a_signed_file_adds_a_signer(workdir):
  run(
    "policy",
    "sign",
    workdir / "p.toml",
    "--key",
    workdir / "keys/alice.key",
    "--out",
    workdir / "p.signed",
  )
  run(
    "policy",
    "sign",
    workdir / "p.signed",
    "--key",
    workdir / "keys/bob.key",
    "--out",
    workdir / "p.signed",
  )
  assert read(POLICY, workdir / "p.signed").signers == ("alice", "bob")
  out = run(
    "policy",
    "verify",
    workdir / "p.signed",
    "--trust",
    workdir / "keys/alice.pub",
    "--trust",
    workdir / "keys/bob.pub",
    "--min-signers",
    "2",
  )
  assert out.exit_code == 0 and "2 trusted, 2 required" in out.output


def test_verify_fails_with_too_few_trusted_signers(workdir):
  run(
    "policy",
    "sign",
    workdir / "p.toml",
    "--key",
    workdir / "keys/alice.key",
    "--out",
    workdir / "p.signed",
  )
  out = run(
    "policy",
    "verify",
    workdir / "p.signed",
    "--trust",
    workdir / "keys/alice.pub",
    "--min-signers",
    "2",
  )
  assert out.exit_code == 1 and "needs 2" in out.output


def test_verify_refuses_an_untrusted_signer(workdir):
  run(
    "policy",
    "sign",
    workdir / "p.toml",
    "--key",
    workdir / "keys/alice.key",
    "--out",
    workdir / "p.signed",
  )
  out = run("policy", "verify", workdir / "p.signed", "--trust", workdir / "keys/bob.pub")
  assert out.exit_code == 1 and "SignatureError" in out.output and "untrusted" in out.output


def test_verify_refuses_a_tampered_file(workdir):
  run(
    "policy",
    "sign",
    workdir / "p.toml",
    "--key",
    workdir / "keys/alice.key",
    "--out",
    workdir / "p.signed",
  )
  data = (workdir / "p.signed").read_bytes()
  (workdir / "p.signed").write_bytes(data.replace(b"adapter", b"adaptes"))
  out = run("policy", "verify", workdir / "p.signed", "--trust", workdir / "keys/alice.pub")
  assert out.exit_code == 1 and "error:" in out.output


def test_sign_refuses_an_invalid_policy_without_writing(workdir):
  (workdir / "bad.toml").write_text(
    "name = 'p'\n[groups]\ncore = ['blocks/**']\n[default]\nroute = { core = 2 }\n"
  )
  out = run(
    "policy",
    "sign",
    workdir / "bad.toml",
    "--key",
    workdir / "keys/alice.key",
    "--out",
    workdir / "b.signed",
  )
  assert out.exit_code == 1 and "PolicyError" in out.output and "[0, 1]" in out.output
  assert not (workdir / "b.signed").exists()


def test_id_is_the_same_for_the_toml_and_the_signed_file(workdir):
  run(
    "policy",
    "sign",
    workdir / "p.toml",
    "--key",
    workdir / "keys/alice.key",
    "--out",
    workdir / "p.signed",
  )
  ids = {run("policy", "id", workdir / name).output.strip() for name in ("p.toml", "p.signed")}
  assert ids == {Policy.from_toml(POLICY_TOML).id}


def test_explain_prints_the_class_by_group_table_and_warns_about_uncovered_parameters(workdir):
  out = run(
    "policy",
    "explain",
    workdir / "p.toml",
    "--params",
    workdir / "shapes.json",
    "--taxonomy",
    workdir / "acme.toml",
  )
  assert out.exit_code == 0, out.output
  for text in (
    "acme-routing:rule1",
    "acme-routing:default",
    "acme-routing:uncredentialed",
    "embed",
    "adapter",
    "(uncovered)",
    "final_norm/scale",
    "warning",
  ):
    assert text in out.output


def test_explain_refuses_a_group_that_matches_no_parameter(workdir):
  shapes = json.loads((workdir / "shapes.json").read_text())
  del shapes["adapter"]
  (workdir / "no-adapter.json").write_text(json.dumps(shapes))
  out = run("policy", "explain", workdir / "p.toml", "--params", workdir / "no-adapter.json")
  assert out.exit_code == 1
  assert "group 'adapter' (adapter/**) of policy 'acme-routing' matches no parameter" in out.output


def test_explain_composes_several_policies(workdir):
  out = run(
    "policy",
    "explain",
    SAMPLE_POLICIES["acme-routing"],
    SAMPLE_POLICIES["eu-office"],
    "--params",
    DATA / "params_shapes.json",
    "--taxonomy",
    workdir / "acme.toml",
    "--taxonomy",
    workdir / "eu.toml",
  )
  assert out.exit_code == 0, out.output
  assert "acme-routing:default|eu-office:personal-consent" in out.output
  assert "warning" not in out.output


def test_explain_without_taxonomies_says_conditions_were_not_type_checked(workdir):
  out = run("policy", "explain", workdir / "p.toml", "--params", workdir / "shapes.json")
  assert out.exit_code == 0 and "not type-checked" in out.output


def test_explain_reports_an_ill_typed_condition(workdir):
  (workdir / "bad.toml").write_text(POLICY_TOML.replace("'unknown'", "'mystery'"))
  out = run(
    "policy",
    "explain",
    workdir / "bad.toml",
    "--params",
    workdir / "shapes.json",
    "--taxonomy",
    workdir / "acme.toml",
  )
  assert out.exit_code == 1 and "'mystery' is not a value" in out.output


@pytest.mark.parametrize("name", sorted(SAMPLE_POLICIES))
def test_sample_policies_compile_against_the_sample_model_and_taxonomies(name):
  space = LabelSpace.of([Taxonomy.from_toml(ACME_TOML), Taxonomy.from_toml(EU_TOML)])
  compiled = compile_policy(
    Policy.read(SAMPLE_POLICIES[name]), param_shapes(DATA / "params_shapes.json"), space
  )
  assert (
    compiled.group_names == ("embed", "core", "adapter", "head")
    and compiled.uncovered_leaves() == ()
  )


def test_eu_office_policy_is_restrictive_for_personal_data():
  space = LabelSpace.of([Taxonomy.from_toml(EU_TOML)])
  compiled = compile_policy(
    Policy.read(SAMPLE_POLICIES["eu-office"]), param_shapes(DATA / "params_shapes.json"), space
  )
  labels = space.encode(
    [
      {"eu-office": {"lawful_basis": b, "personal_data": "yes"}}
      for b in ("none", "consent", "contract")
    ]
    + [{"eu-office": {"lawful_basis": "none", "personal_data": "no"}}, {}]
  )
  rows = [dict(zip(compiled.group_names, r)) for r in compiled.group_weights(labels).tolist()]
  assert rows[0] == {"embed": 0.0, "core": 0.0, "adapter": 0.0, "head": 0.0}
  assert rows[1] == {"embed": 0.0, "core": 0.0, "adapter": 1.0, "head": 0.5}
  assert rows[2] == {"embed": 0.0, "core": 0.0, "adapter": 1.0, "head": 0.0}
  assert rows[3] == rows[4] == {"embed": 1.0, "core": 1.0, "adapter": 1.0, "head": 1.0}
