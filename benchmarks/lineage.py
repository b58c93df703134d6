"""Lineage throughput and training-loop overhead.

    python benchmarks/lineage.py [--quick] [--records N] [--batch 256] [--groups 8]

Prints one table:
- write: "step" records per second through `LineageWriter` (host summaries, B examples, G groups,
  per-example SHA-256s, signed head every 1024 records, fsync="tree-head"), until close returns,
  and the writer thread's CPU time per record;
- verify: records per second of `verify_lineage` over that log (every check, consistency proofs),
  and records per CPU-second (all threads), which a busy shared machine distorts much less;
- raw SHA-256: how many of those records per second `hashlib.sha256` alone gets through on one
  thread and on a thread per core (hashlib releases the GIL), measured around the verify pass,
  and verify as a fraction of the all-cores figure: what hashing the frames would cost at best;
- the training-loop cost of lineage on a small jitted MLP step at batch B: the in-step summary
  (fingerprint and summary arrays) as % of the plain step, and the asynchronous writer as % of the
  step that already returns its summary (the target is <= 3%): the time `append` blocks the
  training thread, the writer thread's CPU time per step (the cost when a spare core exists, as
  on any accelerator host), and the wall-clock and process-CPU differences (which on a machine
  whose cores the step itself saturates include the competition for those cores). Variants are
  interleaved, ratios are medians.

The summary's contribution norms here are per-example losses times weights, a stand-in of the
right shape: computing real norms is the routing benchmark's business.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aqgov.documents import _keys as keys
from aqgov.documents._keys import TrustStore
from aqgov.lineage import _bodies as bodies
from aqgov.lineage._summary import StepSummary, summarize
from aqgov.lineage._verify import verify_lineage
from aqgov.lineage._writer import LineageWriter
from aqgov.policy._paths import tree_paths


def _host_summaries(
  n: int, batch: int, groups: int, classes: int = 6, seed: int = 0
) -> list[StepSummary]:
  rng = np.random.default_rng(seed)
  table = rng.random((classes, groups), dtype=np.float32).round(1)
  out = []
  for s in range(1, n + 1):
    rc = rng.integers(0, classes, batch).astype(np.int32)
    out.append(
      StepSummary(
        np.int32(s),
        np.arange(batch, dtype=np.int32),
        rc,
        table[rc],
        rng.random((batch, groups), dtype=np.float32),
        np.float32(rng.random()),
        rng.random((groups, 8), dtype=np.float32),
        {f"renyi2/g{g}": np.float32(rng.random()) for g in range(groups)},
        (),
      )
    )
  return out


def _sha256_records_per_s(chunks: list[bytes], threads: int) -> float:
  """Records per second `hashlib.sha256` hashes `chunks` at, split over `threads` threads."""

  def hash_all(part):
    for c in part:
      hashlib.sha256(c).digest()

  parts = [chunks[i::threads] for i in range(threads)]
  with ThreadPoolExecutor(threads) as pool:
    t0 = time.perf_counter()
    list(pool.map(hash_all, parts))
    return len(chunks) / (time.perf_counter() - t0)


def bench_sha256(directory: Path, records: int) -> dict[str, float]:
  """Raw SHA-256 throughput over record-sized chunks of the log's bytes, in records per second."""
  data = b"".join(p.read_bytes() for p in sorted((directory / "segments").iterdir()))
  size = len(data) // records
  chunks = [data[i : i + size] for i in range(0, size * records, size)]
  return {
    "sha_1": _sha256_records_per_s(chunks, 1),
    "sha_all": _sha256_records_per_s(chunks, os.cpu_count() or 1),
  }


