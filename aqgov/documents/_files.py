"""Files: atomic writes (a reader sees the old file or the whole new one) and reads with typed errors."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
  """Make a rename or creation inside directory `path` durable."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
  """Write `data` to `path` through a temporary file, fsync and rename (then fsync the directory)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as fh:
      fh.write(data)
      fh.flush()
      os.fsync(fh.fileno())
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  fsync_dir(path.parent)
  return path


def read_bytes(path: str | os.PathLike, error: type[Exception], what: str) -> bytes:
  """The bytes of `path`, or `error` saying that the `what` file does not exist or cannot be read."""
  try:
    return Path(path).read_bytes()
  except FileNotFoundError:
    raise error(f"{what} file {path} does not exist") from None
  except OSError as exc:
    raise error(f"cannot read {what} file {path}: {exc}") from None


def read_text(path: str | os.PathLike, error: type[Exception], what: str) -> str:
  """The UTF-8 text of `path` (see `read_bytes`)."""
  try:
    return read_bytes(path, error, what).decode("utf-8")
  except UnicodeDecodeError:
    raise error(f"{what} file {path} is not UTF-8 text") from None
