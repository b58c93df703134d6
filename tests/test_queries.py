"""Lineage queries over credential labels, route classes and examples, the entropy and events
views, and the signed index that makes them fast, all held to a brute-force scan of the records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from aqgov.cli import main
from aqgov.documents import _keys as keys
from aqgov.errors import LineageError
from aqgov.lineage import _history as hist
from aqgov.lineage import _record as rec
from aqgov.lineage import build_index, entropy, events, query, verify_lineage
from aqgov.lineage._labels import run_labels
from aqgov.lineage._segments import records
from aqgov.lineage._writer import open_for_resume
from aqgov.policy._conditions import compile_expr

import lineage_helpers as lh
from benchmark_helpers import quick_run

EXPRESSIONS = (
  "sensitivity_tier >= 2",
  "sensitivity_tier < 2 and license_class != 'unknown'",
  "'EU' in jurisdictions",
  "personal_data == 'yes' or lawful_basis == 'consent'",
  "not (personal_data == 'no')",
  "acme-data.source == 'wiki'",
  "true",
)


@pytest.fixture(scope="module")
def run_dir(governed_run) -> Path:
  return governed_run[0]


@pytest.fixture(scope="module")
def indexed(run_dir, tmp_path_factory) -> Path:
  """A copy of the run with a signed index."""
  d = tmp_path_factory.mktemp("indexed") / "run"
  shutil.copytree(run_dir, d)
  build_index(d, lh.run_key(run_dir))
  return d


def brute_force(run_dir: Path, group: str | None, where: str | None) -> list[tuple]:
  """(record, example id, group, weight, norm) of every row, read record by record."""
  ldir = run_dir / "lineage"
  scan, history = hist.load(ldir)
  start = scan.bodies[0]
  labels = run_labels(run_dir, start)
  condition = None if where is None else compile_expr(where, labels.space)
  out = []
  for index, _, body in records(ldir, kinds=(rec.STEP,), stop=history.size):
    if not history.effective(index):
      continue
    view = rec.view_step(body, index, len(start["groups"]))
    for r, example in enumerate(view.row_ids):
      if condition is not None:
        one = labels.space.encode_numpy([labels.labels_of(example)])
        if not bool(np.asarray(condition(one))[0]):
          continue
      for g, name in enumerate(start["groups"]):
        if (group is None or name == group) and view.weights[r, g] > 0:
          out.append(
            (
              index,
              example,
              name,
              float(view.weights[r, g]),
              float(view.contribution_norms[r, g]),
            )
          )
  return out


def as_tuples(result) -> list[tuple]:
  return [(m.record, m.example_id, m.group, m.weight, m.contribution_norm) for m in result.rows]


@pytest.mark.parametrize("where", EXPRESSIONS)
def test_a_where_query_equals_a_brute_force_scan_of_the_records(run_dir, indexed, where):
  for group in ("core", "adapter", None):
    expected = sorted(brute_force(run_dir, group, where))
    scanned = query(run_dir, group, where=where)
    from_index = query(indexed, group, where=where)
    assert scanned.source == "scan" and from_index.source == "index"
    assert sorted(as_tuples(scanned)) == expected == sorted(as_tuples(from_index))
    assert scanned.count == len(expected)


@given(
  where=st.sampled_from((None, *EXPRESSIONS)),
  group=st.sampled_from((None, "embed", "core", "adapter", "head")),
  step=st.sampled_from((None, 1, 3)),
  sort=st.sampled_from((None, "norm", "weight", "step")),
  top=st.sampled_from((None, 0, 1, 5)),
)
def test_any_query_is_the_brute_force_rows_filtered_sorted_and_cut(
  run_dir, indexed, where, group, step, sort, top
):
  ldir = run_dir / "lineage"
  rows = brute_force(run_dir, group, where)
  if step is not None:
    steps = {i: int(b["step"]) for i, _, b in records(ldir, kinds=(rec.STEP,))}
    rows = [r for r in rows if steps[r[0]] == step]
  got = query(indexed, group, where=where, step=step, sort=sort, top=top)
  assert got.count == len(rows)
  if sort in ("norm", "weight"):
    k = 4 if sort == "norm" else 3
    want = sorted(r[k] for r in rows)[::-1][: len(got.rows)]
    assert [t[k] for t in as_tuples(got)] == want
  else:  # log order: record, then batch row, then group (steps grow with records)
    assert as_tuples(got) == rows[:top]
  assert len(got.rows) == (len(rows) if top is None else min(top, len(rows)))


def test_sensitive_examples_reach_only_the_adapter(run_dir):
  assert query(run_dir, "core", where="sensitivity_tier >= 2").count == 0
  adapter = query(run_dir, "adapter", where="sensitivity_tier >= 2")
  assert adapter.count > 0 and {m.group for m in adapter.rows} == {"adapter"}


def test_route_classes_are_named_and_a_class_is_selected_by_its_name(run_dir):
  start = next(iter(lh.segments.LogReader(run_dir / "lineage"))).body
  every = query(run_dir, "adapter")
  for m in every.rows:
    assert m.route_class_name == start["classes"][m.route_class]
  name = every.rows[0].route_class_name
  by_name = query(run_dir, "adapter", route_class=name)
  assert by_name.rows == tuple(m for m in every.rows if m.route_class_name == name)
  with pytest.raises(LineageError, match="not one of this run's"):
    query(run_dir, "adapter", route_class="no-such-class")


def test_an_example_query_lists_each_group_it_reached_at_each_step(run_dir):
  example = query(run_dir, "head").rows[0].example_id
  rows = query(run_dir, example=example).rows
  assert rows and {m.example_id for m in rows} == {example}
  assert sorted((m.record, m.group) for m in rows) == sorted(
    (r[0], r[2]) for r in brute_force(run_dir, None, None) if r[1] == example
  )
  assert query(run_dir, example="never-seen").rows == ()


def test_sort_by_norm_with_top_gives_the_largest_contributions_first(run_dir):
  every = query(run_dir, "head")
  top = query(run_dir, "head", sort="norm", top=3)
  norms = sorted((m.contribution_norm for m in every.rows), reverse=True)
  assert [m.contribution_norm for m in top.rows] == norms[:3] and top.count == every.count


def test_cli_query_prints_rows_or_none_and_json(run_dir):
  runner = CliRunner()
  none = runner.invoke(
    main, ["lineage", "query", str(run_dir), "--group", "core", "--where", "sensitivity_tier >= 2"]
  )
  assert none.exit_code == 0 and none.stdout.strip() == "none"
  rows = runner.invoke(
    main,
    ["lineage", "query", str(run_dir), "--group", "adapter", "--where", "sensitivity_tier >= 2"]
    + ["--sort", "norm", "--top", "2", "--json"],
  )
  assert rows.exit_code == 0, rows.output
  lines = [json.loads(x) for x in rows.stdout.splitlines()]
  assert len(lines) == 2 and all(x["group"] == "adapter" for x in lines)
  table = runner.invoke(main, ["lineage", "query", str(run_dir), "--group", "adapter"])
  assert "scanned the signed part of the log" in table.stderr
  bad = runner.invoke(main, ["lineage", "query", str(run_dir), "--where", "tier >= 2"])
  assert bad.exit_code == 1 and "no trusted taxonomy defines field 'tier'" in bad.stderr


def test_the_entropy_view_gives_each_measurement_with_the_profile_bounds(run_dir):
  rows = {(r.group, r.metric): r for r in entropy(run_dir)}
  core = rows["core", "attention_entropy"]
  assert core.steps == 4 and core.minimum <= core.mean <= core.maximum
  assert core.bounds == ("[-inf, 0.1] -> reroute",) and core.out_of_bounds == 4
  assert rows["adapter", "effective_rank"].bounds == ("[1, inf] -> escalate",)
  out = CliRunner().invoke(main, ["lineage", "entropy", str(run_dir), "--json"])
  assert out.exit_code == 0 and {json.loads(x)["metric"] for x in out.stdout.splitlines()} >= {
    "attention_entropy",
    "effective_rank",
  }
  table = CliRunner().invoke(main, ["lineage", "entropy", str(run_dir)])
  assert table.exit_code == 0 and "attention_entropy" in table.stdout


def test_the_events_view_gives_each_out_of_bounds_step(run_dir):
  evs = [e for e in events(run_dir) if e.kind == "out-of-bounds"]
  assert sorted({e.step for e in evs}) == [1, 2, 3, 4]
  assert {(e.group, e.action) for e in evs} == {("core", "reroute")}
  assert all("attention_entropy" in e.detail and "above high" in e.detail for e in evs)
  out = CliRunner().invoke(main, ["lineage", "events", str(run_dir)])
  assert out.exit_code == 0 and "out-of-bounds" in out.stdout and "reroute" in out.stdout


def test_the_signed_index_is_used_and_verify_checks_it(indexed, run_dir):
  report = verify_lineage(indexed, lh.trust_of(indexed))
  assert any(c.startswith("index index/") for c in report.checked)
  result = CliRunner().invoke(main, ["lineage", "query", str(indexed), "--group", "adapter"])
  assert result.exit_code == 0 and "answered from the signed index" in result.stderr


def _copy(src: Path, dst: Path) -> Path:
  shutil.copytree(src, dst)
  return dst


def test_a_tampered_index_is_refused_by_queries_and_fails_verify(indexed, tmp_path):
  d = _copy(indexed, tmp_path / "run")
  path = d / "index" / "reached-1.npy"  # "core": make every row reach it
  np.save(path, np.ones_like(np.load(path)))
  got = query(d, "core", where="sensitivity_tier >= 2")
  assert got.source == "scan" and "does not hash to the digest" in got.note and got.count == 0
  with pytest.raises(LineageError, match="index was altered"):
    verify_lineage(d, lh.trust_of(d))


def test_an_index_re_signed_over_altered_columns_fails_verify(indexed, tmp_path):
  """The run-key holder can sign any index; verify rebuilds it from the log and catches the lie."""
  import base64

  from aqgov.documents import _canonical as canonical
  from aqgov.lineage import _index as ix

  d = _copy(indexed, tmp_path / "run")
  path = d / "index" / "reached-1.npy"
  np.save(path, np.ones_like(np.load(path)))
  env = json.loads((d / "index" / "index.json").read_text())
  payload = canonical.decode(base64.b64decode(env["payload"]))
  payload["files"]["reached-1.npy"] = __import__("hashlib").sha256(path.read_bytes()).hexdigest()
  (d / "index" / "index.json").write_text(json.dumps(ix._signed(payload, lh.run_key(indexed))))
  assert query(d, "core", where="sensitivity_tier >= 2").source == "index"  # signed: used
  with pytest.raises(LineageError, match="does not hold what the log says"):
    verify_lineage(d, lh.trust_of(d))


def test_an_index_signed_by_another_key_is_not_used_and_not_built(indexed, tmp_path):
  d = _copy(indexed, tmp_path / "run")
  other = keys.generate("other")
  with pytest.raises(LineageError, match="not the run key"):
    build_index(d, other)
  from aqgov.lineage import _index as ix

  env = json.loads((d / "index" / "index.json").read_text())
  import base64

  from aqgov.documents import _canonical as canonical

  payload = canonical.decode(base64.b64decode(env["payload"]))
  (d / "index" / "index.json").write_text(json.dumps(ix._signed(payload, other)))
  got = query(d, "adapter")
  assert got.source == "scan" and "not signed by the run key" in got.note
  with pytest.raises(LineageError, match="not signed by the run key"):
    verify_lineage(d, lh.trust_of(d))


def test_a_stale_index_is_not_used_once_a_newer_head_is_signed(tmp_path):
  key = keys.generate("run")
  run = tmp_path / "run"
  lh.write_log(run / "lineage", key, 4, head_every=2, close=False)
  lh.publish_key(run, key)
  build_index(run, key)
  assert query(run, "block").source == "index"
  w, _ = open_for_resume(run / "lineage", key, fsync="never")
  w.append(lh.summary(5), lh.ids(5), lh.digests(5))
  w.flush(sign_head=True)
  w.abandon()
  got = query(run, "block")
  assert got.source == "scan" and "stale" in got.note
  assert 5 in {m.step for m in got.rows}


def test_the_quick_query_benchmark_prints_its_table():
  stdout = quick_run("query.py", timeout=600)
  for metric in ("| build + sign index |", "| where (index) |", "| scan / index |"):
    assert metric in stdout


def test_record_zero_is_read_alone_and_its_digest_checked(tmp_path):
  from aqgov.lineage._segments import first_record

  key = keys.generate("run")
  ldir = tmp_path / "run" / "lineage"
  lh.write_log(ldir, key, 2)
  assert first_record(ldir).body["run_id"] == "run-1"
  seg = lh.segment_path(ldir)
  data = bytearray(seg.read_bytes())
  data[lh.HEADER + 8] ^= 1
  seg.write_bytes(bytes(data))
  with pytest.raises(LineageError, match="record 0"):
    first_record(ldir)
  seg.write_bytes(bytes(data[: lh.HEADER + 2]))
  assert first_record(ldir) is None