def bench_write_verify(records: int, batch: int, groups: int, directory: Path) -> dict[str, float]:
  key = keys.generate("bench")
  summaries = _host_summaries(min(records, 64), batch, groups)
  ids = [f"shard-{i // 1000:03d}/example-{i:08d}" for i in range(batch)]
  digests = [os.urandom(32) for _ in range(batch)]
  start = bodies.run_start_body(
    run_id="bench", signer=key.key_id, groups=[f"g{g}" for g in range(groups)]
  )
  t0 = time.perf_counter()
  writer = LineageWriter.create(directory / "lineage", key, start, head_every=1024)
  for s in range(records):
    writer.append(summaries[s % len(summaries)]._replace(step=np.int32(s + 1)), ids, digests)
  writer.close()
  write_wall = time.perf_counter() - t0
  sha = [bench_sha256(directory / "lineage", records + 2)]
  c0, t0 = time.process_time(), time.perf_counter()
  report = verify_lineage(directory, TrustStore.of([key]))
  verify_wall, verify_cpu = time.perf_counter() - t0, time.process_time() - c0
  sha.append(bench_sha256(directory / "lineage", records + 2))
  size = sum(p.stat().st_size for p in (directory / "lineage" / "segments").iterdir())
  return {
    "write": records / write_wall,
    "write_cpu_us": writer.cpu_seconds / records * 1e6,
    "verify": report.size / verify_wall,
    "verify_per_cpu_s": report.size / verify_cpu,
    "record_bytes": size / report.size,
    **{k: statistics.mean(m[k] for m in sha) for k in sha[0]},
  }


def _mlp(batch: int, groups: int, width: int = 256):
  """A jitted MLP step with `groups` layers (one group each) and its summary-producing variant."""
  dims = [64] + [width] * (groups - 1) + [10]
  keys_ = jax.random.split(jax.random.key(0), groups)
  params = {
    f"layer{g}": {
      "w": jax.random.normal(keys_[g], (dims[g], dims[g + 1])) / np.sqrt(dims[g]),
      "b": jnp.zeros(dims[g + 1]),
    }
    for g in range(groups)
  }
  leaf_group = tuple(int(p.split("/")[0][5:]) for p in tree_paths(params))
  opt = optax.adam(1e-3)
  table = jnp.asarray(np.random.default_rng(1).random((6, groups), dtype=np.float32))

  def losses(p, x, y):
    h = x
    for g in range(groups):
      h = h @ p[f"layer{g}"]["w"] + p[f"layer{g}"]["b"]
      if g < groups - 1:
        h = jnp.tanh(h)
    return optax.softmax_cross_entropy_with_integer_labels(h, y)

  def plain(p, o, x, y, rc):
    loss, g = jax.value_and_grad(lambda p: jnp.mean(losses(p, x, y)))(p)
    u, o = opt.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  def governed(p, o, x, y, rc, step):
    (_, per), g = jax.value_and_grad(
      lambda p: (jnp.mean(per_example := losses(p, x, y)), per_example), has_aux=True
    )(p)
    u, o = opt.update(g, o, p)
    p = optax.apply_updates(p, u)
    w = table[rc]
    summary = summarize(
      step=step,
      example_index=jnp.arange(x.shape[0]),
      route_class=rc,
      weights=w,
      contribution_norms=w * per[:, None],
      loss=jnp.mean(per),
      params=p,
      leaf_group=leaf_group,
      key=0,
    )
    return p, o, summary

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, 64)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
  rc = jnp.asarray(rng.integers(0, 6, batch), jnp.int32)
  return params, opt.init(params), jax.jit(plain), jax.jit(governed), (x, y, rc)


