"""Every bad input gets a typed `AqgovError` that says what is wrong, never a bare Python error."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from aqgov.cli import main
from aqgov.credentials import _manifest as credentials
from aqgov.credentials._admission import Admission
from aqgov.credentials._taxonomy import Taxonomy
from aqgov.documents import _canonical as canonical
from aqgov.documents import _keys as keys
from aqgov.documents import _signing as signing
from aqgov.documents._document_type import verify
from aqgov.entropy._overrides import parse_steps
from aqgov.entropy._profile import EntropyProfile
from aqgov.errors import (
  CheckpointError,
  CredentialError,
  LineageError,
  OverrideError,
  PolicyError,
  ProfileError,
  TaxonomyError,
)
from aqgov.lineage import _record as rec
from aqgov.lineage import _segments as segments
from aqgov.lineage._query import describe, membership
from aqgov.lineage._replay import replay
from aqgov.lineage._run import GovernedRun
from aqgov.lineage._verify import verify_lineage
from aqgov.policy._classes import MAX_ROUTE_CLASSES
from aqgov.policy._compile import compile_policy
from aqgov.policy._conditions import compile_expr
from aqgov.policy._policy import Policy

import lineage_helpers as lh
from policy_reference import ACME, ACME_TOML

KEY = keys.generate("run", roles=("run",))
ACME_KEY = keys.generate("acme-data")


def run_cli(*args) -> object:
  return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


# ---- lineage -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  path = tmp_path_factory.mktemp("data") / "examples.jsonl"
  return path, lh.examples_file(path)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data) -> Path:
  d = tmp_path_factory.mktemp("runs") / "finished"
  lh.make_run(d, data[1], 5, checkpoint_every=2)
  return d


def _copy(run_dir: Path, tmp_path: Path) -> Path:
  out = tmp_path / "run"
  shutil.copytree(run_dir, out)
  return out


def _append(lineage_dir: Path, kind: str, body: dict) -> None:
  """Append a record with `body` to the log, chained correctly (what a party without the run key can do)."""
  reader = segments.LogReader(lineage_dir)
  for _ in reader:
    pass
  path = sorted((lineage_dir / "segments").glob("*.seg"))[-1]
  with open(path, "ab") as fh:
    fh.write(
      segments.frame(rec.encode_record(reader.size, kind, reader.last_hash, canonical.encode(body)))
    )


def _step_body(step: int) -> dict:
  return rec.step_body(lh.summary(step), lh.ids(step), lh.digests(step), time_s=0.0)


def _signed_log(run_dir: Path, steps: int) -> Path:
  """An open log of `steps` steps, all under a signed head, with the run's public key in `run_dir/keys/`
  (readers check the heads with it: only the signed part is read)."""
  ldir = run_dir / "lineage"
  lh.write_log(ldir, KEY, steps, close=False)
  lh.sign_head(ldir, KEY)
  lh.publish_key(run_dir, KEY)
  return ldir


def _show_and_query_skip_the_unsigned_tail(ldir: Path, steps: int) -> None:
  """Records after the last signed head (anyone can append them) are counted, never read."""
  shown = describe(ldir)
  assert (shown.signed_size, shown.unsigned, shown.steps, shown.last_step) == (
    steps + 1,
    1,
    steps,
    steps,
  )
  assert {m.record for m in membership(ldir, "block")} <= set(range(1, steps + 1))


@pytest.mark.parametrize(
  "damage",
  [
    lambda b: b.pop("weights"),
    lambda b: b.update(step="three"),
    lambda b: b.update(loss="low"),
    lambda b: b.update(fingerprint={"dtype": "float32", "shape": [3, 8], "data": b"\0" * 5}),
    lambda b: b.update(route_class={"dtype": "object", "shape": [4], "data": b"\0" * 32}),
    lambda b: b.update(contribution_norms=rec.array_to_wire(np.zeros((4, 2), np.float32))),
    lambda b: b.update(example_ids=b"\xff\xfe"),
  ],
  ids=[
    "lacks-weights",
    "step-not-int",
    "loss-not-float",
    "short-array",
    "object-dtype",
    "wrong-shape",
    "ids-not-utf8",
  ],
)
def test_a_malformed_step_body_is_a_lineage_error_for_show_query_and_verify(tmp_path, damage):
  ldir = _signed_log(tmp_path, 3)
  body = _step_body(4)
  damage(body)
  _append(ldir, rec.STEP, body)
  _show_and_query_skip_the_unsigned_tail(ldir, 3)
  with pytest.raises(LineageError, match="record 4"):
    verify_lineage(
      ldir, keys.TrustStore.of([KEY.public]), require_closed=False
    )  # verify checks every record
  lh.sign_head(ldir, KEY)  # once a signed head covers it, show and query read it, and refuse it
  with pytest.raises(LineageError, match="record 4"):
    describe(ldir)
  with pytest.raises(LineageError, match="record 4"):
    membership(ldir, "block")
  with pytest.raises(LineageError, match="record 4"):
    verify_lineage(ldir, keys.TrustStore.of([KEY.public]), require_closed=False)


@pytest.mark.parametrize(
  "damage",
  [
    lambda b: b.update(rows=rec.array_to_wire(np.asarray([0, 1, 2, 9], np.uint8))),
    lambda b: b.update(weights={"by_class": rec.array_to_wire(np.ones((1, 3), np.float32))}),
  ],
  ids=["row-out-of-range", "class-without-weights"],
)
def test_step_values_out_of_range_are_lineage_errors_for_show_and_query(tmp_path, damage):
  ldir = _signed_log(tmp_path, 3)
  body = _step_body(4)
  body["route_class"] = rec.array_to_wire(np.asarray([0, 1, 2, 1], np.uint8))
  damage(body)
  _append(ldir, rec.STEP, body)
  _show_and_query_skip_the_unsigned_tail(ldir, 3)
  lh.sign_head(ldir, KEY)
  with pytest.raises(LineageError, match="record 4"):
    describe(ldir)
  with pytest.raises(LineageError, match="record 4"):
    membership(ldir, "block")
  report = verify_lineage(ldir, keys.TrustStore.of([KEY.public]), require_closed=False)
  assert (report.size, report.signed_size) == (5, 5)  # verify checks shapes, not values


@pytest.mark.parametrize(
  "kind, body",
  [
    (
      rec.CHECKPOINT,
      {
        "step": 1,
        "params_sha256": "00",
        "path": "x",
        "lineage_size": 4,
        "lineage_root": "zz",
        "time": 0.0,
      },
    ),
    (
      rec.RUN_RESUME,
      {"checkpoint_step": 0, "checkpoint_record": None, "superseded": "all", "time": 0.0},
    ),
    (rec.OVERRIDE, {"step": 1, "token_kind": "entropy-override", "token_id": "x", "time": 0.0}),
    (rec.RUN_END, {"step": 1, "status": 3, "time": 0.0}),
  ],
)
def test_malformed_bodies_of_other_kinds_are_lineage_errors(tmp_path, kind, body):
  ldir = tmp_path / "lineage"
  lh.write_log(ldir, KEY, 3, close=False)
  _append(ldir, kind, body)
  with pytest.raises(LineageError, match=f"record 4: {kind}"):
    verify_lineage(ldir, keys.TrustStore.of([KEY.public]))
  if kind != rec.OVERRIDE:  # show reads no override body
    with pytest.raises(LineageError, match=f"record 4: {kind}"):
      describe(ldir)


def test_a_nan_loss_is_canonical_so_show_and_verify_agree(tmp_path):
  ldir = tmp_path / "lineage"
  negative_nan = struct.unpack(">d", bytes.fromhex("fff8000000000000"))[0]
  w = rec.step_body(lh.summary(1)._replace(loss=negative_nan), lh.ids(1), lh.digests(1))
  assert math.isnan(w["loss"]) and struct.pack(">d", w["loss"]) == struct.pack(">d", canonical.NAN)
  _signed_log(tmp_path, 2)
  _append(ldir, rec.STEP, {**_step_body(3), "loss": math.nan})
  lh.sign_head(ldir, KEY)  # show reads only what a signed head covers
  report = verify_lineage(ldir, keys.TrustStore.of([KEY.public]), require_closed=False)
  assert (report.size, report.signed_size) == (4, 4)
  assert math.isnan(describe(ldir).last_loss)


def test_show_and_query_on_an_empty_segments_directory_say_there_is_no_record(tmp_path):
  (tmp_path / "lineage" / "segments").mkdir(parents=True)
  for fn in (
    describe,
    lambda d: membership(d, "block"),
    lambda d: verify_lineage(d, keys.TrustStore.of([KEY.public])),
  ):
    with pytest.raises(LineageError, match="holds no complete record"):
      fn(tmp_path)
  result = CliRunner().invoke(main, ["lineage", "show", str(tmp_path)])
  assert result.exit_code == 1 and "holds no complete record" in result.output


def test_a_malformed_tree_head_payload_is_a_lineage_error(tmp_path):
  ldir = tmp_path / "lineage"
  lh.write_log(ldir, KEY, 3)
  head = signing.add_signature(
    signing.SignedDocument("lineage-tree-head", {"run_id": "run-1", "size": "3"}), KEY
  )
  with open(ldir / "heads.seg", "ab") as fh:
    fh.write(segments.frame(head.to_bytes()))
  with pytest.raises(LineageError, match="tree head .* is malformed: size"):
    verify_lineage(ldir, keys.TrustStore.of([KEY.public]))


@pytest.mark.parametrize(
  "edit",
  [
    lambda m: m.pop("root"),
    lambda m: m.update(root="not hex"),
    lambda m: m.update(last_record=7),
    lambda m: m.pop("run_id"),
  ],
  ids=["missing-root", "non-hex-root", "int-last-record", "no-run-id"],
)
def test_malformed_checkpoint_metadata_is_a_checkpoint_error(tmp_path, finished, data, edit):
  d = _copy(finished, tmp_path)
  meta = d / "checkpoints" / "4" / "lineage" / "metadata"
  doc = json.loads(meta.read_text())
  edit(doc)
  meta.write_text(json.dumps(doc))
  with pytest.raises(CheckpointError, match="checkpoint .*4"):
    replay(d, step=5, examples=data[0], from_checkpoint=4, trust=lh.trust_of(d), task=lh.TASK)


def test_a_symlinked_checkpoint_directory_is_checked_like_any_other(tmp_path, finished, data):
  d = _copy(finished, tmp_path)
  shutil.rmtree(d / "checkpoints" / "4")
  (d / "checkpoints" / "4").symlink_to(d / "checkpoints" / "2", target_is_directory=True)
  with pytest.raises(CheckpointError, match="holds params hashing to"):
    replay(d, step=5, examples=data[0], from_checkpoint=4, trust=lh.trust_of(d), task=lh.TASK)
  (d / "checkpoints" / "4").unlink()
  (d / "checkpoints" / "4").symlink_to(tmp_path / "nowhere", target_is_directory=True)
  dangling = replay(
    d, step=5, examples=data[0], from_checkpoint=4, trust=lh.trust_of(d), task=lh.TASK
  )
  assert dangling.from_checkpoint == 2  # dangling: not a checkpoint


def test_a_step_with_no_examples_is_refused(tmp_path, data):
  run = GovernedRun.start(tmp_path / "run", task=lh.TASK, checkpoint_every=100)
  try:
    with pytest.raises(LineageError, match="no examples"):
      run.step([])
  finally:
    run.abandon()


# ---- examples, taxonomies, manifests -------------------------------------------------------------


@pytest.mark.parametrize(
  "line, message",
  [
    (b'{"id": "a", "content": "\xff"}', "not UTF-8"),
    (b'{"id": "a", "content": "\\ud800"}', "lone surrogate"),
    (b'{"id": "\\udfff", "content": "x"}', "lone surrogate"),
    (b"[" * 200_000 + b"]" * 200_000, "nests too deeply"),
  ],
)
def test_bad_jsonl_lines_are_credential_errors(tmp_path, line, message):
  path = tmp_path / "e.jsonl"
  path.write_bytes(b'{"id": "ok", "content": "fine"}\n' + line + b"\n")
  with pytest.raises(CredentialError, match=f"e.jsonl:2: .*{message}"):
    credentials.read_examples(path)


def test_examples_given_as_python_values_must_be_unicode_text():
  with pytest.raises(CredentialError, match="'content' must be text"):
    credentials.as_example({"id": "a", "content": "\ud800"})
  with pytest.raises(CredentialError, match="'id' must be"):
    credentials.as_example({"id": "\ud800", "content": "x"})


DEEP_TOML = [
  "x = " + "[" * 100_000 + "]" * 100_000,
  "x = " + "{a = " * 100_000 + "1" + "}" * 100_000,
]


@pytest.mark.parametrize(
  "reader, error",
  [(Policy.read, PolicyError), (EntropyProfile.read, ProfileError), (Taxonomy.read, TaxonomyError)],
)
def test_deeply_nested_or_non_utf8_toml_is_a_typed_error(tmp_path, reader, error):
  path = tmp_path / "doc.toml"
  for text in DEEP_TOML:
    path.write_text(text + "\n")
    with pytest.raises(error, match="too deeply"):
      reader(path)
  path.write_bytes(b'name = "\xff"\n')
  with pytest.raises(error, match="not UTF-8"):
    reader(path)


def test_a_signed_manifest_whose_taxonomy_is_a_string_is_refused():
  manifest = credentials.issue_manifest(ACME_KEY, ACME, [])
  payload = dict(manifest.document.payload, taxonomy="acme-data")
  forged = signing.add_signature(signing.SignedDocument(credentials.KIND, payload), ACME_KEY)
  with pytest.raises(CredentialError, match="invalid taxonomy"):
    verify(
      credentials.MANIFEST,
      forged,
      keys.TrustStore.of([ACME_KEY.public._replace(roles=("authority",))]),
    )
  with pytest.raises(TaxonomyError, match="got str"):
    Taxonomy.from_dict("acme-data")


def _labelled(ex_id: str, content: str, tier: int) -> dict:
  labels = {
    "license_class": "cc-by",
    "sensitivity_tier": tier,
    "jurisdictions": ["EU"],
    "source": "forum",
  }
  return {"id": ex_id, "content": content, "labels": {"acme-data": labels}}


def test_one_content_under_two_ids_with_different_labels_is_refused_in_a_manifest():
  with pytest.raises(CredentialError, match="'a' and 'b' have the same content"):
    credentials.issue_manifest(
      ACME_KEY, ACME, [_labelled("a", "same", 0), _labelled("b", "same", 3)]
    )
  same = credentials.issue_manifest(
    ACME_KEY, ACME, [_labelled("a", "same", 1), _labelled("b", "same", 1)]
  )
  assert same.size == 2  # the same content under two ids with the same labels is fine


def test_one_content_under_two_ids_with_different_labels_is_refused_across_manifests():
  trust = keys.TrustStore.of([ACME_KEY.public._replace(roles=("authority",))])
  one = credentials.issue_manifest(ACME_KEY, ACME, [_labelled("a", "same", 0)])
  two = credentials.issue_manifest(ACME_KEY, ACME, [_labelled("b", "same", 2)])
  with pytest.raises(CredentialError, match="'a' and 'b' have the same content"):
    Admission(trust, [one, two])


# ---- policies, profiles, overrides ---------------------------------------------------------------


@pytest.mark.parametrize("expr", [3, None, b"acme-data.source == 'forum'", ["x"]])
def test_compile_expr_on_a_non_string_is_a_policy_error(expr):
  with pytest.raises(PolicyError, match="expression text"):
    compile_expr(expr, ACME)


def _rules(n: int) -> list[dict]:
  return [
    {"name": f"r{i}", "when": f"acme-data.sensitivity_tier == {i % 4}", "route": {"all": 0.5}}
    for i in range(n)
  ]


def test_compositions_with_too_many_route_classes_are_refused():
  policies = [Policy(f"p{k}", {"all": ["**"]}, _rules(60), default={"all": 1.0}) for k in range(3)]
  with pytest.raises(
    PolicyError, match=f"226,982 route classes, more than the {MAX_ROUTE_CLASSES}"
  ):
    compile_policy(policies, {"w": np.zeros(2)}, ACME)
  fits = [
    Policy(f"p{k}", {"all": ["**"]}, _rules(n), default={"all": 1.0})
    for k, n in enumerate((15, 15, 14))
  ]
  assert compile_policy(fits, {"w": np.zeros(2)}, ACME).num_classes == 16 * 16 * 15 + 1


@pytest.mark.parametrize("steps", [[0, 2**31], [2**31, 2**31 + 5], [0, 2**62]])
def test_profile_windows_past_int32_are_refused(steps):
  text = (
    f'format = "aqgov.entropy-profile/1"\nname = "p"\n[[bound]]\ngroup = "g"\nmetric = "renyi2"\n'
    f'action = "pause"\nlow = 0.1\nsteps = {steps}\n'
  )
  with pytest.raises(ProfileError, match="int32"):
    EntropyProfile.from_toml(text)


@pytest.mark.parametrize("steps", [[[0, 2**31]], 2**40, f"1-{2**31}"])
def test_override_windows_past_int32_are_refused(steps):
  with pytest.raises(OverrideError, match="int32"):
    parse_steps(steps)


# ---- the command line ----------------------------------------------------------------------------


def test_an_unwritable_out_path_is_one_error_line_and_exit_status_1(tmp_path):
  (tmp_path / "tax.toml").write_text(ACME_TOML)
  assert run_cli("keys", "new", "alice", "--out", tmp_path / "keys").exit_code == 0
  (tmp_path / "p.toml").write_text(
    'name = "p"\n[groups]\nall = ["**"]\n[default]\nroute = {all = 1.0}\n'
  )
  (tmp_path / "a-file").write_text("")
  result = CliRunner().invoke(
    main,
    [
      "policy",
      "sign",
      str(tmp_path / "p.toml"),
      "--key",
      str(tmp_path / "keys" / "alice.key"),
      "--out",
      str(tmp_path / "a-file" / "sub" / "p.signed"),
    ],
  )
  assert result.exit_code == 1
  assert result.output.count("\n") == 1 and result.output.startswith("error: cannot access")
  assert (
    "Traceback" not in result.output
    and result.exception is None
    or isinstance(result.exception, SystemExit)
  )


def test_an_unwritable_intoto_path_is_one_error_line(tmp_path, finished):
  (tmp_path / "a-file").write_text("")
  result = CliRunner().invoke(
    main, ["lineage", "export", str(finished), "--intoto", str(tmp_path / "a-file" / "out.json")]
  )
  assert result.exit_code == 1
  assert result.output.count("\n") == 1 and result.output.startswith("error: cannot access")
