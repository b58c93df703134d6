"""Shared helpers for the lineage tests: synthetic summaries, small logs, frame surgery."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from aqgov.documents import _keys as keys
from aqgov.examples import task as et
from aqgov.lineage import _bodies as bodies
from aqgov.lineage import _record as rec
from aqgov.lineage import _segments as segments
from aqgov.lineage._heads import LogHead
from aqgov.lineage._summary import StepSummary
from aqgov.lineage._writer import LineageWriter, open_for_resume

GROUPS = ("embed", "block", "head")
HEADER = 16  # segment header: magic + first seq


def summary(step: int, batch: int = 4, groups: int = len(GROUPS), seed: int = 0) -> StepSummary:
  """A host-side StepSummary with deterministic, step-dependent contents."""
  rng = np.random.default_rng(seed * 100003 + step)
  table = np.asarray([[1.0] * groups, [0.0] + [1.0] * (groups - 1), [0.5] * groups], np.float32)
  rc = rng.integers(0, 3, batch).astype(np.int32)
  return StepSummary(
    np.int32(step),
    np.arange(batch, dtype=np.int32),
    rc,
    table[rc],
    rng.random((batch, groups), dtype=np.float32),
    np.float32(rng.random()),
    rng.random((groups, 8), dtype=np.float32),
    {"renyi2/block": np.float32(rng.random())},
    (),
  )


def ids(step: int, batch: int = 4) -> list[str]:
  return [f"ex-{step}-{i}" for i in range(batch)]


def digests(step: int, batch: int = 4) -> list[bytes]:
  return [rec.record_hash(f"content {step} {i}".encode()) for i in range(batch)]


def start_body(key: keys.SigningKey, run_id: str = "run-1") -> dict:
  return bodies.run_start_body(run_id=run_id, signer=key.key_id, groups=GROUPS, task="x:y")


def write_log(
  lineage_dir: Path,
  key: keys.SigningKey,
  steps: int,
  *,
  head_every: int = 5,
  close: bool = True,
  fsync: str = "never",
  segment_bytes: int = 64 << 20,
  run_id: str = "run-1",
) -> LogHead:
  """A log of run-start + `steps` step records (+ run-end when closed)."""
  w = LineageWriter.create(
    lineage_dir,
    key,
    start_body(key, run_id),
    head_every=head_every,
    fsync=fsync,
    segment_bytes=segment_bytes,
  )
  for s in range(1, steps + 1):
    w.append(summary(s), ids(s), digests(s))
  if close:
    return w.close()
  head = w.flush()
  w.abandon()
  return head


def publish_key(run_dir: Path, key: keys.SigningKey) -> Path:
  """`RUN/keys/NAME.pub` for `key` (public half only): where readers find the key that checks the run's heads."""
  out = Path(run_dir) / "keys"
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"{key.name}.pub"
  path.write_text(keys.public_key_json(key.public))
  return path


def sign_head(lineage_dir: Path, key: keys.SigningKey) -> LogHead:
  """Reopen an open log with the run key and sign a head covering every record now in it (whatever their
  bodies hold): what a run-key holder, or a buggy writer, can do."""
  w, _ = open_for_resume(lineage_dir, key, fsync="never")
  try:
    return w.flush(sign_head=True)
  finally:
    w.abandon()


def segment_path(lineage_dir: Path) -> Path:
  segs = sorted((lineage_dir / "segments").glob("*.seg"))
  assert len(segs) == 1, segs
  return segs[0]


def split_frames(data: bytes) -> tuple[bytes, list[bytes]]:
  """(header, complete frames) of a segment file."""
  frames, off = [], HEADER
  while off < len(data):
    n = struct.unpack_from("<I", data, off)[0]
    frames.append(data[off : off + 4 + n + 32])
    off += 4 + n + 32
  return data[:HEADER], frames


def payload(frame: bytes) -> bytes:
  return frame[4:-32]


def first_difference(original: list[bytes], tampered: list[bytes]) -> int:
  """The first position where two frame sequences differ."""
  for i, (a, b) in enumerate(zip(original, tampered, strict=False)):
    if a != b:
      return i
  return min(len(original), len(tampered))


def forge(seq: int, prev: bytes, step: int) -> bytes:
  """A well-formed step record frame that was never written by the run."""
  body = rec.encode_step_body(rec.step_body(summary(step, seed=7), ids(step), digests(step)))
  return segments.frame(rec.encode_record(seq, rec.STEP, prev, body))


