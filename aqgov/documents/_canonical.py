"""Canonical bytes: deterministic msgpack so that signatures and hashes are over exact bytes.

Rules: maps have string keys, written in sorted (UTF-8 byte) order; integers use the smallest
msgpack form; floats are always float64; tuples are lists; bytes stay bytes; no other types.
Decoding rejects anything that would not re-encode to the same bytes.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import msgpack

from aqgov.errors import AqgovError


class CanonicalError(AqgovError):
  """Bytes are not canonical, or a value has no canonical form."""


def _normalise(value: Any) -> Any:
  if value is None or isinstance(value, (bool, str, bytes)):
    return value
  if isinstance(value, int):
    return int(value)
  if isinstance(value, float):
    if math.isnan(value) or math.isinf(value):
      raise CanonicalError(f"non-finite float {value!r} has no canonical form; encode it as a string")
    return float(value)
  if isinstance(value, (list, tuple)):
    return [_normalise(v) for v in value]
  if isinstance(value, dict):
    out = {}
    for k in value:
      if not isinstance(k, str):
        raise CanonicalError(f"map key {k!r} is not a string; canonical maps have string keys")
    for k in sorted(value, key=lambda s: s.encode("utf-8")):
      out[k] = _normalise(value[k])
    return out
  # numpy / jax scalars and small arrays
  if hasattr(value, "tolist") and hasattr(value, "dtype"):
    return _normalise(value.tolist())
  raise CanonicalError(f"type {type(value).__name__} has no canonical form")


def encode(value: Any) -> bytes:
  """Canonical msgpack bytes of `value` (dicts with str keys, lists, str, bytes, int, float, bool, None)."""
  return msgpack.packb(_normalise(value), use_bin_type=True, use_single_float=False, strict_types=False)


def decode(data: bytes) -> Any:
  """Inverse of `encode`; raises `CanonicalError` if `data` is not canonical."""
  try:
    value = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
  except Exception as exc:  # msgpack raises several unrelated types
    raise CanonicalError(f"not valid msgpack: {exc}") from exc
  if encode(value) != data:
    raise CanonicalError("bytes are valid msgpack but not canonical (key order, int width or float width differ)")
  return value


def sha256(data: bytes) -> bytes:
  """SHA-256 digest."""
  return hashlib.sha256(data).digest()


def digest_hex(value: Any) -> str:
  """Hex SHA-256 of the canonical encoding of `value`."""
  return hashlib.sha256(encode(value)).hexdigest()
