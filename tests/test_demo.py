"""The main job: `aqgov demo` runs a governed, recorded training run on the embedded sample data."""

import json
import stat

import pytest
from click.testing import CliRunner

from aqgov.cli import main


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo") / "run"
  result = CliRunner().invoke(main, ["demo", "--out", str(out), "--steps", "12"])
  assert result.exit_code == 0, result.output
  return out, result.output


def test_demo_leaves_the_public_keys_others_need(demo_run):
  out, _ = demo_run
  assert {p.name for p in (out / "keys").glob("*.pub")} == {"acme-data.pub", "eu-office.pub", "run.pub"}
  private = list((out / "keys").glob("*.key")) + list((out / "authorities" / "keys").glob("*.key"))
  assert len(private) == 3
  assert all(stat.S_IMODE(k.stat().st_mode) == 0o600 for k in private)


def test_demo_refuses_altered_and_uncredentialed_examples(demo_run):
  _, output = demo_run
  assert "ex-0007: content-hash-mismatch" in output
  assert "web-0: no-credential" in output and "web-1: no-credential" in output


def test_demo_reports_which_route_classes_reached_each_group(demo_run):
  _, output = demo_run
  assert "acme-routing:default|eu-office:default" in output
  assert "embed was shaped by: acme-routing:default|eu-office:default" in output
  assert "adapter was shaped by: acme-routing:rule2|" in output


def test_demo_lineage_verifies_and_exports_with_the_public_keys(demo_run, tmp_path):
  out, _ = demo_run
  pubs = [str(p) for p in sorted((out / "keys").glob("*.pub"))]
  verified = CliRunner().invoke(main, ["lineage", "verify", str(out), "--trust", *pubs])
  assert verified.exit_code == 0, verified.output
  target = tmp_path / "attestation.json"
  exported = CliRunner().invoke(main, ["lineage", "export", str(out), "--intoto", str(target)])
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
