"""RFC 9162 (Certificate Transparency v2) Merkle trees: roots, inclusion and consistency proofs.

Leaf hash `SHA-256(0x00 || data)`, interior `SHA-256(0x01 || left || right)`, the empty tree
hashes to `SHA-256("")`. A tree of n leaves splits at the largest power of two below n; building
levels bottom-up and promoting an unpaired last node gives exactly that tree.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple, Sequence

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
  return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
  return hashlib.sha256(b"\x01" + left + right).digest()


def _levels(leaf_hashes: Sequence[bytes]) -> list[list[bytes]]:
  levels = [list(leaf_hashes)]
  while len(levels[-1]) > 1:
    prev = levels[-1]
    nxt = [node_hash(prev[i], prev[i + 1]) for i in range(0, len(prev) - 1, 2)]
    if len(prev) % 2:
      nxt.append(prev[-1])
    levels.append(nxt)
  return levels


def root_from_leaf_hashes(leaf_hashes: Sequence[bytes]) -> bytes:
  """MTH over already-hashed leaves."""
  if not leaf_hashes:
    return EMPTY_ROOT
  return _levels(leaf_hashes)[-1][0]


def root(leaves: Sequence[bytes]) -> bytes:
  """MTH(D[n]) of raw leaf data."""
  return root_from_leaf_hashes([leaf_hash(d) for d in leaves])


class MerkleTree:
  """A fixed tree over leaf hashes, answering proofs in O(log n) after O(n) construction."""

  def __init__(self, leaf_hashes: Sequence[bytes]):
    self.size = len(leaf_hashes)
    self._levels = _levels(leaf_hashes) if leaf_hashes else [[]]

  @property
  def root(self) -> bytes:
    return self._levels[-1][0] if self.size else EMPTY_ROOT

  def _subtree(self, lo: int, hi: int) -> bytes:
    """MTH(D[lo:hi]) for ranges the RFC recursion produces (aligned, or ending at a tree edge)."""
    n = hi - lo
    if n == 1:
      return self._levels[0][lo]
    h = (n - 1).bit_length()  # smallest height whose span covers n
    if lo % (1 << h) == 0 and (n == (1 << h) or hi == self.size):
      return self._levels[h][lo >> h]
    k = 1 << ((n - 1).bit_length() - 1)
    return node_hash(self._subtree(lo, lo + k), self._subtree(lo + k, hi))

  def inclusion_proof(self, index: int) -> list[bytes]:
    """Audit path for leaf `index` (RFC 9162 2.1.3.1), ordered leaf to root."""
    if not 0 <= index < self.size:
      raise IndexError(f"leaf {index} outside tree of size {self.size}")
    path, i = [], index
    for level in self._levels[:-1]:
      sibling = i ^ 1
      if sibling < len(level):
        path.append(level[sibling])
      i >>= 1
    return path

  def consistency_proof(self, old_size: int) -> list[bytes]:
    """Proof that the first `old_size` leaves are a prefix of this tree (RFC 9162 2.1.4.1)."""
    if not 0 < old_size <= self.size:
      raise IndexError(f"old size {old_size} not in 1..{self.size}")

    def subproof(m: int, lo: int, hi: int, complete: bool) -> list[bytes]:
      n = hi - lo
      if m == n:
        return [] if complete else [self._subtree(lo, hi)]
      k = 1 << ((n - 1).bit_length() - 1)
      if m <= k:
        return subproof(m, lo, lo + k, complete) + [self._subtree(lo + k, hi)]
      return subproof(m - k, lo + k, hi, False) + [self._subtree(lo, lo + k)]

    return subproof(old_size, 0, self.size, True)


def verify_inclusion(leaf_h: bytes, index: int, size: int, path: Sequence[bytes], expected_root: bytes) -> bool:
  """RFC 9162 2.1.3.2."""
  if not 0 <= index < size:
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


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]) -> bool:
  """RFC 9162 2.1.4.2."""
  if not 0 < old_size <= new_size:
    return False
  if old_size == new_size:
    return not proof and old_root == new_root
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

  def append(self, leaf_h: bytes) -> "CompactRange":
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
