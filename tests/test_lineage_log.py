"""The lineage log: records, chain, Merkle roots, signed heads, tamper detection, torn tails, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aqgov.documents import _canonical as canonical
from aqgov.documents import _keys as keys
from aqgov.documents import _merkle as merkle
from aqgov.documents._keys import TrustStore
from aqgov.errors import LineageError
from aqgov.lineage import _record as rec
from aqgov.lineage import _scan as logscan
from aqgov.lineage import _segments as segments
from aqgov.lineage._heads import read_heads
from aqgov.lineage._verify import consistency_proof, verify_lineage
from aqgov.lineage._writer import FSYNC_POLICIES, LineageWriter, open_for_resume

import lineage_helpers as lh

KEY = keys.generate("run")
TRUST = TrustStore.of([KEY])
STEPS = 12


@pytest.fixture(scope="module")
def closed_log(tmp_path_factory) -> Path:
  d = tmp_path_factory.mktemp("closed") / "lineage"
  lh.write_log(d, KEY, STEPS, head_every=5)
  return d


def _copy_with_segment(src: Path, segment: bytes, into: Path) -> Path:
  dst = into / "lineage"
  (dst / "segments").mkdir(parents=True)
  (dst / "heads.seg").write_bytes((src / "heads.seg").read_bytes())
  (dst / "segments" / lh.segment_path(src).name).write_bytes(segment)
  return dst


def _verify_error(lineage_dir: Path) -> LineageError:
  with pytest.raises(LineageError) as info:
    verify_lineage(lineage_dir, TRUST)
  return info.value


def _tampered_error(src: Path, segment: bytes) -> LineageError:
  """The error verifying a copy of `src` whose segment holds `segment`."""
  with tempfile.TemporaryDirectory(prefix="aqgov-tamper-") as tmp:
    return _verify_error(_copy_with_segment(src, segment, Path(tmp)))


def test_a_closed_log_verifies_with_every_record_signed(closed_log):
  report = verify_lineage(closed_log, TRUST)
  assert report.size == STEPS + 2 and report.closed and report.signed_size == report.size
  assert report.heads == 4 and report.torn_bytes == 0  # heads at sizes 1, 6, 11 and 14 (close)


def test_records_chain_and_merkle_root_match_an_independent_recomputation(closed_log):
  records = list(segments.LogReader(closed_log))
  assert [r.seq for r in records] == list(range(STEPS + 2))
  assert records[0].prev == rec.GENESIS
  assert all(b.prev == a.hash for a, b in zip(records, records[1:], strict=False))
  heads, _ = read_heads(closed_log)
  leaves = [merkle.leaf_hash(r.hash) for r in records]
  assert heads[-1].payload["root"] == merkle.root_from_leaf_hashes(leaves).hex()


def test_step_records_keep_what_the_summary_said(closed_log):
  bodies = [(i, b) for i, k, b in segments.records(closed_log, kinds=(rec.STEP,))]
  view = rec.view_step(bodies[2][1])
  s = lh.summary(3)
  assert view.step == 3 and view.example_ids == tuple(lh.ids(3))
  np.testing.assert_array_equal(view.weights, s.weights)
  np.testing.assert_array_equal(view.contribution_norms, s.contribution_norms)
  np.testing.assert_array_equal(view.fingerprint, s.fingerprint)
  assert view.example_sha256 == tuple(d.hex() for d in lh.digests(3))


def test_every_signed_head_is_consistent_with_the_final_tree(closed_log):
  heads, _ = read_heads(closed_log)
  head, proof = consistency_proof(closed_log.parent, int(heads[1].payload["size"]))
  assert merkle.verify_consistency(
    int(heads[1].payload["size"]),
    head.size,
    bytes.fromhex(heads[1].payload["root"]),
    head.root,
    proof,
  )


@given(st.data())
def test_flipping_any_byte_of_a_record_is_detected_at_that_record(closed_log, data):
  original = lh.segment_path(closed_log).read_bytes()
  header, frames = lh.split_frames(original)
  pos = data.draw(st.integers(0, len(original) - 1), label="byte")
  bit = data.draw(st.integers(0, 7), label="bit")
  tampered = bytearray(original)
  tampered[pos] ^= 1 << bit
  err = _tampered_error(closed_log, bytes(tampered))
  if pos >= lh.HEADER:
    ends = np.cumsum([lh.HEADER] + [len(f) for f in frames])
    assert err.index == int(np.searchsorted(ends, pos, side="right")) - 1


@given(st.data())
def test_deleting_reordering_or_inserting_records_is_detected_at_the_first_changed_position(
  closed_log, data
):
  original = lh.segment_path(closed_log).read_bytes()
  header, frames = lh.split_frames(original)
  n = len(frames)
  op = data.draw(st.sampled_from(["delete", "swap", "duplicate", "forge"]), label="op")
  tampered = list(frames)
  if op == "delete":
    del tampered[data.draw(st.integers(0, n - 1), label="i")]
  elif op == "swap":
    i = data.draw(st.integers(0, n - 2), label="i")
    j = data.draw(st.integers(i + 1, n - 1), label="j")
    tampered[i], tampered[j] = tampered[j], tampered[i]
  elif op == "duplicate":
    tampered.insert(
      data.draw(st.integers(0, n), label="at"), frames[data.draw(st.integers(0, n - 1), label="of")]
    )
  else:
    at = data.draw(st.integers(1, n - 1), label="at")
    prev = rec.record_hash(lh.payload(frames[at - 1]))
    tampered.insert(at, lh.forge(at, prev, step=at))
  err = _tampered_error(closed_log, header + b"".join(tampered))
  assert err.index == lh.first_difference(frames, tampered)


def test_a_consistently_rewritten_chain_is_caught_by_the_signed_heads(closed_log):
  header, frames = lh.split_frames(lh.segment_path(closed_log).read_bytes())
  at = 8  # heads cover 1, 6, 11 and 14 records: the rewrite lies after the head of size 6
  records = [rec.decode_record(lh.payload(f), i) for i, f in enumerate(frames)]
  rebuilt, prev = list(frames[:at]), records[at - 1].hash
  for i in range(at, len(frames)):
    body = rec.decode_body(records[i].body_bytes)
    if records[i].kind == rec.STEP and i == at:
      body["loss"] = 123.0
    data = rec.encode_record(i, records[i].kind, prev, body)
    rebuilt.append(segments.frame(data))
    prev = rec.record_hash(data)
  err = _tampered_error(closed_log, header + b"".join(rebuilt))
  assert 6 <= err.index <= at


def test_a_removed_tree_head_is_detected(closed_log, tmp_path):
  dst = _copy_with_segment(closed_log, lh.segment_path(closed_log).read_bytes(), tmp_path)
  data = (closed_log / "heads.seg").read_bytes()
  _, frames = lh.split_frames(data)
  (dst / "heads.seg").write_bytes(data[: lh.HEADER] + b"".join(frames[:1] + frames[2:]))
  assert "does not follow" in str(_verify_error(dst))


def test_heads_signed_by_an_untrusted_key_are_refused(closed_log):
  with pytest.raises(LineageError, match="not trusted"):
    verify_lineage(closed_log, TrustStore.of([keys.generate("someone-else")]))


def test_a_torn_final_frame_verifies_up_to_the_last_complete_record_and_resumes_without_gap(
  tmp_path,
):
  d = tmp_path / "lineage"
  lh.write_log(d, KEY, 6, head_every=4, close=False)
  seg = lh.segment_path(d)
  _, frames = lh.split_frames(seg.read_bytes())
  for cut in (1, 3, len(frames[-1]) // 2, len(frames[-1]) - 1):
    copy = tmp_path / f"cut{cut}" / "lineage"
    (copy / "segments").mkdir(parents=True)
    (copy / "heads.seg").write_bytes((d / "heads.seg").read_bytes())
    (copy / "segments" / seg.name).write_bytes(seg.read_bytes()[:-cut])
    report = verify_lineage(copy, TRUST, require_closed=False)
    assert report.size == len(frames) - 1 and report.torn_bytes == len(frames[-1]) - cut
    writer, scan = open_for_resume(copy, KEY)
    assert scan.size == len(frames) - 1
    writer.append(lh.summary(6), lh.ids(6), lh.digests(6))
    writer.close()
    report = verify_lineage(copy, TRUST)
    steps = [b["step"] for _, _, b in segments.records(copy, kinds=(rec.STEP,))]
    assert report.closed and report.torn_bytes == 0 and steps == [1, 2, 3, 4, 5, 6]


def test_a_torn_tail_in_a_closed_log_is_an_error(closed_log):
  err = _tampered_error(closed_log, lh.segment_path(closed_log).read_bytes()[:-7])
  assert err.index == STEPS + 1


@pytest.mark.parametrize("fsync", FSYNC_POLICIES)
def test_every_fsync_policy_writes_a_verifiable_log(tmp_path, fsync):
  lh.write_log(tmp_path / "lineage", KEY, 3, fsync=fsync, head_every=2)
  assert verify_lineage(tmp_path, TRUST).closed


def test_an_unknown_fsync_policy_is_refused(tmp_path):
  with pytest.raises(LineageError, match="fsync policy"):
    LineageWriter.create(tmp_path / "lineage", KEY, lh.start_body(KEY), fsync="sometimes")


def test_segments_rotate_and_a_missing_segment_is_named(tmp_path):
  d = tmp_path / "lineage"
  lh.write_log(d, KEY, 10, segment_bytes=600)
  segs = sorted((d / "segments").glob("*.seg"))
  assert len(segs) > 2 and verify_lineage(tmp_path, TRUST).size == 12
  missing_first = int(segs[1].name.split(".")[0])
  segs[1].unlink()
  assert _verify_error(tmp_path).index == missing_first


def test_a_writer_error_surfaces_on_the_next_call_and_the_log_stays_intact(tmp_path):
  w = LineageWriter.create(tmp_path / "lineage", KEY, lh.start_body(KEY))
  w.append(lh.summary(1), lh.ids(1)[:2])  # summary rows point at 4 ids
  with pytest.raises(LineageError, match="example_index"):
    w.flush()
  w.abandon()
  assert verify_lineage(tmp_path, TRUST, require_closed=False).size == 1


def test_append_returns_before_the_record_is_written(tmp_path):
  w = LineageWriter.create(tmp_path / "lineage", KEY, lh.start_body(KEY))
  gate = threading.Event()
  w._submit(gate.wait)  # hold the writer thread
  t0 = time.perf_counter()
  w.append(lh.summary(1), lh.ids(1), lh.digests(1))
  elapsed = time.perf_counter() - t0
  assert logscan.scan(tmp_path / "lineage").size == 1
  gate.set()
  assert w.flush().size == 2 and elapsed < 1.0
  w.close()


_KILLED_WRITER = """
import sys
from aqgov.documents import _canonical as canonical
from aqgov.documents import _keys as keys
sys.path.insert(0, sys.argv[3])
import lineage_helpers as lh
from aqgov.lineage._writer import LineageWriter
key = keys.load_signing_key(sys.argv[1])
w = LineageWriter.create(sys.argv[2], key, lh.start_body(key), head_every=7, fsync="never")
step = 0
while True:
  step += 1
  w.append(lh.summary(step, batch=64), lh.ids(step, 64), lh.digests(step, 64))
  if step % 50 == 0:
    w.flush()
    print(step, flush=True)
