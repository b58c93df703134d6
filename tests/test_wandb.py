"""The W&B integration against real wandb runs (offline and disabled): metrics at the user's step,
config, artifacts built from an allow-list, process 0 only, and `aqgov wandb check`."""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

wandb = pytest.importorskip("wandb")

from aqgov.cli import main  # noqa: E402
from aqgov.entropy._enforce import ACTION_NAMES, METRICS, Events  # noqa: E402
from aqgov.entropy._profile import Bound, EntropyProfile  # noqa: E402
from aqgov.errors import IntegrationError  # noqa: E402
from aqgov.integrations import _wandb_store as store  # noqa: E402
from aqgov.integrations import wandb as aqwandb  # noqa: E402
from aqgov.lineage._run import GovernedRun  # noqa: E402

import lineage_helpers as lh  # noqa: E402


def _finish(wb) -> Path:
  """Finish `wb` and wait until wandb's service has written its run log to the end (the exit record)."""
  path = Path(wb.dir).parent
  wb.finish()
  deadline = time.monotonic() + 60
  while time.monotonic() < deadline:
    found = sorted(path.glob("*.wandb"))
    if found and any(r.WhichOneof("record_type") == "exit" for r in store.records(found[0])):
      return path
    time.sleep(0.1)
  raise AssertionError(f"wandb did not finish writing {path}")


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
  d = tmp_path / "wandb-dir"
  d.mkdir()
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_DIR", str(d))
  monkeypatch.setenv("WANDB_SILENT", "true")
  monkeypatch.setenv("WANDB_CONSOLE", "off")
  return d


@pytest.fixture(scope="module")
def governed(tmp_path_factory):
  """A closed governed run of the example task, logged to an offline W&B run with `attach`."""
  tmp = tmp_path_factory.mktemp("wb")
  wdir = tmp / "wandb-dir"
  wdir.mkdir()
  mp = pytest.MonkeyPatch()
  for k, v in {
    "WANDB_MODE": "offline",
    "WANDB_DIR": str(wdir),
    "WANDB_SILENT": "true",
    "WANDB_CONSOLE": "off",
  }.items():
    mp.setenv(k, v)
  data = lh.examples_file(tmp / "data.jsonl", n=32)
  run_dir = tmp / "run"
  gr = GovernedRun.start(run_dir, task=lh.TASK, checkpoint_every=2, head_every=3)
  wb = wandb.init(project="aqgov-test", dir=str(wdir))
  logger = aqwandb.attach(gr, wb)
  for s in range(1, 5):
    wb.log({"user/loss": float(s)}, step=s)  # the user's own metric at the same step
    logger.step(lh.batches(data, s))
  logger.close()
  (run_dir / "attestation.intoto.json").write_text('{"payloadType": "x"}\n')
  (run_dir / "keys" / "planted.key").write_text("SECRET-PLANTED-KEY")
  (run_dir / "secret.key").write_text("SECRET-PLANTED-KEY")
  artifact = aqwandb.log_outputs(wb, run_dir)
  offline_dir = _finish(wb)
  mp.undo()
  return SimpleNamespace(run_dir=run_dir, wandb_dir=offline_dir, root=wdir, artifact=artifact)


def test_metrics_land_in_the_users_step_rows(governed):
  logged = store.read_run(governed.wandb_dir)
  for s in range(1, 5):
    row = logged.history[s]
    assert row["user/loss"] == float(s)
    assert {"aqgov/reach/hidden", "aqgov/reach/head", "aqgov/contribution/head"} <= set(row)
    assert row["aqgov/lineage/size"] >= s + 1 and len(row["aqgov/lineage/root"]) == 64
    assert len(row["aqgov/lineage/record"]) == 64
  assert "aqgov/lineage/head" in logged.history[4]
  config = logged.config["aqgov"]
  config = config.get("value", config)
  assert config["run_id"] and config["groups"]


def test_check_passes_on_the_logged_run(governed):
  counts = aqwandb.check_logged(governed.run_dir, governed.wandb_dir)
  assert counts["rows"] == 4 and counts["heads"] >= 1
  result = CliRunner().invoke(
    main, ["wandb", "check", str(governed.run_dir), "--wandb-dir", str(governed.root)]
  )
  assert result.exit_code == 0, result.output
  assert "OK 4 logged step(s)" in result.output


def _rewrite(path: Path, out: Path, change) -> None:
  """Copy a .wandb log with `change(record)` applied to each record (re-framed with valid CRCs)."""
  chunks = [_FILE_HEADER]
  body = bytearray(_FILE_HEADER)
  for r in store.records(path):
    change(r)
    data = r.SerializeToString()
    left = 32768 - len(body) % 32768
    if left < 7:
      body += bytes(left)
    assert len(data) + 7 <= 32768 - len(body) % 32768, "test records fit one block"
    body += (
      struct.pack("<IHB", zlib.crc32(data, zlib.crc32(b"\x01")) & 0xFFFFFFFF, len(data), 1) + data
    )
  del chunks
  out.write_bytes(bytes(body))


_FILE_HEADER = struct.pack("<4sHB", b":W&B", 0xBEE1, 0)


def test_check_fails_on_an_altered_root(governed, tmp_path):
  src = store.find_store(governed.wandb_dir)

  def alter(r):
    if r.WhichOneof("record_type") == "history" and r.history.step.num == 3:
      for item in r.history.item:
        if (item.key or "/".join(item.nested_key)) == "aqgov/lineage/root":
          root = json.loads(item.value_json)
          item.value_json = json.dumps(("0" if root[0] != "0" else "1") + root[1:])

  _rewrite(src, tmp_path / "run-x.wandb", alter)
  with pytest.raises(IntegrationError, match="W&B step 3 logged lineage root .* Merkle root"):
    aqwandb.check_logged(governed.run_dir, tmp_path / "run-x.wandb")
  result = CliRunner().invoke(
    main, ["wandb", "check", str(governed.run_dir), "--wandb-dir", str(tmp_path)]
  )
  assert result.exit_code == 1 and "IntegrationError" in result.output


