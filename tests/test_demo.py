"""The main job: `aqgov demo` runs end to end on the embedded sample data."""

import stat

from click.testing import CliRunner

from aqgov.cli import main


def test_demo_leaves_public_keys_manifests_and_policies(tmp_path):
  out = tmp_path / "run"
  result = CliRunner().invoke(main, ["demo", "--out", str(out), "--steps", "3"])
  assert result.exit_code == 0, result.output
  assert {p.name for p in (out / "keys").glob("*.pub")} == {"acme-data.pub", "eu-office.pub", "run.pub"}
  for key in (out / "keys" / "private").glob("*.key"):
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
  assert "ex-0007: content-hash-mismatch" in result.output
  assert "web-0: no-credential" in result.output
  assert "acme-routing:default|eu-office:default" in result.output


def test_demo_refuses_a_directory_that_is_not_empty(tmp_path):
  (tmp_path / "something").write_text("x")
  result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path)])
  assert result.exit_code != 0
  assert "not empty" in result.output
