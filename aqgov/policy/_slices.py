"""Slice groups: a group that takes a slice of each leaf it matches (attention heads, experts).

A group table with `axis` and `split` views that axis of every leaf it matches as `split` equal
parts, and `index` selects parts ("0:4", 3 or [0, 2]); `per = "<noun>"` instead makes one group
`name[k]` per part (`per = "head"`, `per = "expert"`). In a policy:

  heads_0_3 = { pattern = "blocks/*/attn/wq", axis = 1, split = 8, index = "0:4" }
  expert = { patterns = ["moe/w_in", "moe/w_out"], axis = 0, split = 4, per = "expert" }

A leaf is cut by every slice group matching it; the rest of it belongs to its first matching
whole-leaf group (or is uncovered). The slices of one leaf lie along one axis and may not overlap.

Compiled, every leaf is a sequence of `Part`s: the whole leaf, or contiguous ranges along the
sliced axis, each in one group. Weights, norms, fingerprints and entropies are per part.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from aqgov.errors import PolicyError
from aqgov.policy import _paths as paths

if TYPE_CHECKING:
  from aqgov.policy._policy import Policy, PolicySet

SLICE_KEYS = ("axis", "split", "index", "per")
_NOUN = ("head", "expert", "part", "slice", "channel", "block")


class Slice(NamedTuple):
  """Parts `index` of `split` equal parts of axis `axis` of every leaf the group matches."""

  axis: int
  split: int
  index: tuple[int, ...]

  def to_dict(self) -> dict[str, Any]:
    return {"axis": self.axis, "split": self.split, "index": list(self.index)}


def _int(what: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, int):
    raise ValueError(f"{what} = {value!r} must be an integer")
  return value


def _index(value: Any, split: int) -> tuple[int, ...]:
  """Part indices from "a:b", an int or a list of ints; each in [0, split)."""
  if isinstance(value, str):
    lo, sep, hi = value.partition(":")
    try:
      if not sep:
        raise ValueError
      start, stop = int(lo) if lo else 0, int(hi) if hi else split
    except ValueError:
      raise ValueError(
        f'index = {value!r}: write a range "start:stop", an integer or a list'
      ) from None
    out = tuple(range(start, stop))
  elif isinstance(value, (list, tuple)):
    out = tuple(_int("index", v) for v in value)
  else:
    out = (_int("index", value),)
  if not out or len(set(out)) != len(out) or not all(0 <= k < split for k in out):
    raise ValueError(
      f"index = {value!r} must select distinct parts among 0..{split - 1} (split = {split})"
    )
  return tuple(sorted(out))


def parse_slice(name: str, spec: Mapping[str, Any]) -> list[tuple[str, Slice]]:
  """The (group, Slice) pairs one slice declaration makes: itself, or with `per` one per part."""
  if "axis" not in spec or "split" not in spec:
    raise ValueError(
      "a slice group needs 'axis' and 'split' (the axis viewed as `split` equal parts)"
    )
  axis, split = _int("axis", spec["axis"]), _int("split", spec["split"])
  if split < 1:
    raise ValueError(f"split = {split} must be at least 1")
  if "per" in spec:
    if "index" in spec:
      raise ValueError("give 'index' (one group) or 'per' (a group per part), not both")
    if spec["per"] not in _NOUN:
      raise ValueError(f"per = {spec['per']!r} must be one of {list(_NOUN)}")
    if "[" in name:
      raise ValueError(
        f"a `per` group's name {name!r} may not hold '[': its parts are named name[k]"
      )
    return [(f"{name}[{k}]", Slice(axis, split, (k,))) for k in range(split)]
  if "index" not in spec:
    raise ValueError(
      "a slice group needs 'index' (the parts it takes) or 'per' (one group per part)"
    )
  return [(name, Slice(axis, split, _index(spec["index"], split)))]


# ---------------------------------------------------------------------------------------------
# Compiled: leaves as parts.


class Part(NamedTuple):
  """A piece of one leaf in one group: the whole leaf (`axis` None) or `[start, stop)` of `axis`."""

  leaf: int
  group: int
  axis: int | None = None
  start: int = 0
  stop: int = 0
  remainder: bool = False  # the rest of a sliced leaf, in the leaf's whole-leaf group


def _runs(index: Sequence[int]) -> list[tuple[int, int]]:
  """Contiguous runs [a, b) of sorted part indices."""
  out: list[list[int]] = []
  for k in index:
    if out and out[-1][1] == k:
      out[-1][1] = k + 1
    else:
      out.append([k, k + 1])
  return [(a, b) for a, b in out]


def leaf_parts(
  path: str,
  leaf: int,
  shape: tuple[int, ...],
  whole: int,
  slices: Sequence[tuple[int, str, Slice]],
) -> list[Part]:
  """The parts of one leaf: the slice groups `(group index, name, Slice)` that match it, and the
  rest in group `whole` (-1: uncovered). Raises `PolicyError` for overlaps or bad axes."""
  if not slices:
    return [Part(leaf, whole)]
  axes = set()
  cuts: list[tuple[int, int, int, str]] = []
  for g, name, sl in slices:
    axis = sl.axis + len(shape) if sl.axis < 0 else sl.axis
    if not 0 <= axis < len(shape):
      raise PolicyError(
        f"slice group {name!r} cuts axis {sl.axis} of {path!r}, which has shape {shape}; "
        "fix 'axis' or the group's patterns"
      )
    n = shape[axis]
    if n % sl.split:
      raise PolicyError(
        f"slice group {name!r} splits axis {axis} of {path!r} (size {n}) into {sl.split} parts, "
        f"which do not divide it; choose a split that divides {n}"
      )
    axes.add(axis)
    size = n // sl.split
    cuts += [(a * size, b * size, g, name) for a, b in _runs(sl.index)]
  if len(axes) > 1:
    raise PolicyError(
      f"slice groups {sorted({c[3] for c in cuts})} cut {path!r} along different axes "
      f"{sorted(axes)}; slices of one leaf lie along one axis"
    )
  axis = axes.pop()
  cuts.sort()
  for (a0, b0, _, n0), (a1, b1, _, n1) in zip(cuts, cuts[1:]):
    if a1 < b0:
      raise PolicyError(
        f"slice groups {n0!r} ([{a0}:{b0}]) and {n1!r} ([{a1}:{b1}]) overlap on axis {axis} of "
        f"{path!r}; a parameter entry belongs to one group: make the slices disjoint"
      )
  parts, at = [], 0
  for a, b, g, _ in cuts:
    if a > at:
      parts.append(Part(leaf, whole, axis, at, a, True))
    parts.append(Part(leaf, g, axis, a, b))
    at = b
  if at < shape[axis]:
    parts.append(Part(leaf, whole, axis, at, shape[axis], True))
  return parts


def part_size(part: Part, shape: tuple[int, ...]) -> int:
  n = math.prod(shape)
  return n if part.axis is None else n // shape[part.axis] * (part.stop - part.start)


def take(part: Part, leaf: Any) -> Any:
  """The entries of `leaf` that `part` holds (the leaf itself for a whole part)."""
  if part.axis is None:
    return leaf
  return jax.lax.slice_in_dim(leaf, part.start, part.stop, axis=part.axis)


def sliced_weight(
  hot: jax.Array, parts: Sequence[tuple[int, Part]], table: np.ndarray, shape: tuple[int, ...]
) -> jax.Array:
  """float32 [B, n, 1, ..., 1] weights of a sliced leaf per position of its axis (broadcastable
  to the leaf): each part's weight `table[class, part]` repeated over the part's range."""
  axis = parts[0][1].axis
  cols = []
  for u, part in parts:
    w = jnp.sum(jnp.where(hot, jnp.asarray(table[:, u], jnp.float32), jnp.float32(0)), axis=-1)
    cols.append(jnp.broadcast_to(w[:, None], w.shape + (part.stop - part.start,)))
  out = jnp.concatenate(cols, axis=-1)
  return out.reshape(out.shape + (1,) * (len(shape) - axis - 1))


def by_leaf(parts: Sequence[Part]) -> dict[int, list[tuple[int, Part]]]:
  """Sliced leaf -> its (part index, part) pairs, in order along the axis."""
  out: dict[int, list[tuple[int, Part]]] = {}
  for u, p in enumerate(parts):
    if p.axis is not None:
      out.setdefault(p.leaf, []).append((u, p))
  return out


def spread(values: jax.Array, parts: Sequence[tuple[int, Part]], shape: tuple[int, ...]):
  """Per-group `values` [G] along a sliced leaf's axis: [n, 1, ..., 1], each part's group value
  over its range."""
  axis = parts[0][1].axis
  vec = jnp.concatenate([jnp.broadcast_to(values[p.group], (p.stop - p.start,)) for _, p in parts])
  return vec.reshape(vec.shape + (1,) * (len(shape) - axis - 1))


def describe(
  parts: Sequence[Part], leaf_paths: Sequence[str], group_names: Sequence[str]
) -> list[str]:
  """One line per slice group: which range of which leaves it holds."""
  by_group: dict[int, list[str]] = {}
  for p in parts:
    if p.axis is not None and not p.remainder:
      by_group.setdefault(p.group, []).append(
        f"{leaf_paths[p.leaf]}[axis {p.axis}: {p.start}:{p.stop}]"
      )
  return [f"{group_names[g]} = {', '.join(where)}" for g, where in sorted(by_group.items())]


def part_groups(
  pset: PolicySet,
  group_names: list[str],
  candidates: list[tuple[str, ...]],
  leaf_paths: tuple[str, ...],
  shapes: tuple[tuple[int, ...], ...],
) -> list[Part]:
  """Every leaf's parts: the slices of the slice groups matching it, the rest in its first
  matching whole-leaf group (-1: uncovered)."""
  sliced = [(g, n, pset.slice_of(n)) for g, n in enumerate(group_names) if pset.slice_of(n)]
  out = []
  for leaf, cands in enumerate(candidates):
    whole = next(
      (
        g
        for g, name in enumerate(group_names)
        if pset.slice_of(name) is None and paths.covers(pset.patterns(name), cands)
      ),
      -1,
    )
    cuts = [(g, n, sl) for g, n, sl in sliced if paths.covers(pset.patterns(n), cands)]
    out += leaf_parts(leaf_paths[leaf], leaf, shapes[leaf], whole, cuts)
  return out


def refuse_hidden_slices(parts: list[Part], hidden: np.ndarray, leaf_paths) -> None:
  """A sliced leaf is seen by every example: visibility masks whole leaves."""
  for u, p in enumerate(parts):
    if p.axis is not None and hidden[:, u].any():
      raise PolicyError(
        f"{leaf_paths[p.leaf]!r} is cut by slice groups but its whole-leaf group is declared "
        'visible = "routed"; visibility applies to whole leaves: give the leaf a group that '
        "every example sees"
      )


def policy_part_groups(
  policy: Policy, parts: list[Part], group_names: list[str], leaf_groups: list[int]
) -> list[int]:
  """Index into `policy.groups` of each part's group in `policy`: the slice group that holds it
  when `policy` declares it, else the leaf's whole-leaf group (-1 when uncovered)."""
  index = {g: i for i, (g, _) in enumerate(policy.groups)}
  return [
    index[group_names[p.group]]
    if p.axis is not None
    and group_names[p.group] in index
    and policy.slice_of(group_names[p.group])
    else leaf_groups[p.leaf]
    for p in parts
  ]
