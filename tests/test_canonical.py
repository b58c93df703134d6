"""Canonical msgpack: one byte string per value, and nothing else decodes."""

from __future__ import annotations

import hashlib
import math

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aqgov.documents import _canonical as canonical
from aqgov.documents._canonical import CanonicalError

scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8) | st.binary(max_size=8))
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12)


def same(a, b) -> bool:
  """Structural equality that tells floats from ints and bools (and 0.0 from -0.0)."""
  if isinstance(a, float) or isinstance(b, float):
    return type(a) is type(b) and math.copysign(1.0, a) == math.copysign(1.0, b) and a == b
  if isinstance(a, (list, tuple)):
    return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
  if isinstance(a, dict):
    return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
  return type(a) is type(b) and a == b


@given(values)
def test_decode_inverts_encode(value):
  assert same(value, canonical.decode(canonical.encode(value)))


@given(values)
def test_encoding_is_a_fixed_point(value):
  data = canonical.encode(value)
  assert canonical.encode(canonical.decode(data)) == data


@given(st.dictionaries(st.text(max_size=6), scalars, min_size=2, max_size=8), st.randoms())
def test_map_key_order_does_not_change_the_bytes(mapping, rnd):
  keys = list(mapping)
  rnd.shuffle(keys)
  assert canonical.encode({k: mapping[k] for k in keys}) == canonical.encode(mapping)


def test_tuples_encode_as_lists():
  assert canonical.encode((1, "a", (2.0,))) == canonical.encode([1, "a", [2.0]])


def test_numpy_scalars_and_arrays_encode_as_python_values():
  assert canonical.encode(np.int32(7)) == canonical.encode(7)
  assert canonical.encode(np.float32(0.5)) == canonical.encode(0.5)
  assert canonical.encode(np.arange(3, dtype=np.int64)) == canonical.encode([0, 1, 2])


def test_floats_are_always_float64():
  assert canonical.encode(0.5)[0] == 0xCB
  assert len(canonical.encode(0.5)) == 9


@pytest.mark.parametrize("bad", [
    msgpack.packb({"b": 1, "a": 2}),                      # keys out of order
    b"\xcd\x00\x05",                                      # 5 as uint16 instead of fixint
    msgpack.packb(0.5, use_single_float=True),            # float32
    b"\xd9\x01a",                                         # "a" as str8 instead of fixstr
    msgpack.packb(1) + b"\x00",                           # trailing bytes
    b"\xc1",                                              # never-used msgpack byte
    b"\x92\x01",                                          # truncated array
])
def test_non_canonical_bytes_are_rejected(bad):
  with pytest.raises(CanonicalError):
    canonical.decode(bad)


@given(values, st.data())
def test_a_flipped_byte_never_decodes_to_the_same_value(value, data):
  encoded = canonical.encode(value)
  pos = data.draw(st.integers(0, len(encoded) - 1))
  flipped = bytearray(encoded)
  flipped[pos] ^= data.draw(st.integers(1, 255))
  try:
    decoded = canonical.decode(bytes(flipped))
  except CanonicalError:
    return
  assert canonical.encode(decoded) == bytes(flipped) != encoded


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, [1.0, math.nan], {"x": math.inf}])
def test_non_finite_floats_are_refused(bad):
  with pytest.raises(CanonicalError, match="non-finite"):
    canonical.encode(bad)


def test_non_string_map_keys_are_refused():
  with pytest.raises(CanonicalError, match="not a string"):
    canonical.encode({1: "a"})


def test_unsupported_types_are_refused():
  with pytest.raises(CanonicalError, match="no canonical form"):
    canonical.encode({"when": object()})
  with pytest.raises(CanonicalError):
    canonical.encode({1, 2})


@given(values)
def test_digest_hex_is_sha256_of_the_encoding(value):
  assert canonical.digest_hex(value) == hashlib.sha256(canonical.encode(value)).hexdigest()
  assert canonical.sha256(canonical.encode(value)).hex() == canonical.digest_hex(value)