def test_check_refuses_a_corrupted_log(governed, tmp_path):
  data = bytearray(store.find_store(governed.wandb_dir).read_bytes())
  data[200] ^= 0xFF
  (tmp_path / "run-y.wandb").write_bytes(bytes(data))
  with pytest.raises(IntegrationError, match="fails its CRC"):
    aqwandb.check_logged(governed.run_dir, tmp_path / "run-y.wandb")


def test_output_artifact_never_carries_a_key(governed):
  names = set(governed.artifact.manifest.entries)
  assert names == {"checkpoints.json", "attestation.intoto.json"}
  digests = json.loads(
    Path(governed.artifact.manifest.entries["checkpoints.json"].local_path).read_text()
  )
  assert [c["step"] for c in digests["checkpoints"]] == [0, 2, 4]
  for path in governed.root.rglob("*"):
    if path.is_file():
      assert b"SECRET-PLANTED-KEY" not in path.read_bytes(), path


def test_output_artifact_refuses_private_and_unlisted_files(governed, wandb_env):
  wb = wandb.init(project="aqgov-test", dir=str(wandb_env))
  try:
    with pytest.raises(IntegrationError, match="allow-list"):
      aqwandb.log_outputs(wb, governed.run_dir, files=("keys/run.key",))
    report = governed.run_dir / "report.html"
    report.write_text("<html></html>")
    report.chmod(0o600)
    with pytest.raises(IntegrationError, match="private"):
      aqwandb.log_outputs(wb, governed.run_dir)
    report.unlink()
  finally:
    wb.finish()


def test_manifests_are_reference_artifacts_with_their_roots(tmp_path, wandb_env):
  from aqgov.examples.demo import create_authorities

  auth = create_authorities(tmp_path / "auth")
  (tmp_path / "run" / "manifests").mkdir(parents=True)
  for m in auth.manifests:
    (tmp_path / "run" / "manifests" / m.name.replace(".manifest", ".signed")).write_bytes(
      m.read_bytes()
    )
  wb = wandb.init(project="aqgov-test", dir=str(wandb_env))
  try:
    arts = aqwandb.log_manifests(wb, tmp_path / "run")
  finally:
    wb.finish()
  assert len(arts) == 2
  for a in arts:
    assert a.type == "credential-manifest" and len(a.metadata["merkle_root"]) == 64
    (entry,) = a.manifest.entries.values()
    assert entry.ref.startswith("file://")


def _summary_with_events():
  s = lh.summary(3)
  g, m, h = len(lh.GROUPS), len(METRICS), 1
  oob = np.zeros((g, m, h), bool)
  oob[1, METRICS.index("gradient_entropy"), 0] = True
  action = np.zeros((g, m, h), np.int32)
  action[1, METRICS.index("gradient_entropy"), 0] = ACTION_NAMES.index("reroute")
  ev = Events(
    np.int32(3),
    oob,
    np.zeros((g, m, h), np.float32),
    np.zeros((g, m, h), np.int32),
    np.zeros((g, m, h), np.float32),
    action,
    np.zeros((g, m, h), np.int32),
    np.full((g, m, h), -1, np.int32),
  )
  return s._replace(events=ev)


def test_step_metrics_reach_contribution_entropy_bounds_events():
  s = _summary_with_events()
  compiled = SimpleNamespace(group_names=lh.GROUPS)
  profile = EntropyProfile(
    "p",
    bounds=(Bound(group="block", metric="gradient_entropy", action="reroute", low=0.5, high=2.0),),
  )
  out = aqwandb.step_metrics(s, compiled, step=3, profile=profile)
  w, n = np.asarray(s.weights), np.asarray(s.contribution_norms)
  for j, g in enumerate(lh.GROUPS):
    assert out[f"aqgov/reach/{g}"] == int((w[:, j] > 0).sum())
    assert out[f"aqgov/contribution/{g}"] == pytest.approx(float(n[w[:, j] > 0, j].mean()))
  assert out["aqgov/entropy/renyi2/block"] == pytest.approx(float(s.measurements["renyi2/block"]))
  assert out["aqgov/bound/gradient_entropy/block/low"] == 0.5
  assert out["aqgov/bound/gradient_entropy/block/high"] == 2.0
  assert out["aqgov/events"] == 1 and out[
    "aqgov/event/gradient_entropy/block"
  ] == ACTION_NAMES.index("reroute")


def test_only_process_zero_logs(monkeypatch, wandb_env):
  import jax

  wb = wandb.init(project="aqgov-test", dir=str(wandb_env))
  try:
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert aqwandb.log_step(wb, lh.summary(1), SimpleNamespace(group_names=lh.GROUPS), step=1) == {}
    assert aqwandb.log_outputs(wb, "/nonexistent") is None
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    assert aqwandb.log_step(wb, lh.summary(2), SimpleNamespace(group_names=lh.GROUPS), step=2)
  finally:
    path = _finish(wb)
  assert sorted(store.read_run(path).history) == [2]


def test_disabled_mode_works(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "disabled")
  data = lh.examples_file(tmp_path / "data.jsonl", n=16)
  gr = GovernedRun.start(tmp_path / "run", task=lh.TASK, checkpoint_every=2)
  wb = wandb.init(mode="disabled")
  logger = aqwandb.attach(gr, wb)
  logged = logger.step(lh.batches(data, 1))
  assert logged is not None
  logger.close()
  aqwandb.log_outputs(wb, tmp_path / "run")
  wb.finish()
