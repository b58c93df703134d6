"""RFC 9162 Merkle trees: roots, inclusion and consistency proofs against the RFC's recursive definitions."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aqgov.documents import _merkle as merkle

MAX_EXHAUSTIVE = 33


def naive_root(leaves: list[bytes]) -> bytes:
  """MTH(D[n]) exactly as RFC 9162 section 2.1.1 writes it."""
  n = len(leaves)
  if n == 0:
    return hashlib.sha256(b"").digest()
  if n == 1:
    return hashlib.sha256(b"\x00" + leaves[0]).digest()
  k = 1 << ((n - 1).bit_length() - 1)
  return hashlib.sha256(b"\x01" + naive_root(leaves[:k]) + naive_root(leaves[k:])).digest()


def naive_path(m: int, leaves: list[bytes]) -> list[bytes]:
  """PATH(m, D[n]) from RFC 9162 section 2.1.3.1."""
  n = len(leaves)
  if n == 1:
    return []
  k = 1 << ((n - 1).bit_length() - 1)
  if m < k:
    return naive_path(m, leaves[:k]) + [naive_root(leaves[k:])]
  return naive_path(m - k, leaves[k:]) + [naive_root(leaves[:k])]


def naive_consistency(m: int, leaves: list[bytes]) -> list[bytes]:
  """PROOF(m, D[n]) from RFC 9162 section 2.1.4.1."""

  def subproof(m: int, d: list[bytes], complete: bool) -> list[bytes]:
    n = len(d)
    if m == n:
      return [] if complete else [naive_root(d)]
    k = 1 << ((n - 1).bit_length() - 1)
    if m <= k:
      return subproof(m, d[:k], complete) + [naive_root(d[k:])]
    return subproof(m - k, d[k:], False) + [naive_root(d[:k])]

  return subproof(m, leaves, True)


def leaves_of(n: int) -> list[bytes]:
  return [b"leaf-%d" % i for i in range(n)]


def tree_of(leaves: list[bytes]) -> merkle.MerkleTree:
  return merkle.MerkleTree([merkle.leaf_hash(d) for d in leaves])


def flip(data: bytes, position: int, mask: int) -> bytes:
  out = bytearray(data)
  out[position % len(out)] ^= mask
  return bytes(out)


leaf_lists = st.lists(st.binary(max_size=12), min_size=1, max_size=40)
distinct_leaf_lists = st.lists(st.binary(max_size=12), min_size=1, max_size=40, unique=True)


def test_empty_tree_root_is_hash_of_empty_string():
  assert merkle.root([]) == hashlib.sha256(b"").digest() == merkle.MerkleTree([]).root


@given(st.lists(st.binary(max_size=12), max_size=70))
def test_root_matches_rfc_recursive_definition(leaves):
  assert merkle.root(leaves) == naive_root(leaves)
  assert tree_of(leaves).root == naive_root(leaves)


@given(st.lists(st.binary(max_size=12), max_size=70))
def test_compact_range_root_matches_every_prefix(leaves):
  acc = merkle.CompactRange()
  for i, d in enumerate(leaves):
    acc = acc.append(merkle.leaf_hash(d))
    assert acc.size == i + 1
    assert acc.root == naive_root(leaves[: i + 1])


def test_inclusion_proofs_match_rfc_and_verify_for_every_size_and_index():
  for n in range(1, MAX_EXHAUSTIVE + 1):
    leaves = leaves_of(n)
    tree, root = tree_of(leaves), naive_root(leaves)
    for i in range(n):
      path = tree.inclusion_proof(i)
      assert path == naive_path(i, leaves), (n, i)
      assert merkle.verify_inclusion(merkle.leaf_hash(leaves[i]), i, n, path, root), (n, i)


def test_consistency_proofs_match_rfc_and_verify_for_every_pair_of_sizes():
  for n in range(1, MAX_EXHAUSTIVE + 1):
    leaves = leaves_of(n)
    tree, new_root = tree_of(leaves), naive_root(leaves)
    for m in range(1, n + 1):
      proof = tree.consistency_proof(m)
      assert proof == naive_consistency(m, leaves), (m, n)
      assert merkle.verify_consistency(m, n, naive_root(leaves[:m]), new_root, proof), (m, n)


@given(leaf_lists, st.data())
def test_inclusion_fails_for_an_altered_leaf(leaves, data):
  i = data.draw(st.integers(0, len(leaves) - 1))
  tree = tree_of(leaves)
  altered = leaves[i] + data.draw(st.binary(min_size=1, max_size=3))
  assert not merkle.verify_inclusion(
    merkle.leaf_hash(altered), i, len(leaves), tree.inclusion_proof(i), tree.root
  )


@given(leaf_lists.filter(lambda xs: len(xs) > 1), st.data())
def test_inclusion_fails_for_an_altered_path(leaves, data):
  i = data.draw(st.integers(0, len(leaves) - 1))
  tree = tree_of(leaves)
  path = tree.inclusion_proof(i)
  j = data.draw(st.integers(0, len(path) - 1))
  bad = list(path)
  bad[j] = flip(bad[j], data.draw(st.integers(0, 31)), data.draw(st.integers(1, 255)))
  assert not merkle.verify_inclusion(merkle.leaf_hash(leaves[i]), i, len(leaves), bad, tree.root)
  assert not merkle.verify_inclusion(
    merkle.leaf_hash(leaves[i]), i, len(leaves), path[:-1], tree.root
  )
  assert not merkle.verify_inclusion(
    merkle.leaf_hash(leaves[i]), i, len(leaves), path + [tree.root], tree.root
  )


@given(distinct_leaf_lists, st.data())
def test_inclusion_fails_for_a_wrong_index_or_a_size_with_another_shape(leaves, data):
  # A proof binds the leaf's position: another index never verifies. Another size verifies only
  # when the tree has the same shape along this path (sizes are signed alongside roots for that).
  n = len(leaves)
  i = data.draw(st.integers(0, n - 1))
  tree = tree_of(leaves)
  leaf_h, path = merkle.leaf_hash(leaves[i]), tree.inclusion_proof(i)
  other_index = data.draw(st.integers(-1, n).filter(lambda j: j != i))
  assert not merkle.verify_inclusion(leaf_h, other_index, n, path, tree.root)
  other_size = data.draw(st.integers(1, 2 * n + 2).filter(lambda s: s != n))
  same_shape = i < other_size and naive_path_shape(i, other_size) == naive_path_shape(i, n)
  assert merkle.verify_inclusion(leaf_h, i, other_size, path, tree.root) == same_shape


def naive_path_shape(index: int, size: int) -> list[bool]:
  """The left/right turns of leaf `index`'s path in a tree of `size` leaves (True: sibling on the left)."""
  if size == 1:
    return []
  k = 1 << ((size - 1).bit_length() - 1)
  if index < k:
    return naive_path_shape(index, k) + [False]
  return naive_path_shape(index - k, size - k) + [True]


