"""Trust comes from outside the run directory: whoever holds RUN/ can change anything in it."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
from click.testing import CliRunner

from aqgov.cli import main
from aqgov.documents import _keys as keys
from aqgov.documents._document_type import sign, verify, write
from aqgov.entropy._overrides import OVERRIDE, Override, admit_override
from aqgov.entropy._profile import PROFILE, EntropyProfile
from aqgov.errors import KeyFileError, LineageError, OverrideError, PolicyError, ProfileError
from aqgov.examples import sample
from aqgov.lineage import _bodies as bodies
from aqgov.lineage import _record as rec
from aqgov.lineage import _segments as segments
from aqgov.lineage import _trust as trustlib
from aqgov.lineage._replay import replay
from aqgov.lineage._run import GovernedRun
from aqgov.lineage._verify import verify_lineage
from aqgov.policy._policy import POLICY, Policy

import lineage_helpers as lh

AUTHORITY = keys.generate("authority")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return lh.examples_file(tmp_path_factory.mktemp("data") / "examples.jsonl")


def _rewrite_start(run_dir: Path, change) -> None:
  """Change the run-start body and recompute the hash chain (which needs no key)."""
  seg = lh.segment_path(run_dir / "lineage")
  header, frames = lh.split_frames(seg.read_bytes())
  out, prev = [], None
  for i, f in enumerate(frames):
    r = rec.decode_record(lh.payload(f), i)
    if i == 0:
      body = rec.decode_body(r.body_bytes)
      change(body)
      data = rec.encode_record(0, r.kind, r.prev, body)
    else:
      data = rec.encode_record(i, r.kind, prev, r.body_bytes)
    out.append(segments.frame(data))
    prev = rec.record_hash(data)
  seg.write_bytes(header + b"".join(out))


def _token(run_id: str, key: keys.SigningKey = AUTHORITY, steps: str = "3", **times):
  now = dt.datetime.now(dt.UTC)
  times = {"expires": now + dt.timedelta(hours=1), **times}
  return sign(
    OVERRIDE,
    Override.create(
      run=run_id,
      steps=steps,
      groups="head",
      metrics="gradient_entropy",
      reason="a test threshold",
      **times,
    ),
    key,
  )


# 1. replay imports nothing a run directory names before the lineage verifies


def test_replay_never_imports_the_task_a_rewritten_run_start_names(tmp_path, data, monkeypatch):
  run_dir, examples = tmp_path / "run", tmp_path / "examples.jsonl"
  examples.write_text("".join(json.dumps(d) + "\n" for d in data))
  lh.make_run(run_dir, data, 2)
  run_pub = str(run_dir / "keys" / "run.pub")
  marker = tmp_path / "pwned"
  (tmp_path / "evil_task.py").write_text(
    f"open({str(marker)!r}, 'w').write('ran')\nmake_task = None\n"
  )
  monkeypatch.syspath_prepend(str(tmp_path))
  _rewrite_start(run_dir, lambda body: body["config"].update(task="evil_task:make_task"))
  untrusted = CliRunner().invoke(
    main, ["lineage", "replay", str(run_dir), "--step", "2", "--data", str(examples)]
  )
  assert untrusted.exit_code != 0 and "--trust" in untrusted.output
  verified = CliRunner().invoke(
    main,
    [
      "lineage",
      "replay",
      str(run_dir),
      "--step",
      "2",
      "--data",
      str(examples),
      "--run-key",
      run_pub,
    ],
  )
  assert verified.exit_code == 1 and "LineageError" in verified.output
  assert not marker.exists()


def test_replay_imports_only_a_task_the_user_names_or_an_installed_entry_point(
  tmp_path, data, monkeypatch
):
  run_dir = tmp_path / "run"
  lh.make_run(run_dir, data, 2)
  trust = lh.trust_of(run_dir)
  monkeypatch.setattr(
    trustlib, "entry_points", lambda group: []
  )  # aqgov itself registers its example tasks
  with pytest.raises(LineageError, match="not an installed 'aqgov.tasks' entry point"):
    replay(run_dir, step=2, examples=data, trust=trust)
  with pytest.raises(LineageError, match="not the task run-start recorded"):
    replay(run_dir, step=2, examples=data, trust=trust, task="aqgov.examples.tiny_lm:make_task")
  assert (
    replay(
      run_dir, step=2, examples=data, trust=trust, task=lh.TASK, from_checkpoint=0
    ).steps_replayed
    == 2
  )
  monkeypatch.setattr(
    trustlib, "entry_points", lambda group: [EntryPoint("example", lh.TASK, group)]
  )
  assert replay(run_dir, step=2, examples=data, trust=trust, from_checkpoint=0).steps_replayed == 2


# 2. no private key in the run directory; the trusted keys are those run-start records


def test_the_run_key_lives_in_a_key_directory_outside_the_run_directory(tmp_path, data):
  run = lh.make_run(tmp_path / "run", data, 1, close=False, key_dir=tmp_path / "operator-keys")
  run.abandon()  # left open: a closed run is final and cannot be resumed
  assert not [p for p in (tmp_path / "run").rglob("*") if p.suffix == ".key"]
  assert stat.S_IMODE((tmp_path / "operator-keys").stat().st_mode) == 0o700
  assert stat.S_IMODE((tmp_path / "operator-keys" / "run.key").stat().st_mode) == 0o600
  with pytest.raises(LineageError, match="inside the run directory"):
    GovernedRun.start(tmp_path / "other", task=lh.TASK, key_dir=tmp_path / "other" / "keys")
  GovernedRun.resume(tmp_path / "run", key_dir=tmp_path / "operator-keys").abandon()
  start = next(iter(segments.LogReader(tmp_path / "run" / "lineage"))).body
  assert (
    start["signer"]
    == keys.load_public_key(tmp_path / "operator-keys" / "run.pub").key_id
    == lh.trust_of(tmp_path / "run").by_name("run").key_id
    != run.run_id
  )


def test_resume_trusts_exactly_the_authorities_run_start_recorded_never_a_key_dropped_into_the_run(
  tmp_path, data
):
  d = tmp_path / "run"
  lh.make_run(d, data, 2, close=False, trust=[AUTHORITY.public]).abandon()
  intruder = keys.generate("intruder")
  _, intruder_pub = keys.write_keypair(intruder, d / "keys")  # a fresh key dropped into RUN/keys/
  with pytest.raises(LineageError, match="were not given"):
    GovernedRun.resume(d)
  with pytest.raises(LineageError, match="not among those run .* recorded trusting"):
    GovernedRun.resume(d, trust=[AUTHORITY.public, intruder_pub])
  resumed = GovernedRun.resume(d, trust=[AUTHORITY.public])
  with pytest.raises(OverrideError, match="untrusted keys: intruder"):
    resumed.record_override(_token(resumed.run_id, intruder))
  with pytest.raises(OverrideError, match="untrusted keys: authority"):
    resumed.record_override(_token(resumed.run_id, lh.run_key(d)._replace(name="authority")))
  resumed.abandon()


# 3. resume and replay refuse documents and task code that differ from run-start


def test_resume_and_replay_refuse_a_document_or_task_that_differs_from_run_start(
  tmp_path, data, monkeypatch
):
  policy = sign(POLICY, Policy("p", {"all": ["**"]}, default={"all": 1.0}), AUTHORITY)
  (tmp_path / "my_task.py").write_text("from aqgov.examples.task import make_task  # noqa: F401\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  d = tmp_path / "run"
  lh.make_run(
    d, data, 2, close=False, policies=[policy], trust=[AUTHORITY.public], task="my_task:make_task"
  ).abandon()
  trust = keys.TrustStore.of([AUTHORITY.public, *lh.trust_of(d).keys.values()])
  policy_file = next((d / "policies").iterdir())
  original = policy_file.read_bytes()
  policy_file.unlink()
  with pytest.raises(LineageError, match="missing"):
    GovernedRun.resume(d, trust=[AUTHORITY.public])
  with pytest.raises(LineageError, match="missing"):
    replay(d, step=2, examples=data, trust=trust, task="my_task:make_task")
  policy_file.write_bytes(original)
  (d / "policies" / "extra.signed").write_bytes(original)
  with pytest.raises(LineageError, match="not a policy run-start recorded"):
    GovernedRun.resume(d, trust=[AUTHORITY.public])
  (d / "policies" / "extra.signed").unlink()
  (tmp_path / "my_task.py").write_text(
    "from aqgov.examples.task import make_task  # noqa: F401\n# changed\n"
  )
  with pytest.raises(LineageError, match="task code changed"):
    GovernedRun.resume(d, trust=[AUTHORITY.public])


# 4. verify with keys obtained out of band


def test_a_lineage_re_signed_with_a_fresh_key_fails_against_the_run_key_obtained_out_of_band(
  tmp_path, data
):
  d = tmp_path / "run"
  lh.make_run(d, data, 2)
  run_id = next(iter(segments.LogReader(d / "lineage"))).body["run_id"]
  original = keys.load_public_key(d / "keys" / "run.pub")
  fingerprint = CliRunner().invoke(main, ["keys", "fingerprint", str(d / "keys" / "run.pub")])
  assert fingerprint.output.split()[0] == original.key_id
  handed_over = tmp_path / "run-key.pub"
  handed_over.write_text(keys.public_key_json(original))
  forger = keys.generate("run", roles=("run",))
  for p in (d / "lineage").rglob("*.seg"):
    p.unlink()
  lh.write_log(d / "lineage", forger, 3, run_id=run_id)
  (d / "keys" / "run.pub").write_text(keys.public_key_json(forger.public))
  inside = CliRunner().invoke(
    main, ["lineage", "verify", str(d), "--trust", *map(str, (d / "keys").glob("*.pub"))]
  )
  assert inside.exit_code == 0 and "warning: trusted key file" in inside.stderr
  for run_key in (str(handed_over), original.key_id):
    out = CliRunner().invoke(main, ["lineage", "verify", str(d), "--run-key", run_key])
    assert out.exit_code == 1 and "LineageError" in out.output, out.output


# 5. one check for every use of an override token


def test_record_override_refuses_an_expired_foreign_uncovering_or_reused_token(tmp_path, data):
  d = tmp_path / "run"
  run = lh.make_run(d, data, 2, close=False, trust=[AUTHORITY.public])
  past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
  with pytest.raises(OverrideError, match="expired"):
    run.record_override(_token(run.run_id, issued=past, expires=past + dt.timedelta(hours=1)))
  with pytest.raises(OverrideError, match="is for run 'another-run'"):
    run.record_override(_token("another-run"))
  with pytest.raises(OverrideError, match="does not cover step 3"):
    run.record_override(_token(run.run_id, steps="7"))
  token = _token(run.run_id)
  run.record_override(token)
  with pytest.raises(OverrideError, match="already used"):
    run.record_override(token, step=3)
  run.close()
  assert verify_lineage(d, lh.trust_of(d)).closed


@pytest.mark.parametrize("forged", ["another run", "twice", "expired"])
def test_verify_refuses_override_records_that_bypass_the_check(tmp_path, data, forged):
  d = tmp_path / "run"
  run = lh.make_run(d, data, 2, close=False, trust=[AUTHORITY.public])
  past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
  token = {
    "another run": lambda: _token("another-run"),
    "twice": lambda: _token(run.run_id),
    "expired": lambda: _token(run.run_id, issued=past, expires=past + dt.timedelta(hours=1)),
  }[forged]()
  for _ in range(2 if forged == "twice" else 1):
    run.writer.append_record(
      rec.OVERRIDE,
      bodies.override_body(
        step=3, token_kind=token.kind, token_id=token.id, token=token.to_bytes()
      ),
    )
  run.close()
  with pytest.raises(LineageError, match="override token does not verify"):
    verify_lineage(d, lh.trust_of(d))


def test_only_the_profiles_override_authorities_may_sign_its_overrides():
  profile = EntropyProfile.from_toml(
    'name = "p"\nauthority = "acme-data"\noverride_authorities = ["eu-office"]\n'
  )
  assert EntropyProfile.from_toml(profile.to_toml()) == profile
  acme, eu = keys.generate("acme-data"), keys.generate("eu-office")
  trust = keys.TrustStore.of([acme, eu])
  with pytest.raises(OverrideError, match="none of which is an override authority"):
    admit_override(_token("r", acme), trust, "r", authorities=profile.override_authorities)
  assert admit_override(
    _token("r", eu), trust, "r", authorities=profile.override_authorities
  ).signers == ("eu-office",)


# 6. a policy (or profile) names its authority, and only that authority's key may sign it


def test_a_policy_or_profile_signed_by_another_authority_than_it_names_is_refused():
  acme, eu = keys.generate("acme-data"), keys.generate("eu-office")
  trust = keys.TrustStore.of([acme, eu])
  policy = Policy.read(sample.policy_path("acme-routing"))
  assert policy.authority == "acme-data"
  with pytest.raises(PolicyError, match="only acme-data's key may sign it"):
    verify(POLICY, sign(POLICY, policy, eu), trust)
  assert verify(POLICY, sign(POLICY, policy, acme), trust) == policy
  profile = EntropyProfile.read(sample.profile_path())
  with pytest.raises(ProfileError, match="only acme-data's key may sign it"):
    verify(PROFILE, sign(PROFILE, profile, eu), trust)


# 7. names that become file names, symlinks and modes


def test_a_trusted_key_name_never_makes_the_run_write_outside_its_directory(tmp_path, data):
  escaped = keys.generate("x").public._replace(name="../../escaped")
  with pytest.raises(LineageError, match="cannot be a file name"):
    GovernedRun.start(tmp_path / "a" / "run", task=lh.TASK, trust=[escaped])
  assert not list(tmp_path.rglob("escaped*"))


def test_keys_new_refuses_a_planted_symlink_and_existing_files(tmp_path):
  victim = tmp_path / "victim"
  victim.write_text("precious")
  out = tmp_path / "keys"
  out.mkdir()
  (out / "auth.pub").symlink_to(victim)
  result = CliRunner().invoke(main, ["keys", "new", "auth", "--out", str(out)])
  assert result.exit_code == 1 and "refusing to overwrite" in result.output
  assert victim.read_text() == "precious" and not (out / "auth.key").exists()
  keys.write_keypair(keys.generate("other"), out)
  with pytest.raises(KeyFileError, match="already exists"):
    keys.write_keypair(keys.generate("other"), out)


def test_key_files_and_directories_get_safe_modes_whatever_the_umask(tmp_path):
  old = os.umask(0)
  try:
    result = CliRunner().invoke(main, ["keys", "new", "auth", "--out", str(tmp_path / "a" / "b")])
  finally:
    os.umask(old)
  assert result.exit_code == 0, result.output
  mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
  assert (mode(tmp_path / "a"), mode(tmp_path / "a" / "b")) == (0o700, 0o700)
  assert (mode(tmp_path / "a" / "b" / "auth.key"), mode(tmp_path / "a" / "b" / "auth.pub")) == (
    0o600,
    0o644,
  )
  written = write(
    POLICY, sign(POLICY, Policy("p", {"all": ["**"]}), AUTHORITY), tmp_path / "p.signed"
  )
  assert mode(written) == 0o644
