"""Canonical bytes: deterministic msgpack so that signatures and hashes are over exact bytes.

Rules: maps have string keys, written in sorted (UTF-8 byte) order; integers lie in [-2^63, 2^64)
and use the smallest msgpack form; floats are always float64 (infinities as themselves, every NaN
as the one quiet NaN `0x7ff8000000000000`); strings are Unicode text (no lone surrogates); tuples
are lists; bytes stay bytes; no other types; values nest at most `MAX_DEPTH` deep. Decoding
rejects anything that would not re-encode to the same bytes.
"""

from __future__ import annotations

import hashlib
import math
import struct
from typing import Any

import msgpack

from aqgov.errors import AqgovError


class CanonicalError(AqgovError):
  """Bytes are not canonical, or a value has no canonical form."""


MAX_DEPTH = 256  # lists and maps nested deeper than this have no canonical form
NAN = struct.unpack(">d", bytes.fromhex("7ff8000000000000"))[0]  # the canonical NaN


def canonical_float(value: float) -> float:
  """`value` as a float64, every NaN (any sign or payload) replaced by the canonical quiet NaN."""
  return NAN if math.isnan(value) else float(value)


def _text(value: str) -> str:
  try:
    value.encode("utf-8")
  except UnicodeEncodeError:
    raise CanonicalError(
      f"string {value[:40]!r} holds a lone surrogate, which is not Unicode text; "
      "canonical strings are valid UTF-8"
    ) from None
  return value


def _normalise(value: Any, depth: int = 0) -> Any:
  if value is None or isinstance(value, (bool, bytes)):
    return value
  if isinstance(value, str):
    return _text(value)
  if isinstance(value, int):
    if not -(2**63) <= value < 2**64:
      raise CanonicalError(
        f"integer {value} is outside msgpack's range [-2^63, 2^64); write it as a string"
      )
    return int(value)
  if isinstance(value, float):
    return canonical_float(value)
  if isinstance(value, (list, tuple, dict)) and depth >= MAX_DEPTH:
    raise CanonicalError(
      f"value nests lists or maps more than {MAX_DEPTH} deep; canonical values are shallower"
    )
  if isinstance(value, (list, tuple)):
    return [_normalise(v, depth + 1) for v in value]
  if isinstance(value, dict):
    out = {}
    for k in value:
      if not isinstance(k, str):
        raise CanonicalError(f"map key {k!r} is not a string; canonical maps have string keys")
      _text(k)
    for k in sorted(value, key=lambda s: s.encode("utf-8")):
      out[k] = _normalise(value[k], depth + 1)
    return out
  # numpy / jax scalars and small arrays
  if hasattr(value, "tolist") and hasattr(value, "dtype"):
    return _normalise(value.tolist(), depth)
  raise CanonicalError(f"type {type(value).__name__} has no canonical form")


def encode(value: Any) -> bytes:
  """Canonical msgpack bytes of `value` (dicts with str keys, lists, str, bytes, int, float, bool, None)."""
  return msgpack.packb(
    _normalise(value), use_bin_type=True, use_single_float=False, strict_types=False
  )


_NAN_BITS = struct.pack(">d", NAN)
_SCALARS = frozenset((str, bytes, int, bool, type(None)))
_SORTED_KEYS: set[tuple[str, ...]] = set()  # key tuples already found sorted (maps repeat them)
_SORTED_KEYS_MAX = 4096  # key tuples remembered, each of at most _SORTED_KEYS_LEN keys
_SORTED_KEYS_LEN = 64


def _sorted_str_keys(keys: tuple) -> bool:
  """Whether map keys are all strings in canonical order. For text, code point order is UTF-8
  byte order, so comparing the strings themselves is comparing their encodings."""
  if keys in _SORTED_KEYS:
    return True
  if not all(type(k) is str for k in keys) or list(keys) != sorted(keys):
    return False
  if len(keys) <= _SORTED_KEYS_LEN and len(_SORTED_KEYS) < _SORTED_KEYS_MAX:
    _SORTED_KEYS.add(keys)
  return True


def _in_canonical_form(value: Any, depth: int = 0) -> bool:
  """Whether a decoded value is what `_normalise` makes: sorted str keys, one NaN, known types, shallow."""
  kind = type(value)
  if kind is dict:
    if depth >= MAX_DEPTH or not _sorted_str_keys(tuple(value)):
      return False
    items = value.values()
  elif kind is list:
    if depth >= MAX_DEPTH:
      return False
    items = value
  else:
    return _canonical_scalar(value, kind)
  for v in items:  # scalars inline: most values of a record are
    k = type(v)
    if k is dict or k is list:
      if not _in_canonical_form(v, depth + 1):
        return False
    elif not _canonical_scalar(v, k):
      return False
  return True


def _canonical_scalar(value: Any, kind: type) -> bool:
  if kind is float:
    return value == value or struct.pack(">d", value) == _NAN_BITS
  return kind in _SCALARS


def _pack(value: Any) -> bytes:
  return msgpack.packb(value, use_bin_type=True, use_single_float=False, strict_types=False)


def decode(data: bytes) -> Any:
  """Inverse of `encode`; raises `CanonicalError` if `data` is not canonical."""
  try:
    value = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
  except Exception as exc:  # msgpack raises several unrelated types
    raise CanonicalError(f"not valid msgpack: {exc or type(exc).__name__}") from None
  if not _in_canonical_form(value) or _pack(value) != data:
    raise CanonicalError(
      "bytes are valid msgpack but not canonical (key order, int width, float width or NaN form differ)"
    )
  return value


def sha256(data: bytes) -> bytes:
  """SHA-256 digest."""
  return hashlib.sha256(data).digest()


def digest_hex(value: Any) -> str:
  """Hex SHA-256 of the canonical encoding of `value`."""
  return hashlib.sha256(encode(value)).hexdigest()
