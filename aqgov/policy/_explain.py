"""What `aqgov policy explain` shows of a compiled policy, and the shapes document it reads.

`explain_table` gives one row per route class and one column per group (slice groups included,
with their parameter counts); `explain` prints it with the slices each slice group holds and the
compile warnings. `param_shapes` turns a JSON shapes document into a parameter tree of
`jax.ShapeDtypeStruct`s, all `explain` needs to know about a model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from aqgov.errors import PolicyError
from aqgov.policy import _slices as slices
from aqgov.policy._compile import CompiledPolicy


class ExplainTable(NamedTuple):
  """What `explain` prints: one row per route class, one column per group."""

  policy_ids: tuple[str, ...]
  columns: tuple[str, ...]
  leaves: tuple[int, ...]
  sizes: tuple[int, ...]
  rows: tuple[tuple[str, tuple[float, ...]], ...]
  warnings: tuple[str, ...]
  hidden: tuple[tuple[bool, ...], ...] = ()  # per row: the group acts as zero for the class
  slices: tuple[str, ...] = ()  # per slice group: the ranges of the leaves it holds

  def cells(self) -> tuple[tuple[str, ...], ...]:
    """Per row, each group's weight as printed: `0.5`, or `0 unseen` for a hidden group."""
    hidden = self.hidden or tuple((False,) * len(self.columns) for _ in self.rows)
    return tuple(
      tuple(f"{w:g}" + (" unseen" if h else "") for w, h in zip(ws, hs))
      for (_, ws), hs in zip(self.rows, hidden)
    )


def explain_table(compiled: CompiledPolicy) -> ExplainTable:
  """Route class x group weights, leaf and parameter counts per group (a slice group counts the
  entries of its slices), and warnings."""
  members: list[set[int]] = [set() for _ in range(compiled.num_groups)]
  sizes = [0] * compiled.num_groups
  shapes = compiled.leaf_shapes or ((),) * compiled.num_leaves
  for part in compiled.parts_list:
    members[part.group].add(part.leaf)
    sizes[part.group] += slices.part_size(part, shapes[part.leaf])
  leaves = [len(m) for m in members]
  rows = tuple(
    (name, tuple(float(w) for w in compiled.table[c]))
    for c, name in enumerate(compiled.class_names)
  )
  hidden = tuple(tuple(bool(h) for h in row) for row in compiled.hidden_table)
  return ExplainTable(
    compiled.policy_ids,
    compiled.group_names,
    tuple(leaves),
    tuple(sizes),
    rows,
    compiled.warnings,
    hidden,
    tuple(slices.describe(compiled.parts_list, compiled.leaf_paths, compiled.group_names)),
  )


def explain(compiled: CompiledPolicy) -> str:
  """Plain-text route class x group weight table followed by warnings."""
  t = explain_table(compiled)
  header = ["route class"] + [
    f"{g} ({n} leaves, {s:,} params)" for g, n, s in zip(t.columns, t.leaves, t.sizes)
  ]
  body = [[name, *cells] for (name, _), cells in zip(t.rows, t.cells())]
  widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
  fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
  lines = [
    "policies: " + ", ".join(i[:16] for i in t.policy_ids),
    fmt(header),
    fmt(["-" * w for w in widths]),
  ]
  lines += [fmt(r) for r in body]
  lines += ["slice " + c for c in t.slices]
  if any(any(hs) for hs in t.hidden):
    lines.append(
      'unseen: the group acts as zero in the forward pass of the class\'s examples (visible = "routed")'
    )
  lines += [f"warning: {w}" for w in t.warnings]
  return "\n".join(lines)


def param_shapes(doc_or_path: Any) -> dict[str, Any]:
  """A parameter tree of `jax.ShapeDtypeStruct` (float32) from a shapes document.

  The document (a dict, or a path to a JSON file) nests parameter keys down to shape lists,
  `{"blocks": {"0": {"kernel": [64, 256]}}, "head/bias": [256]}`; a key holding '/' stands for
  that many nested keys. This is all `explain` needs to know about a model.
  """
  if isinstance(doc_or_path, Mapping):
    doc = doc_or_path
  else:
    try:
      with open(doc_or_path, encoding="utf-8") as fh:
        doc = json.load(fh)
    except (OSError, ValueError) as exc:
      raise PolicyError(
        f"cannot read parameter shapes {doc_or_path}: {exc}; expected JSON like "
        '{"head": {"kernel": [64, 256]}}'
      ) from None
  if not isinstance(doc, Mapping) or not doc:
    raise PolicyError("parameter shapes must be a non-empty JSON object of parameter keys")
  out: dict[str, Any] = {}
  for path, shape in _shape_items(doc, ()):
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
      if not isinstance(node, dict):
        raise PolicyError(
          f"parameter shapes: {'/'.join(path)} nests under a leaf; give each path once"
        )
    if path[-1] in node:
      raise PolicyError(f"parameter shapes: {'/'.join(path)} is given twice")
    node[path[-1]] = jax.ShapeDtypeStruct(shape, jnp.float32)
  return out


def _shape_items(doc: Mapping[str, Any], prefix: tuple[str, ...]):
  for key, value in doc.items():
    parts = tuple(k for k in str(key).split("/"))
    if not all(parts):
      raise PolicyError(
        f"parameter shapes: key {key!r} under {'/'.join(prefix) or 'the top'} has an empty segment"
      )
    path = prefix + parts
    if isinstance(value, Mapping):
      yield from _shape_items(value, path)
    elif isinstance(value, list) and all(
      isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
      yield path, tuple(value)
    else:
      raise PolicyError(
        f"parameter shapes: {'/'.join(path)} = {value!r}; expected an object or a shape list "
        "of non-negative integers like [64, 256]"
      )
