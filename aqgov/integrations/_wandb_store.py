"""Reading an offline W&B run: its transaction log (`run-<id>.wandb`), history rows and config.

wandb keeps every run's records in a LevelDB-style log: a 7-byte file header (":W&B", magic
0xBEE1, version), then 32 KiB blocks of chunks, each with a CRC-32, a length and a type (full,
first, middle, last). A record is a `wandb_internal_pb2.Record` protobuf. wandb 0.31 ships no
Python reader of it, so this module reads it with the protobuf classes wandb itself ships.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from aqgov.errors import IntegrationError

_FILE_HEADER = struct.Struct("<4sHB")
_CHUNK_HEADER = struct.Struct("<IHB")
_IDENT, _MAGIC = b":W&B", 0xBEE1
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


class LoggedRun(NamedTuple):
  """What an offline W&B run logged: history rows by step, the config and the summary."""

  path: Path
  history: dict[int, dict[str, Any]]
  config: dict[str, Any]
  summary: dict[str, Any]


def find_store(wandb_dir: str | os.PathLike) -> Path:
  """The `.wandb` file of a run directory, or of the latest run under a `WANDB_DIR`."""
  d = Path(wandb_dir)
  if d.is_file() and d.suffix == ".wandb":
    return d
  for candidate in (d, d / "latest-run", d / "wandb" / "latest-run"):
    found = sorted(candidate.glob("*.wandb")) if candidate.is_dir() else []
    if found:
      return found[-1]
  raise IntegrationError(
    f"no W&B run log (run-<id>.wandb) in {d}, {d}/latest-run or {d}/wandb/latest-run; "
    "pass the offline run directory (wandb/offline-run-...)"
  )


def _chunks(data: bytes, path: Path) -> Iterator[tuple[int, bytes]]:
  if len(data) < _FILE_HEADER.size:
    raise IntegrationError(f"{path} is too short to be a W&B run log")
  ident, magic, _ = _FILE_HEADER.unpack_from(data)
  if ident != _IDENT or magic != _MAGIC:
    raise IntegrationError(f"{path} is not a W&B run log (bad header); pass the run's .wandb file")
  off = _FILE_HEADER.size
  while off + _CHUNK_HEADER.size <= len(data):
    left = _BLOCK - off % _BLOCK
    if left < _CHUNK_HEADER.size:
      off += left
      continue
    crc, n, kind = _CHUNK_HEADER.unpack_from(data, off)
    if n == 0 and kind == 0:  # zero padding at the end of a block
      off += left
      continue
    chunk = data[off + _CHUNK_HEADER.size : off + _CHUNK_HEADER.size + n]
    if len(chunk) < n:
      return  # a torn final write: the run is still open or crashed
    if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
      raise IntegrationError(
        f"{path}: the record at byte {off} fails its CRC; the W&B run log was altered or is "
        "corrupt, so what it logged cannot be checked"
      )
    yield kind, chunk
    off += _CHUNK_HEADER.size + n


def records(path: str | os.PathLike) -> Iterator[Any]:
  """Every `Record` protobuf of a `.wandb` file, in order."""
  from wandb.proto import wandb_internal_pb2 as pb

  path = Path(path)
  buf = b""
  for kind, chunk in _chunks(path.read_bytes(), path):
    buf = chunk if kind in (_FULL, _FIRST) else buf + chunk
    if kind in (_FULL, _LAST):
      record = pb.Record()
      record.ParseFromString(buf)
      yield record
      buf = b""


def _key(item: Any) -> str:
  return item.key or "/".join(item.nested_key)


def read_run(wandb_dir: str | os.PathLike) -> LoggedRun:
  """The history, config and summary an offline W&B run logged (see `find_store` for `wandb_dir`)."""
  path = find_store(wandb_dir)
  history: dict[int, dict[str, Any]] = {}
  config: dict[str, Any] = {}
  summary: dict[str, Any] = {}
  for r in records(path):
    kind = r.WhichOneof("record_type")
    if kind == "history":
      row = {_key(i): json.loads(i.value_json) for i in r.history.item}
      step = (
        int(r.history.step.num)
        if r.history.HasField("step")
        else int(row.get("_step", len(history)))
      )
      history.setdefault(step, {}).update(row)
    elif kind == "config":
      for i in r.config.update:
        config[_key(i)] = json.loads(i.value_json)
    elif kind == "summary":
      for i in r.summary.update:
        summary[_key(i)] = json.loads(i.value_json)
  return LoggedRun(path, history, config, summary)
