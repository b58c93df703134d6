"""The one TOML writer (documents written as the TOML their `from_toml` reads back) and `loads_toml`.

Maps become `[tables]` (nested maps `[table.key]`), lists of maps `[[arrays of tables]]`; an
`InlineTable` is written `{key = value, ...}` where it stands. Strings are basic strings with
non-printable characters escaped; floats keep their `repr` (exact round trip).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from typing import Any

from aqgov.errors import AqgovError

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")


def loads_toml(text: str, error: type[AqgovError], what: str) -> dict[str, Any]:
  """The table parsed from TOML `text`; `error` (message prefixed by `what`) when it is not valid TOML."""
  try:
    return tomllib.loads(text)
  except tomllib.TOMLDecodeError as exc:
    raise error(f"{what} is not valid TOML ({exc}); fix the syntax at that line") from None
  except RecursionError:
    raise error(f"{what} nests arrays or tables too deeply to be parsed; flatten it") from None


class InlineTable(dict):
  """A map written as an inline table `{key = value}` rather than as a `[table]`."""


def _string(s: str) -> str:
  out = s.replace("\\", "\\\\").replace('"', '\\"')
  return '"' + "".join(c if c.isprintable() else f"\\U{ord(c):08x}" for c in out) + '"'


def _key(k: str) -> str:
  return k if _BARE_KEY.match(k) else _string(k)


def toml_value(value: Any) -> str:
  """One TOML value: bool, int, float, str, list (of values) or inline table."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, int):
    return str(value)
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, str):
    return _string(value)
  if isinstance(value, Mapping):
    return "{" + ", ".join(f"{_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
  if isinstance(value, (list, tuple)):
    return "[" + ", ".join(toml_value(v) for v in value) + "]"
  raise TypeError(f"{type(value).__name__} {value!r} has no TOML form")


def _is_table(value: Any) -> bool:
  return isinstance(value, Mapping) and not isinstance(value, InlineTable)


def _is_array_of_tables(value: Any) -> bool:
  return isinstance(value, (list, tuple)) and bool(value) and all(_is_table(v) for v in value)


def _table(
  lines: list[str], path: tuple[str, ...], table: Mapping[str, Any], header: str | None
) -> None:
  plain = [(k, v) for k, v in table.items() if not _is_table(v) and not _is_array_of_tables(v)]
  nested = len(plain) < len(table)
  if header is not None and (plain or not nested or header.startswith("[[")):
    lines += ["", header]
  lines += [f"{_key(k)} = {toml_value(v)}" for k, v in plain]
  for k, v in table.items():
    dotted = ".".join(_key(p) for p in path + (k,))
    if _is_table(v):
      _table(lines, path + (k,), v, f"[{dotted}]")
    elif _is_array_of_tables(v):
      for item in v:
        _table(lines, path + (k,), item, f"[[{dotted}]]")


def dumps_toml(doc: Mapping[str, Any]) -> str:
  """TOML text of `doc` (see the module docstring); keys keep their order."""
  lines: list[str] = []
  _table(lines, (), doc, None)
  return "\n".join(lines).lstrip("\n") + "\n"