@given(leaf_lists, st.data())
def test_consistency_fails_for_altered_roots_proofs_or_sizes(leaves, data):
  n = len(leaves)
  m = data.draw(st.integers(1, n))
  tree = tree_of(leaves)
  old_root, new_root = naive_root(leaves[:m]), tree.root
  proof = tree.consistency_proof(m)
  mask = data.draw(st.integers(1, 255))
  assert not merkle.verify_consistency(m, n, flip(old_root, 0, mask), new_root, proof)
  assert not merkle.verify_consistency(m, n, old_root, flip(new_root, 5, mask), proof)
  if proof:
    j = data.draw(st.integers(0, len(proof) - 1))
    bad = list(proof)
    bad[j] = flip(bad[j], data.draw(st.integers(0, 31)), mask)
    assert not merkle.verify_consistency(m, n, old_root, new_root, bad)
  if m < n:
    changed = list(leaves)
    changed[data.draw(st.integers(0, m - 1))] += b"!"
    assert not merkle.verify_consistency(m, n, naive_root(changed[:m]), new_root, proof)


def test_proof_requests_outside_the_tree_raise():
  tree = tree_of(leaves_of(5))
  with pytest.raises(IndexError):
    tree.inclusion_proof(5)
  with pytest.raises(IndexError):
    tree.consistency_proof(0)
  with pytest.raises(IndexError):
    tree.consistency_proof(6)


def test_leaf_and_node_hashes_are_domain_separated():
  a, b = b"\x00" * 32, b"\x11" * 32
  assert merkle.leaf_hash(a + b) != merkle.node_hash(a, b)
