"""The sketch store: each step's per-example gradient sketches, beside the lineage, bound to it.

    RUN/sketches/<first record seq, 12 digits>.skb   header b"AQGOVSK1" + u64 first seq, then frames

A step whose summary carries sketches ([B, G, dim], see `aqgov.routing.SketchSpec`) gets one
*block*: the canonical msgpack of `{"seq", "step", "dtype", "shape", "data"}` (the record index of
its step record, the step number, the sketch rows of the batch's real examples as raw
little-endian bytes). Blocks are framed as lineage segments are (`u32 length | payload |
SHA-256(payload)`) and a new chunk file starts every `chunk_steps` blocks. The step record's
`sketch` field holds the block's SHA-256 (with the spec and the chunk's name), so a block is as
tamper-evident as the record: the record is chained, in the Merkle tree and under signed heads,
and `verify_lineage` recomputes each block's digest when the store is present. The block is
written before its record, so a record never names a block that is not on disk; a block whose
record was never written (a crash in between) is ignored, as is any block past the signed part.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from aqgov.documents import _canonical as canonical
from aqgov.errors import LineageError
from aqgov.lineage._segments import HEADER, frame, frames, read_header, write_all

SKETCH_MAGIC = b"AQGOVSK1"
DIRNAME = "sketches"
SUFFIX = ".skb"


class SketchBlock(NamedTuple):
  """One step's sketches as stored: [B, G, dim] rows of the batch's real examples."""

  seq: int
  step: int
  sketch: np.ndarray
  sha256: bytes


def chunk_name(first_seq: int) -> str:
  return f"{first_seq:012d}{SUFFIX}"


def encode_block(seq: int, step: int, sketch: np.ndarray) -> bytes:
  """Canonical bytes of a block (`sketch` keeps its dtype: bfloat16, float16 or float32)."""
  a = np.ascontiguousarray(sketch)
  data = a.view(f"u{a.dtype.itemsize}").astype(f"<u{a.dtype.itemsize}").tobytes()
  return canonical.encode(
    {
      "seq": int(seq),
      "step": int(step),
      "dtype": a.dtype.name,
      "shape": list(a.shape),
      "data": data,
    }
  )


def decode_block(payload: bytes, digest: bytes, where: str) -> SketchBlock:
  try:
    b = canonical.decode(bytes(payload))
    dtype = jnp.dtype(b["dtype"])
    shape = tuple(int(d) for d in b["shape"])
    raw = np.frombuffer(b["data"], dtype=f"<u{dtype.itemsize}").reshape(shape)
    return SketchBlock(int(b["seq"]), int(b["step"]), raw.view(dtype), digest)
  except Exception as exc:  # a malformed block is an altered store, never a traceback
    raise LineageError(
      f"{where}: not a sketch block ({exc}); the sketch store was altered"
    ) from None


class SketchStore:
  """Appends sketch blocks to `RUN/sketches/` (one writer, the lineage writer's thread)."""

  def __init__(self, directory: str | os.PathLike, *, chunk_steps: int = 256, fsync: bool = True):
    if chunk_steps < 1:
      raise LineageError(f"chunk_steps must be at least 1, got {chunk_steps}")
    self.dir = Path(directory)
    self.chunk_steps, self.fsync = int(chunk_steps), fsync
    self._fd: int | None = None
    self._name = ""
    self._blocks = 0

  def append(self, seq: int, step: int, sketch: np.ndarray) -> dict:
    """Write the block of step record `seq`; returns the record's `sketch` field (less the spec)."""
    payload = encode_block(seq, step, sketch)
    if self._fd is None or self._blocks >= self.chunk_steps:
      self._open(seq)
    write_all(self._fd, frame(payload))
    if self.fsync:
      os.fsync(self._fd)
    self._blocks += 1
    return {"sha256": hashlib.sha256(payload).digest(), "chunk": self._name}

  def _open(self, seq: int) -> None:
    self.close()
    self.dir.mkdir(parents=True, exist_ok=True)
    self._name = chunk_name(seq)
    fd = os.open(self.dir / self._name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    write_all(fd, HEADER.pack(SKETCH_MAGIC, seq))
    self._fd, self._blocks = fd, 0

  def close(self) -> None:
    if self._fd is not None:
      if self.fsync:
        os.fsync(self._fd)
      os.close(self._fd)
      self._fd = None


def sketch_rows(summary_sketch: Any, example_index: Any) -> np.ndarray:
  """The host copy of a summary's sketches, real rows only (`example_index >= 0`)."""
  sk = np.asarray(summary_sketch)
  keep = np.asarray(example_index) >= 0
  return sk if keep.all() else sk[keep]


def record_field(stored: Mapping[str, Any], sketch: np.ndarray) -> dict:
  """The step record's `sketch` field: block digest, chunk name, dim and dtype (sorted keys)."""
  return {
    "chunk": stored["chunk"],
    "dim": int(sketch.shape[-1]),
    "dtype": sketch.dtype.name,
    "sha256": stored["sha256"],
  }


def store_dir(run_dir: str | os.PathLike) -> Path:
  return Path(run_dir) / DIRNAME


def read_blocks(run_dir: str | os.PathLike) -> dict[int, SketchBlock]:
  """Every complete block in the store, by record seq (a later block for a seq replaces none:
  two blocks for one record mean the store was altered). Frame digests are checked."""
  out: dict[int, SketchBlock] = {}
  for path in sorted(store_dir(run_dir).glob(f"*{SUFFIX}")):
    data = path.read_bytes()
    first = read_header(data, path, SKETCH_MAGIC, True)
    if first is None:
      continue
    gen = frames(data, path, "sketch block", 0, True)
    for k, payload, digest in gen:
      block = decode_block(payload, digest, f"{path.name} block {k}")
      if block.seq in out and out[block.seq].sha256 != block.sha256:
        raise LineageError(
          f"{path.name}: two different sketch blocks for record {block.seq}; the store was altered",
          index=block.seq,
        )
      out[block.seq] = block
  return out


def check_blocks(run_dir: str | os.PathLike, steps: Iterator[tuple[int, Mapping[str, Any]]]) -> int:
  """Raise `LineageError` unless every step record's `sketch` names a block in the store whose
  digest it records; returns how many were checked. `steps` yields (record index, step body)."""
  blocks = read_blocks(run_dir)
  n = 0
  for index, body in steps:
    field = body.get("sketch")
    if field is None:
      continue
    block = blocks.get(index)
    if block is None:
      raise LineageError(
        f"record {index} (step {body['step']}) names sketch block in {field['chunk']} but the "
        "sketch store holds none for it: the store was cut or altered",
        index=index,
      )
    if block.sha256 != bytes(field["sha256"]) or block.step != body["step"]:
      raise LineageError(
        f"record {index}: the sketch block of step {body['step']} in {field['chunk']} hashes to "
        f"{block.sha256.hex()[:16]}... but the record says {bytes(field['sha256']).hex()[:16]}...: "
        "the sketch store was altered",
        index=index,
      )
    n += 1
  return n
