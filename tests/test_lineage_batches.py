"""The lineage writer hands steps to its thread in batches: order, abandon, heads and segments."""

from __future__ import annotations

import pytest

from aqgov.documents import _keys as keys
from aqgov.documents._keys import TrustStore
from aqgov.errors import LineageError
from aqgov.lineage import _bodies as bodies
from aqgov.lineage import _record as rec
from aqgov.lineage import _segments as segments
from aqgov.lineage._verify import verify_lineage
from aqgov.lineage._writer import LineageWriter

import lineage_helpers as lh

KEY = keys.generate("run")
TRUST = TrustStore.of([KEY])


@pytest.mark.parametrize("batch_steps", [1, 3])
def test_steps_handed_over_in_batches_keep_their_order_with_other_records(tmp_path, batch_steps):
  d = tmp_path / "lineage"
  w = LineageWriter.create(d, KEY, lh.start_body(KEY), fsync="never", batch_steps=batch_steps)
  for s in range(1, 6):
    w.append(lh.summary(s), lh.ids(s), lh.digests(s))
  w.append_record(rec.EVENT, bodies.event_body(step=5, events={}, time_s=0.0))
  assert w.flush().size == 7  # run-start, 5 steps, the event: nothing left pending
  w.append(lh.summary(6), lh.ids(6), lh.digests(6))
  w.append(lh.summary(7), lh.ids(7), lh.digests(7))
  w.abandon()  # steps still pending on the training thread are written too
  got = [(kind, body.get("step")) for _, kind, body in segments.records(d)]
  assert got == [
    (rec.RUN_START, None),
    *[(rec.STEP, s) for s in range(1, 6)],
    (rec.EVENT, 5),
    (rec.STEP, 6),
    (rec.STEP, 7),
  ]
  assert verify_lineage(d, TRUST, require_closed=False).size == 9


def test_a_writer_refuses_a_batch_of_no_steps(tmp_path):
  with pytest.raises(LineageError, match="batch_steps"):
    LineageWriter.create(tmp_path / "lineage", KEY, lh.start_body(KEY), batch_steps=0)


def test_a_batch_of_steps_spanning_heads_and_segments_verifies(tmp_path):
  d = tmp_path / "lineage"
  w = LineageWriter.create(
    d, KEY, lh.start_body(KEY), head_every=3, segment_bytes=2000, batch_steps=5, fsync="tree-head"
  )
  for s in range(1, 14):
    w.append(lh.summary(s), lh.ids(s), lh.digests(s))
  head = w.close()
  report = verify_lineage(d, TRUST)
  assert report.size == head.size == 15 and report.signed_size == 15
  assert len(list((d / "segments").iterdir())) > 2
  steps = [body["step"] for _, _, body in segments.records(d, kinds=(rec.STEP,))]
  assert steps == list(range(1, 14))


def test_steps_appended_from_another_thread_stay_in_order_while_this_one_flushes(tmp_path):
  import threading

  d = tmp_path / "lineage"
  w = LineageWriter.create(d, KEY, lh.start_body(KEY), fsync="never", batch_steps=3)

  def host_callback():  # as `GovernedRun.emit`'s ordered host callback appends
    for s in range(1, 41):
      w.append(lh.summary(s), lh.ids(s), lh.digests(s))

  t = threading.Thread(target=host_callback)
  t.start()
  while t.is_alive():
    w.flush()
  t.join()
  w.close()
  steps = [body["step"] for _, _, body in segments.records(d, kinds=(rec.STEP,))]
  assert steps == list(range(1, 41))
