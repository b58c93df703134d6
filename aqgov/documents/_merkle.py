"""RFC 9162 (Certificate Transparency v2) Merkle trees: roots, inclusion and consistency proofs.

Leaf hash `SHA-256(0x00 || data)`, interior `SHA-256(0x01 || left || right)`, the empty tree
hashes to `SHA-256("")`. A tree of n leaves splits at the largest power of two below n, so its
left part is always a complete subtree: storing the complete subtrees is enough to rebuild any
root or proof.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import NamedTuple

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
  return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
  return hashlib.sha256(b"\x01" + left + right).digest()


def root_from_leaf_hashes(leaf_hashes: Sequence[bytes]) -> bytes:
  """MTH over already-hashed leaves."""
  return MerkleTree(leaf_hashes).root


def root(leaves: Sequence[bytes]) -> bytes:
  """MTH(D[n]) of raw leaf data."""
  return root_from_leaf_hashes([leaf_hash(d) for d in leaves])


class MerkleTree:
  """A tree over leaf hashes that grows by `append` and answers proofs for any size it has held.

  It stores only complete aligned subtrees (level h holds the roots of leaves
  `[i * 2^h, (i + 1) * 2^h)`, 32 bytes each, about 64 bytes per leaf in all), so any subtree hash,
  and so any root, inclusion or consistency proof at a size up to `size`, takes O(log^2 n).
  """

  def __init__(self, leaf_hashes: Sequence[bytes] = ()):
    if not _hashes(*leaf_hashes):
      raise ValueError(f"leaf hashes are {HASH_SIZE} bytes each")
    self.size = len(leaf_hashes)
    self._levels: list[bytearray] = []
    level = [bytes(h) for h in leaf_hashes]
    while True:
      self._levels.append(bytearray(b"".join(level)))
      if len(level) < 2:
        break
      level = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]

  def append(self, leaf_h: bytes) -> None:
    """Add one leaf hash at the right edge."""
    if len(leaf_h) != HASH_SIZE:
      raise ValueError(f"a leaf hash is {HASH_SIZE} bytes, got {len(leaf_h)}")
    self._levels[0] += leaf_h
    self.size += 1
    n, h = self.size, 0
    while n % 2 == 0:  # the new leaf completes a subtree at level h + 1
      level = self._levels[h]
      if len(self._levels) == h + 1:
        self._levels.append(bytearray())
      self._levels[h + 1] += node_hash(
        bytes(level[-2 * HASH_SIZE : -HASH_SIZE]), bytes(level[-HASH_SIZE:])
      )
      n //= 2
      h += 1

  def _node(self, h: int, i: int) -> bytes:
    return bytes(self._levels[h][i * HASH_SIZE : (i + 1) * HASH_SIZE])

  def _subtree(self, lo: int, hi: int) -> bytes:
    """MTH(D[lo:hi]) for the ranges RFC 9162's recursion produces (lo aligned to the split)."""
    n = hi - lo
    if n & (n - 1) == 0 and lo % n == 0:
      return self._node(n.bit_length() - 1, lo // n)
    k = 1 << ((n - 1).bit_length() - 1)
    return node_hash(self._subtree(lo, lo + k), self._subtree(lo + k, hi))

  def _size(self, size: int | None) -> int:
    if size is None:
      return self.size
    if not 0 <= size <= self.size:
      raise IndexError(f"tree size {size} not in 0..{self.size}")
    return size

  def root_at(self, size: int | None = None) -> bytes:
    """MTH of the first `size` leaves (all of them by default)."""
    size = self._size(size)
    return self._subtree(0, size) if size else EMPTY_ROOT

  @property
  def root(self) -> bytes:
    return self.root_at()

  def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
    """Audit path for leaf `index` in the tree of `size` leaves (RFC 9162 2.1.3.1), leaf to root."""
    size = self._size(size)
    if not 0 <= index < size:
      raise IndexError(f"leaf {index} outside tree of size {size}")

    def path(m: int, lo: int, hi: int) -> list[bytes]:
      n = hi - lo
      if n == 1:
        return []
      k = 1 << ((n - 1).bit_length() - 1)
      if m < k:
        return path(m, lo, lo + k) + [self._subtree(lo + k, hi)]
      return path(m - k, lo + k, hi) + [self._subtree(lo, lo + k)]

    return path(index, 0, size)

  def consistency_proof(self, old_size: int, size: int | None = None) -> list[bytes]:
    """Proof that the first `old_size` leaves are a prefix of the first `size` (RFC 9162 2.1.4.1)."""
    size = self._size(size)
    if not 0 < old_size <= size:
      raise IndexError(f"old size {old_size} not in 1..{size}")

    def subproof(m: int, lo: int, hi: int, complete: bool) -> list[bytes]:
      n = hi - lo
      if m == n:
        return [] if complete else [self._subtree(lo, hi)]
      k = 1 << ((n - 1).bit_length() - 1)
      if m <= k:
        return subproof(m, lo, lo + k, complete) + [self._subtree(lo + k, hi)]
      return subproof(m - k, lo + k, hi, False) + [self._subtree(lo, lo + k)]

    return subproof(old_size, 0, size, True)


def _hashes(*hs: bytes) -> bool:
  return all(isinstance(h, (bytes, bytearray)) and len(h) == HASH_SIZE for h in hs)


def verify_inclusion(
  leaf_h: bytes, index: int, size: int, path: Sequence[bytes], expected_root: bytes
) -> bool:
  """RFC 9162 2.1.3.2. Every hash must be 32 bytes."""
  if not 0 <= index < size or not _hashes(leaf_h, expected_root, *path):
    return False
  fn, sn, r = index, size - 1, leaf_h
  for p in path:
    if sn == 0:
      return False
    if fn & 1 or fn == sn:
      r = node_hash(p, r)
      if not fn & 1:
        while fn and not fn & 1:
          fn >>= 1
          sn >>= 1
    else:
      r = node_hash(r, p)
    fn >>= 1
    sn >>= 1
  return sn == 0 and r == expected_root


def verify_consistency(
  old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
  """RFC 9162 2.1.4.2. Equal sizes need an empty proof and equal roots; otherwise every hash is 32 bytes."""
  if not 0 < old_size <= new_size:
    return False
  if old_size == new_size:
    return not proof and old_root == new_root
  if not _hashes(old_root, new_root, *proof):
    return False
  path = list(proof)
  if old_size & (old_size - 1) == 0:  # power of two: old root is the first node
    path.insert(0, old_root)
  if not path:
    return False
  fn, sn = old_size - 1, new_size - 1
  while fn & 1:
    fn >>= 1
    sn >>= 1
  fr = sr = path[0]
  for c in path[1:]:
    if sn == 0:
      return False
    if fn & 1 or fn == sn:
      fr = node_hash(c, fr)
      sr = node_hash(c, sr)
      if not fn & 1:
        while fn and not fn & 1:
          fn >>= 1
          sn >>= 1
    else:
      sr = node_hash(sr, c)
    fn >>= 1
    sn >>= 1
  return sn == 0 and fr == old_root and sr == new_root


class CompactRange(NamedTuple):
  """Append-only root accumulator: perfect-subtree roots of decreasing height (O(log n) state)."""

  size: int = 0
  peaks: tuple[bytes, ...] = ()

  def append(self, leaf_h: bytes) -> CompactRange:
    peaks, size, h = list(self.peaks), self.size, leaf_h
    while size & 1:
      h = node_hash(peaks.pop(), h)
      size >>= 1
    return CompactRange(self.size + 1, tuple(peaks) + (h,))

  @property
  def root(self) -> bytes:
    if not self.peaks:
      return EMPTY_ROOT
    r = self.peaks[-1]
    for p in reversed(self.peaks[:-1]):
      r = node_hash(p, r)
    return r
