"""Subspace routes: a rule may confine its examples' gradient in a group to a fixed low-rank subspace.

    [[rules]]
    when = "sensitivity_tier >= 2"
    route = { core = 1.0 }
    subspace = { core = { rank = 8, seed = 1234 } }

For the rule's examples, each leaf of `core` receives `w_i P ∇L_i` with `P = U Uᵀ` the projector
onto a published basis `U` [leaf size, rank]: the orthonormalised (QR) standard Gaussian matrix
drawn by NumPy's PCG64 from the seed sequence `(seed, first 8 bytes of SHA-256(leaf path) as a
little-endian integer)`. The basis is derivable from the policy and the parameter shapes alone;
`basis_sha256` (SHA-256 of its float32 little-endian C-order bytes) lets anyone check a
derivation. Other classes' gradients are not projected.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np


class Subspace(NamedTuple):
  """A rank-`rank` subspace of each leaf of a group, its basis drawn from `seed`."""

  rank: int
  seed: int

  def to_dict(self) -> dict[str, int]:
    return {"rank": self.rank, "seed": self.seed}


def parse_subspaces(value: Any, route: Mapping[str, float]) -> dict[str, Subspace]:
  """`{group: Subspace}` from a rule's `subspace = { group = { rank, seed } }` (ValueError when
  malformed or naming a group the route gives no weight)."""
  if value is None:
    return {}
  if not isinstance(value, Mapping):
    raise ValueError("subspace is a table group -> { rank = <int>, seed = <int> }")
  out = {}
  for group, spec in value.items():
    if group not in route:
      raise ValueError(
        f"subspace names group {group!r}, which the rule's route does not reach; a subspace "
        "confines a routed gradient, so give the group a weight in the route"
      )
    if isinstance(spec, Subspace):
      spec = spec.to_dict()
    if not isinstance(spec, Mapping) or set(spec) != {"rank", "seed"}:
      raise ValueError(
        f"subspace of {group!r} must be {{ rank = <int>, seed = <int> }}, got {spec!r}"
      )
    rank, seed = spec["rank"], spec["seed"]
    for what, v, low in (("rank", rank, 1), ("seed", seed, 0)):
      if isinstance(v, bool) or not isinstance(v, int) or v < low or v >= 2**63:
        raise ValueError(f"subspace {what} of {group!r} is {v!r}; write an integer >= {low}")
    out[group] = Subspace(rank, seed)
  return dict(sorted(out.items()))


@functools.lru_cache(maxsize=256)
def basis(subspace: Subspace, path: str, size: int) -> np.ndarray:
  """float32 [size, rank] orthonormal basis of the subspace for the leaf at `path`."""
  if subspace.rank > size:
    raise ValueError(
      f"a rank-{subspace.rank} subspace does not fit leaf {path!r} of {size} entries"
    )
  salt = int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "little")
  rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([subspace.seed, salt])))
  q, _ = np.linalg.qr(rng.standard_normal((size, subspace.rank)))
  out = np.ascontiguousarray(q, dtype="<f4")
  out.setflags(write=False)
  return out


def basis_sha256(subspace: Subspace, path: str, shape: tuple[int, ...]) -> str:
  return hashlib.sha256(basis(subspace, path, math.prod(shape)).tobytes()).hexdigest()


def class_subspaces(
  policies: tuple, per_leaf: list[list[int]], sliced: set[int], leaf_paths: tuple[str, ...]
) -> tuple[tuple[int, int, Subspace], ...]:
  """(composed class, leaf, Subspace) for every leaf a class's gradient is confined in.

  `per_leaf[p][l]` is policy p's whole-leaf group index of leaf l (-1: uncovered); composed
  classes are enumerated as in `_classes` (mixed radix, the last class uncredentialed). Two
  policies confining one leaf of one class to different subspaces, or a subspace on a sliced
  leaf, are `PolicyError`s."""
  from aqgov.errors import PolicyError

  out = []
  for c, combo in enumerate(itertools.product(*[range(len(p.rules) + 1) for p in policies])):
    for leaf in range(len(leaf_paths)):
      found = {}
      for p, k, groups in zip(policies, combo, per_leaf):
        g = groups[leaf]
        if k < len(p.rules) and g >= 0 and p.groups[g][0] in p.rules[k].subspace:
          found[p.name] = p.rules[k].subspace[p.groups[g][0]]
      if len(set(found.values())) > 1:
        raise PolicyError(
          f"policies {sorted(found)} confine {leaf_paths[leaf]!r} to different subspaces for one "
          "route class; compose policies whose subspace routes agree"
        )
      if found and leaf in sliced:
        raise PolicyError(
          f"{leaf_paths[leaf]!r} is cut by slice groups and also confined to a subspace; give "
          "subspace routes to whole-leaf groups"
        )
      if found:
        out.append((c, leaf, next(iter(found.values()))))
  return tuple(out)