def bench_overhead(
  batch: int, groups: int, steps: int, repeats: int, directory: Path
) -> dict[str, float]:
  params, opt_state, plain, governed, (x, y, rc) = _mlp(batch, groups)
  key = keys.generate("bench")
  ids = [f"example-{i:08d}" for i in range(batch)]
  digests = [os.urandom(32) for _ in range(batch)]

  def run_plain():
    p, o = params, opt_state
    for _ in range(steps):
      p, o, _ = plain(p, o, x, y, rc)
    jax.block_until_ready(p)

  appending = []

  def run_governed(writer):
    p, o = params, opt_state
    for s in range(steps):
      p, o, summary = governed(p, o, x, y, rc, s + 1)
      if writer is not None:
        t0 = time.perf_counter()
        writer.append(summary, ids, digests)
        appending.append(time.perf_counter() - t0)
    jax.block_until_ready(p)

  for fn in (run_plain, lambda: run_governed(None)):
    fn()  # compile and warm up
  wall = {"plain": [], "summary": [], "writer": []}
  cpu = {"plain": [], "summary": [], "writer": []}
  drain, writer_cpu = [], []
  for r in range(repeats):
    order = ("plain", "summary", "writer") if r % 2 == 0 else ("writer", "summary", "plain")
    for name in order:  # interleaved, so that load from elsewhere hits every variant alike
      writer = None
      if name == "writer":
        start = bodies.run_start_body(
          run_id=f"overhead{r}", signer=key.key_id, groups=[f"g{g}" for g in range(groups)]
        )
        writer = LineageWriter.create(directory / f"overhead{r}", key, start, head_every=1024)
      c0, t0 = time.process_time(), time.perf_counter()
      run_plain() if name == "plain" else run_governed(writer)
      wall[name].append(time.perf_counter() - t0)
      if writer is not None:
        t1 = time.perf_counter()
        writer.close()
        drain.append(time.perf_counter() - t1)
        writer_cpu.append(writer.cpu_seconds / steps)
      cpu[name].append(time.process_time() - c0)

  def pct(d, a, b):
    return 100 * (statistics.median(x / y for x, y in zip(d[a], d[b], strict=True)) - 1)

  step_s = statistics.median(wall["summary"]) / steps
  return {
    "step_ms": statistics.median(wall["plain"]) / steps * 1e3,
    "summary_pct": pct(wall, "summary", "plain"),
    "writer_pct": pct(wall, "writer", "summary"),
    "writer_cpu_pct": pct(cpu, "writer", "summary"),
    "drain_ms": statistics.median(drain) * 1e3,
    "writer_thread_us": statistics.median(writer_cpu) * 1e6,
    "writer_thread_pct": 100 * statistics.median(writer_cpu) / step_s,
    "append_us": statistics.median(appending) * 1e6,
  }


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
  ap.add_argument("--records", type=int, default=20000)
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--groups", type=int, default=8)
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--repeats", type=int, default=5)
  args = ap.parse_args(argv)
  if args.quick:
    args.records, args.steps, args.repeats = 300, 20, 1
  with tempfile.TemporaryDirectory() as tmp:
    wv = bench_write_verify(args.records, args.batch, args.groups, Path(tmp) / "wv")
    over = bench_overhead(args.batch, args.groups, args.steps, args.repeats, Path(tmp))
  print(
    f"lineage benchmark: B={args.batch}, G={args.groups}, {args.records} records, jax {jax.__version__}, "
    f"{jax.devices()[0].platform}, {os.cpu_count()} cpu(s), load average {os.getloadavg()[0]:.1f}"
  )
  print("| metric | value |\n|---|---|")
  print(f"| record size | {wv['record_bytes'] / 1024:.1f} KiB |")
  print(
    f"| write | {wv['write']:,.0f} records/s (writer thread: {wv['write_cpu_us']:.0f} us CPU per record) |"
  )
  print(
    f"| verify | {wv['verify']:,.0f} records/s ({wv['verify_per_cpu_s']:,.0f} records per CPU-second) |"
  )
  print(
    f"| raw SHA-256 of the same records | {wv['sha_1']:,.0f} records/s on one thread, "
    f"{wv['sha_all']:,.0f} on {os.cpu_count()} threads |"
  )
  print(
    f"| verify / raw SHA-256 (all cores) | {wv['verify'] / wv['sha_all']:.2f} "
    f"(one thread: {wv['verify'] / wv['sha_1']:.2f}) |"
  )
  print(f"| plain MLP step (B={args.batch}, {args.groups} layers) | {over['step_ms']:.2f} ms |")
  print(
    f"| in-step summary (fingerprint + arrays) | {over['summary_pct']:+.1f}% of the plain step |"
  )
  print(f"| `append` on the training thread | {over['append_us']:.0f} us per step |")
  print(
    f"| writer thread CPU | {over['writer_thread_us']:.0f} us per step = {over['writer_thread_pct']:.1f}% "
    "of the step |"
  )
  print(
    f"| async writer on the training loop (wall) | {over['writer_pct']:+.1f}% of the step with summary |"
  )
  print(
    f"| async writer, process CPU time | {over['writer_cpu_pct']:+.1f}% of the step with summary |"
  )
  print(f"| writer drain at close | {over['drain_ms']:.1f} ms |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
