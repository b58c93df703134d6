"""Canonical msgpack: one byte string per value, and nothing else decodes."""

from __future__ import annotations

import hashlib
import math
import struct

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aqgov.documents import _canonical as canonical
from aqgov.documents._canonical import CanonicalError

scalars = (
  st.none()
  | st.booleans()
  | st.integers(-(2**63), 2**64 - 1)
  | st.floats(allow_nan=False, allow_infinity=False)
  | st.text(max_size=8)
  | st.binary(max_size=8)
)
values = st.recursive(
  scalars,
  lambda children: (
    st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
  ),
  max_leaves=12,
)


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


@pytest.mark.parametrize(
  "bad",
  [
    msgpack.packb({"b": 1, "a": 2}),  # keys out of order
    b"\xcd\x00\x05",  # 5 as uint16 instead of fixint
    msgpack.packb(0.5, use_single_float=True),  # float32
    b"\xd9\x01a",  # "a" as str8 instead of fixstr
    msgpack.packb(1) + b"\x00",  # trailing bytes
    b"\xc1",  # never-used msgpack byte
    b"\x92\x01",  # truncated array
  ],
)
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


@pytest.mark.parametrize("value", [math.inf, -math.inf, [1.0, -math.inf], {"x": math.inf}])
def test_infinities_round_trip(value):
  assert same(value, canonical.decode(canonical.encode(value)))


@pytest.mark.parametrize(
  "bits", ["7ff8000000000000", "fff8000000000000", "7ff0000000000001", "fff0000deadbeef1"]
)
def test_every_nan_encodes_as_the_one_canonical_nan(bits):
  nan = struct.unpack(">d", bytes.fromhex(bits))[0]
  assert canonical.encode(nan) == b"\xcb" + bytes.fromhex("7ff8000000000000")
  assert math.isnan(canonical.decode(canonical.encode({"loss": nan}))["loss"])


@pytest.mark.parametrize("bits", ["fff8000000000000", "7ff0000000000001"])
def test_other_nan_bit_patterns_are_not_canonical(bits):
  with pytest.raises(CanonicalError, match="not canonical"):
    canonical.decode(b"\xcb" + bytes.fromhex(bits))


def test_lone_surrogates_have_no_canonical_form():
  with pytest.raises(CanonicalError, match="lone surrogate"):
    canonical.encode({"id": "a\ud800"})
  with pytest.raises(CanonicalError, match="lone surrogate"):
    canonical.encode({"\udfff": 1})
  with pytest.raises(CanonicalError, match="not valid msgpack"):
    canonical.decode(b"\xa3\xed\xa0\x80")  # the surrogate's UTF-8-like bytes are not UTF-8


def test_values_nest_at_most_max_depth():
  value: list = []
  for _ in range(canonical.MAX_DEPTH - 1):
    value = [value]
  assert same(value, canonical.decode(canonical.encode(value)))
  with pytest.raises(CanonicalError, match="nests"):
    canonical.encode([value])
  with pytest.raises(CanonicalError):
    canonical.decode(b"\x91" * 200_000 + b"\xc0")


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


def test_a_map_with_keys_out_of_order_is_rejected_after_the_same_keys_in_order_decoded():
  in_order = {"data": b"x", "dtype": "float32", "shape": [1]}
  assert canonical.decode(canonical.encode(in_order)) == in_order  # its key tuple is now known
  out_of_order = msgpack.packb({"shape": [1], "dtype": "float32", "data": b"x"}, use_bin_type=True)
  with pytest.raises(CanonicalError):
    canonical.decode(out_of_order)
  nested = msgpack.packb({"a": [{"b": 1, "a": 2}]}, use_bin_type=True)
  with pytest.raises(CanonicalError):
    canonical.decode(nested)
