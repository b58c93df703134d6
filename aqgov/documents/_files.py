"""Files: atomic writes (a reader sees the old file or the whole new one) and reads with typed errors."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

_NAME = re.compile(r"[A-Za-z0-9._-]+\Z", re.ASCII)
PUBLIC_MODE = 0o644
PRIVATE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def check_name(name: object, error: type[Exception], what: str = "name") -> str:
  """`name` if it can be one file name inside a directory: `[A-Za-z0-9._-]+`, not starting with '.'
  (so never `.` or `..`, nor a hidden file)."""
  if not isinstance(name, str) or not _NAME.match(name) or name.startswith("."):
    raise error(
      f"{what} {name!r} cannot be a file name: use letters, digits, '.', '_' or '-', not starting "
      "with '.'"
    )
  return name


def child(
  directory: str | os.PathLike, name: str, error: type[Exception], what: str = "name"
) -> Path:
  """`directory/name` for a checked `name`: the path never leaves `directory`."""
  return Path(directory) / check_name(name, error, what)


def make_private_dir(path: str | os.PathLike) -> Path:
  """Create `path` and any missing parents with mode 0700 whatever the umask (existing ones stay as they are)."""
  path = Path(path)
  missing = []
  p = path
  while not p.exists():
    missing.append(p)
    p = p.parent
  for d in reversed(missing):
    d.mkdir(exist_ok=True)
    os.chmod(d, PRIVATE_DIR_MODE)
  if not path.is_dir():
    raise NotADirectoryError(f"{path} is not a directory")
  return path


def create_exclusive(path: str | os.PathLike, data: bytes, mode: int) -> Path:
  """Create the new file `path` holding `data` with exactly `mode`; refuses an existing file or a symlink."""
  path = Path(path)
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
  try:
    os.fchmod(fd, mode)
    with os.fdopen(fd, "wb") as fh:
      fd = -1
      fh.write(data)
      fh.flush()
      os.fsync(fh.fileno())
  finally:
    if fd >= 0:
      os.close(fd)
  return path


def fsync_dir(path: str | os.PathLike) -> None:
  """Make a rename or creation inside directory `path` durable."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes, mode: int = PUBLIC_MODE) -> Path:
  """Write `data` to `path` through a temporary file, fsync and rename (then fsync the directory).

  The file gets exactly `mode` (0644 by default) whatever the umask; a symlink at `path` is
  replaced, never followed.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    os.fchmod(fd, mode)
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
