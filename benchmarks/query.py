"""Label queries over a large lineage: the signed index against a scan of the log.

    python benchmarks/query.py [--quick] [--records N] [--batch 8] [--ids 50000] [--no-scan]

Synthesises a governed log of N step records (B examples each, drawn from a pool of credentialed
example ids whose labels come from a signed manifest of the sample `acme-data` taxonomy), builds
the signed index (`aqgov lineage index`) and times, as medians of repeats:

- build: building and signing the index from the log (records per second);
- where (index): `query(run, "core", where="sensitivity_tier >= 2 and 'EU' in jurisdictions")`
  answered from the index, every file it reads hashed against the signed digests;
- where + sort norm top 10 (index);
- where (scan): the same query with the index ignored (the log's signed part decoded), and the
  ratio of the two (skipped with --no-scan).

The target is a `--where` query over 1M step records in at most 2 s.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from aqgov.credentials._manifest import MANIFEST, issue_manifest
from aqgov.documents import _keys as keys
from aqgov.documents._document_type import write
from aqgov.examples import sample
from aqgov.lineage import _bodies as bodies
from aqgov.lineage._index import build_index
from aqgov.lineage._query import query
from aqgov.lineage._summary import StepSummary
from aqgov.lineage._writer import LineageWriter

GROUPS = ("embed", "core", "adapter", "head")
WHERE = "sensitivity_tier >= 2 and 'EU' in jurisdictions"


def synthesise(run: Path, records: int, batch: int, n_ids: int, seed: int = 0) -> keys.SigningKey:
  """A closed log of `records` step records whose example ids a signed manifest credentials."""
  rng = np.random.default_rng(seed)
  authority = keys.generate("acme-data")
  taxonomy = sample.taxonomies()["acme-data"]
  flags = ["EU", "US", "UK"]
  examples = [
    {
      "id": f"ex-{i:07d}",
      "content": f"example {i}",
      "labels": {
        "acme-data": {
          "license_class": "cc-by",
          "sensitivity_tier": int(rng.integers(0, 4)),
          "jurisdictions": [f for f in flags if rng.random() < 0.4],
          "source": "synthetic",
        }
      },
    }
    for i in range(n_ids)
  ]
  manifest = issue_manifest(authority, taxonomy, examples)
  mpath = write(MANIFEST, manifest.document, run / "manifests" / f"{manifest.id}.signed")
  ref = bodies.DocRef(
    "credential-manifest",
    manifest.id,
    hashlib.sha256(mpath.read_bytes()).hexdigest(),
    f"manifests/{mpath.name}",
  )
  key = keys.generate("run")
  (run / "keys").mkdir(parents=True, exist_ok=True)
  (run / "keys" / "run.pub").write_text(keys.public_key_json(key.public))
  start = bodies.run_start_body(
    run_id="bench",
    signer=key.key_id,
    groups=GROUPS,
    classes=["base", "quarantine", "blocked"],
    manifests=[ref],
    trust=[authority.key_id],
  )
  table = np.asarray([[1, 1, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]], np.float32)
  writer = LineageWriter.create(run / "lineage", key, start, head_every=4096, fsync="never")
  ids = [e["id"] for e in examples]
  for s in range(1, records + 1):
    pick = rng.integers(0, n_ids, batch)
    rc = rng.integers(0, 3, batch).astype(np.int32)
    writer.append(
      StepSummary(
        np.int32(s),
        np.arange(batch, dtype=np.int32),
        rc,
        table[rc],
        rng.random((batch, len(GROUPS)), dtype=np.float32),
        np.float32(0.5),
        np.zeros((len(GROUPS), 8), np.float32),
        {},
        (),
      ),
      [ids[i] for i in pick],
    )
  writer.close()
  return key


def timed(fn, repeats: int) -> tuple[float, object]:
  times, out = [], None
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--records", type=int, default=20_000)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--ids", type=int, default=20_000)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--quick", action="store_true", help="A small log (a smoke test).")
  ap.add_argument("--no-scan", action="store_true", help="Skip the scan (slow on large logs).")
  args = ap.parse_args(argv)
  if args.quick:
    args.records, args.ids, args.repeats = 500, 2000, 1
  tmp = Path(tempfile.mkdtemp(prefix="aqgov-query-bench-"))
  try:
    run = tmp / "run"
    t0 = time.perf_counter()
    key = synthesise(run, args.records, args.batch, args.ids)
    made = time.perf_counter() - t0
    t0 = time.perf_counter()
    payload = build_index(run, key)
    build = time.perf_counter() - t0
    t_where, res = timed(lambda: query(run, "core", where=WHERE), args.repeats)
    assert res.source == "index", res.note
    t_top, _ = timed(lambda: query(run, "core", where=WHERE, sort="norm", top=10), args.repeats)
    rows = [
      ("records (steps) x batch", f"{args.records:,} x {args.batch} = {payload['rows']:,} rows"),
      ("synthesise log", f"{made:.1f} s"),
      ("build + sign index", f"{build:.2f} s ({args.records / build:,.0f} records/s)"),
      ("where (index)", f"{t_where:.3f} s -> {res.count:,} rows"),
      ("where + sort norm top 10 (index)", f"{t_top:.3f} s"),
    ]
    if not args.no_scan:
      t_scan, scanned = timed(lambda: query(run, "core", where=WHERE, use_index=False), 1)
      assert scanned.count == res.count
      rows.append(("where (scan of the log)", f"{t_scan:.3f} s"))
      rows.append(("scan / index", f"{t_scan / t_where:.1f}x"))
    print("| measure | value |\n|---|---|")
    for name, value in rows:
      print(f"| {name} | {value} |")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