def examples_file(path: Path, n: int = 48, seed: int = 0) -> list[dict]:
  """`n` examples for the example task, also written to `path` as JSONL."""
  rng = np.random.default_rng(seed)
  data = [
    et.example(f"ex-{i:03d}", rng.normal(size=4), int(rng.integers(3)), int(rng.integers(3)))
    for i in range(n)
  ]
  path.write_text("".join(json.dumps(d) + "\n" for d in data))
  return data


def batches(data: list[dict], step: int, size: int = 8) -> list[dict]:
  """The batch for 1-based `step`: a fixed cyclic order, so a resumed loop can seek to it."""
  return [data[((step - 1) * size + j) % len(data)] for j in range(size)]


TASK = "aqgov.examples.task:make_task"


def make_run(
  run_dir: Path,
  data: list[dict],
  steps: int,
  *,
  checkpoint_every: int = 4,
  close: bool = True,
  **kw,
):
  """A governed run of the example task over `steps` batches of `data` (closed unless told not to)."""
  from aqgov.lineage._run import GovernedRun

  run = GovernedRun.start(
    run_dir, task=kw.pop("task", TASK), checkpoint_every=checkpoint_every, head_every=8, **kw
  )
  for s in range(1, steps + 1):
    run.step(batches(data, s))
  if close:
    run.close()
  return run


def trust_of(*run_dirs: Path):
  """Every public key the run directories hold."""
  from aqgov.documents._keys import TrustStore

  return TrustStore.from_paths(
    [p for d in run_dirs for p in sorted((Path(d) / "keys").glob("*.pub"))]
  )


def run_key_path(run_dir: Path) -> Path:
  """Where `GovernedRun.start` wrote the run's private key: its default key directory (never the run directory)."""
  from aqgov.lineage._trust import default_key_dir

  start = next(iter(segments.LogReader(Path(run_dir) / "lineage"))).body
  return default_key_dir(start["run_id"]) / "run.key"


def run_key(run_dir: Path):
  """The run's private key, from the key directory `GovernedRun.start` wrote it to (never the run directory)."""
  return keys.load_signing_key(run_key_path(run_dir))


GOVERNED_LM = {
  "seq_len": 16,
  "d_model": 16,
  "num_heads": 4,
  "num_blocks": 1,
  "adapter_dim": 4,
  "seed": 0,
}
# Keeps every weight as the policy set it (fallback 1.0) while recording an out-of-bounds event
# for the core at every step: something for the entropy and events views to show.
EVENTFUL_PROFILE = """
format = "aqgov.entropy-profile/1"
name = "eventful"
authority = "acme-data"
[[representation]]
path = "attention/blocks/*"
group = "core"
kind = "attention"
heads = 4
causal = true
[[representation]]
path = "representations/adapter"
group = "adapter"
kind = "features"
[[bound]]
group = "core"
metric = "attention_entropy"
high = 0.1
action = "reroute"
fallback = 1.0
duration = 1
[[bound]]
group = "adapter"
metric = "effective_rank"
low = 1.0
action = "escalate"
"""


def governed_run(base: Path, steps: int = 4, batch: int = 8):
  """A closed governed run of the sample language model under the sample authorities' policies and
  manifests (labels from credentials) and `EVENTFUL_PROFILE`; returns (run dir, authorities)."""
  from aqgov.documents._document_type import sign, write
  from aqgov.entropy._profile import PROFILE, EntropyProfile
  from aqgov.examples import sample
  from aqgov.examples.demo import create_authorities
  from aqgov.lineage._run import GovernedRun

  auth = create_authorities(base / "authorities")
  profile = write(
    PROFILE,
    sign(PROFILE, EntropyProfile.from_toml(EVENTFUL_PROFILE), auth.keys["acme-data"]),
    base / "authorities" / "profiles" / "eventful.signed",
  )
  run = GovernedRun.start(
    base / "run",
    task="aqgov.examples.tiny_lm:make_task",
    task_config=GOVERNED_LM,
    policies=auth.policies,
    profiles=[profile],
    manifests=auth.manifests,
    trust=auth.public_keys,
    checkpoint_every=2,
    head_every=2,
  )
  examples = sample.examples()
  for s in range(steps):
    run.step(examples[s * batch : (s + 1) * batch])
  run.close()
  return base / "run", auth