"""


@pytest.mark.slow
def test_a_writer_killed_mid_write_leaves_a_log_that_verifies_and_resumes_without_gap_or_duplicate(
  tmp_path,
):
  key_path, pub_path = keys.write_keypair(KEY, tmp_path / "keys")
  lineage_dir = tmp_path / "lineage"
  proc = subprocess.Popen(
    [
      sys.executable,
      "-c",
      _KILLED_WRITER,
      str(key_path),
      str(lineage_dir),
      str(Path(__file__).parent),
    ],
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert int(proc.stdout.readline()) == 50
    time.sleep(0.05)  # the writer is somewhere inside its next records
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    proc.wait()
  report = verify_lineage(tmp_path, TrustStore.from_paths([pub_path]), require_closed=False)
  assert report.size >= 51 and not report.closed
  writer, scan = open_for_resume(lineage_dir, KEY)
  last = max(b["step"] for _, _, b in segments.records(lineage_dir, kinds=(rec.STEP,)))
  for step in range(last + 1, last + 4):
    writer.append(lh.summary(step, batch=64), lh.ids(step, 64), lh.digests(step, 64))
  writer.close()
  after = verify_lineage(tmp_path, TrustStore.from_paths([pub_path]))
  steps = [b["step"] for _, _, b in segments.records(lineage_dir, kinds=(rec.STEP,))]
  assert after.closed and after.size == scan.size + 4 and after.torn_bytes == 0
  assert steps == list(range(1, last + 4))


def test_a_log_written_at_schema_version_1_still_verifies_and_reads(tmp_path, monkeypatch):
  d = tmp_path / "v1" / "lineage"
  with monkeypatch.context() as m:
    m.setattr(rec, "VERSION", 1)  # the encoder as it was at version 1
    lh.write_log(d, KEY, 3)
  _, frames = lh.split_frames(lh.segment_path(d).read_bytes())
  assert {canonical.decode(lh.payload(f))["v"] for f in frames} == {1}
  records = list(segments.LogReader(d))
  report = verify_lineage(d, TRUST)
  assert report.size == 5 and report.closed
  view = rec.view_step(records[1].body)
  np.testing.assert_array_equal(
    view.applied_weights, view.weights
  )  # v1: applied as the policy said
  np.testing.assert_array_equal(view.applied_scale, np.ones(len(lh.GROUPS), np.float32))
  assert view.dropped == ()


def test_step_records_keep_what_was_applied_only_where_it_differs_from_the_policy(tmp_path):
  s = lh.summary(1)
  applied = s.weights * np.asarray([1.0, 0.0, 0.5], np.float32)
  ids = lh.ids(1)
  same = rec.step_body(s._replace(applied_weights=s.weights, applied_scale=np.ones(3)), ids)
  assert not {"applied_weights", "applied_scale", "dropped"} & set(same)
  body = rec.step_body(
    s._replace(
      applied_weights=applied,
      applied_scale=np.asarray([1.0, 0.0, 0.5], np.float32),
      dropped=np.asarray([0, 2, 0, 1], np.int8),
    ),
    ids,
  )
  assert "by_class" in body["applied_weights"]  # still one row per route class
  view = rec.view_step(canonical.decode(rec.encode_step_body(body)))
  np.testing.assert_array_equal(view.applied_weights, applied)
  np.testing.assert_array_equal(view.applied_norms[:, 1], 0)
  assert view.dropped == ((ids[1], "non-finite gradient"), (ids[3], "non-finite loss"))
  bad = dict(body, dropped=[{"id": "nobody", "reason": "non-finite loss"}])
  with pytest.raises(LineageError, match="dropped names example 'nobody'"):
    rec.check_step(bad, 1)
