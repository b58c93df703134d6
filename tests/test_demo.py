"""The main job: `aqgov demo` runs a governed, recorded training run on the embedded sample data."""

import json
import re
import stat

import pytest
from click.testing import CliRunner

from aqgov.cli import main
from aqgov.documents._keys import load_public_key


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo") / "run"
  result = CliRunner().invoke(main, ["demo", "--out", str(out), "--steps", "12"])
  assert result.exit_code == 0, result.output
  return out, result.output


def test_demo_leaves_the_public_keys_others_need_and_no_private_key_in_the_run_directory(demo_run):
  out, output = demo_run
  assert {p.name for p in (out / "keys").glob("*.pub")} == {
    "acme-data.pub",
    "eu-office.pub",
    "run.pub",
  }
  assert not [p for p in out.rglob("*") if p.suffix == ".key"]
  keys_dir = out.with_name(out.name + "-keys")
  private = sorted(keys_dir.rglob("*.key"))
  assert [k.name for k in private] == ["acme-data.key", "eu-office.key", "run.key"]
  assert all(stat.S_IMODE(k.stat().st_mode) == 0o600 for k in private)
  assert stat.S_IMODE(keys_dir.stat().st_mode) == 0o700
  assert f"the run key in {keys_dir / 'run'}" in " ".join(output.split())


def test_demo_refuses_altered_and_uncredentialed_examples(demo_run):
  _, output = demo_run
  assert "ex-0007: content-hash-mismatch" in output
  assert "web-0: no-credential" in output and "web-1: no-credential" in output


def test_demo_reports_which_route_classes_reached_each_group(demo_run):
  _, output = demo_run
  assert "acme-routing:default|eu-office:default" in output
  assert "embed was shaped by: acme-routing:default|eu-office:default" in output
  assert "adapter was shaped by: acme-routing:rule2|" in output


def test_demo_lineage_verifies_and_exports_with_keys_from_outside_the_run_directory(
  demo_run, tmp_path
):
  out, output = demo_run
  keys_dir = out.with_name(out.name + "-keys")
  pubs = [str(p) for p in sorted((keys_dir / "authorities" / "keys").glob("*.pub"))]
  run_pub = keys_dir / "run" / "run.pub"
  verified = CliRunner().invoke(
    main, ["lineage", "verify", str(out), "--trust", *pubs, "--run-key", str(run_pub)]
  )
  assert verified.exit_code == 0, verified.output
  assert "warning" not in verified.output
  run_key_id = load_public_key(run_pub).key_id
  assert run_key_id in " ".join(
    output.split()
  )  # printed at the end of training, to hand over out of band
  assert f"trusted key run {run_key_id}: signed" in verified.output
  target = tmp_path / "attestation.json"
  exported = CliRunner().invoke(
    main,
    [
      "lineage",
      "export",
      str(out),
      "--intoto",
      str(target),
      "--key",
      str(keys_dir / "run" / "run.key"),
    ],
  )
  assert exported.exit_code == 0, exported.output
  envelope = json.loads(target.read_text())
  assert envelope["payloadType"] == "application/vnd.in-toto+json"


def test_demo_refuses_a_directory_that_is_not_empty(tmp_path):
  (tmp_path / "something").write_text("x")
  result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path)])
  assert result.exit_code != 0
  assert "not empty" in result.output


def test_demo_ends_with_the_measured_efficacy_claims(demo_run):
  output = " ".join(demo_run[1].split())  # the console wraps long lines
  assert "6. efficacy" in output
  assert "control memorises the canaries: exposure" in output
  assert "adapter ablated: exposure" in output and "vs filtered" in output


def test_demo_records_show_the_frozen_core_got_no_update(demo_run):
  _, output = demo_run
  text = " ".join(output.split())
  claims = re.findall(
    r"core got no update at steps (\d+)-(\d+): its records show effective weight 0 for (\d+) of "
    r"(\d+) policy-admitted examples and its fingerprint (\w+)",
    text,
  )
  assert claims, text
  for _, _, zero, admitted, fingerprint in claims:
    # every example the policy admitted to the core got weight 0 there, and the core stood still
    assert zero == admitted and fingerprint == "unchanged"


def test_the_demo_ends_with_the_table_of_the_governance_claims_it_measured(demo_run):
  output = " ".join(demo_run[1].split())
  assert "governance claims, as measured in this run" in output
  assert "none did" in output  # no sensitive example reached the core
  assert "no witness configured for the demo run" in output
