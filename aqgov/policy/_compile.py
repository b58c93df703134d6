"""A routing policy (or a composition of several) bound to one parameter pytree.

`compile_policy(policies, params, labels)` resolves every parameter leaf to a group and every
example to a **route class** and precomputes static tables; what runs inside a jitted step is
only a few integer comparisons on the label arrays and a lookup in a constant table:

  route_class(labels)   int32 [B]       the composed class of each example
  group_weights(labels) float32 [B, G]  = table[route_class]
  leaf_weights(labels)  params-shaped pytree, each leaf float32 [B]  = leaf_table[route_class]

Routed gradients are `g_leaf = (1/B) * sum_i w_i[leaf] * grad_leaf L_i`.

Route classes. Policy p with n_p rules has classes rule1..rule_n, default (first match wins,
default when none does) and uncredentialed. A composition's class is the tuple of each policy's
class, written "acme-routing:rule1|eu-office:default"; credentialed tuples are enumerated in
mixed radix (the first policy varies slowest) and the single all-uncredentialed class comes last
(an example without a credential takes every policy's uncredentialed route).

Weights. A leaf's weight under policy p in class k is p's route weight for the leaf's group in p
(the first of p's groups whose patterns match the leaf path), or p's `uncovered` weight if none
matches. Composition takes the elementwise minimum over policies: the most restrictive wins.
`group_names` is the ordered union of the policies' groups (plus "(uncovered)" when some leaf no
policy covers); a leaf's group is the first group of that union that matches it. `table[c, g]`
is the largest weight any leaf of group g gets in class c (for a group with no leaves: the
minimum route weight over the policies declaring it). With one policy, or several that agree
on their groups, every leaf of a group has exactly its group's weight; otherwise `leaf_table` is
authoritative and `warnings` names the groups whose leaves differ.

Flax NNX states keep each array under its Variable's `value` attribute (`head/kernel/value`):
patterns match a path with or without that trailing `/value`.

Granularity. A leaf is a sequence of `parts` (`policy/_slices.py`): the whole leaf, or, when
slice groups cut it (attention heads, experts), contiguous ranges along one axis, each in its own
group. `part_table` [C, U] holds each part's weight per class; `leaf_table` [C, L] each leaf's
largest; `leaf_group` a leaf's whole-leaf group (the group of its remainder; of its first part
when slices cover it). `per_leaf(values)` spreads per-group values [..., G] over each leaf's parts. `leaf_weights` gives a
sliced leaf float32 [B, n, 1, ..., 1] (a weight per position of its sliced axis, broadcastable to
the leaf), every other leaf [B]; callers multiply leaf weights with broadcasting over trailing
axes, never by reshaping to [B]. Whatever sums per group (norms, fingerprints, entropies, finite
checks) goes through `parts(tree)` and `part_group`, which equal the leaves and `leaf_group` when
nothing is sliced.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aqgov.credentials._taxonomy import LabelSpace, Taxonomy
from aqgov.errors import PolicyError
from aqgov.policy import _paths as paths
from aqgov.policy import _slices as slices
from aqgov.policy import _subspaces as subspaces
from aqgov.policy._classes import check_route_classes, class_names_of, classifier
from aqgov.policy._policy import UNCOVERED_GROUP, Policy, PolicySet, compose
from aqgov.policy._slices import Part, part_groups, policy_part_groups, refuse_hidden_slices


class UncoveredParametersWarning(UserWarning):
  """Some parameters are covered by no group of a policy: they get its `uncovered` weight."""


@dataclasses.dataclass(frozen=True, eq=False)
class CompiledPolicy:
  """Policies bound to a parameter tree: static tables plus a traced classifier.

  Close over it (it is not a pytree, so it cannot be passed as a jit argument): its tables become
  constants of the step.
  """

  policy_ids: tuple[str, ...]
  group_names: tuple[str, ...]
  class_names: tuple[str, ...]
  table: np.ndarray
  leaf_paths: tuple[str, ...]
  leaf_group: tuple[int, ...]
  leaf_table: np.ndarray
  treedef: Any
  classify: Callable[[Mapping[str, Any]], Any]
  leaf_shapes: tuple[tuple[int, ...], ...] = ()
  warnings: tuple[str, ...] = ()
  leaf_hidden: np.ndarray | None = None  # bool [C, L]: the leaf acts as zero for the class
  leaf_parts: tuple[Part, ...] = ()  # every leaf's parts in leaf order (empty: one per leaf)
  part_table: np.ndarray | None = None  # float32 [C, U]: each part's weight per class
  subspaces: tuple = ()  # (class, leaf, Subspace): the class's gradient of the leaf is projected

  def subspace_digests(self) -> list[dict]:
    """Per leaf and subspace a class is confined to: group, leaf path, rank, seed and the
    SHA-256 of its basis (what the lineage's run-start should record)."""
    seen = sorted({(leaf, s) for _, leaf, s in self.subspaces})
    return [
      {
        "group": self.group_names[self.leaf_group[leaf]],
        "leaf": self.leaf_paths[leaf],
        **s.to_dict(),
        "basis_sha256": subspaces.basis_sha256(s, self.leaf_paths[leaf], self.leaf_shapes[leaf]),
      }
      for leaf, s in seen
    ]

  @property
  def parts_list(self) -> tuple[Part, ...]:
    """Every leaf's parts, in leaf order (a whole leaf is one part)."""
    if self.leaf_parts:
      return self.leaf_parts
    return tuple(Part(leaf, g) for leaf, g in enumerate(self.leaf_group))

  @property
  def part_group(self) -> tuple[int, ...]:
    """The group of each part (equals `leaf_group` when no leaf is sliced)."""
    return tuple(p.group for p in self.parts_list)

  @property
  def has_slices(self) -> bool:
    return any(p.axis is not None for p in self.parts_list)

  def per_leaf(self, values: jax.Array) -> Any:
    """Params-shaped pytree of per-group `values` [G] placed on each leaf: a scalar for a whole
    leaf, [n, 1, ..., 1] along a sliced leaf's axis (broadcastable to the leaf), e.g. to scale or
    mask updates per group."""
    out = [values[g] for g in self.leaf_group]
    for leaf, parts in slices.by_leaf(self.parts_list).items():
      out[leaf] = slices.spread(values, parts, self.leaf_shapes[leaf])
    return jax.tree_util.tree_unflatten(self.treedef, out)

  def parts(self, tree: Any) -> list[Any]:
    """The parts of a params-shaped `tree` (params, gradients, updates), in `parts_list` order:
    a whole leaf, or its slice along the sliced axis (jit-safe static slices)."""
    leaves = jax.tree_util.tree_leaves(tree)
    if len(leaves) != self.num_leaves:
      raise PolicyError(
        f"tree with {len(leaves)} leaves does not match the {self.num_leaves} compiled parameter "
        "paths; pass a tree shaped like the params the policy was compiled for"
      )
    return [slices.take(p, leaves[p.leaf]) for p in self.parts_list]

  @property
  def has_visibility(self) -> bool:
    """Whether some example may not see some parameter (a group declared `visible = "routed"`)."""
    return self.leaf_hidden is not None and bool(np.any(self.leaf_hidden))

  @property
  def hidden_table(self) -> np.ndarray:
    """bool [C, G]: the group acts as zero in the forward pass of examples of the class (some leaf
    of it is hidden)."""
    out = np.zeros((self.num_classes, self.num_groups), bool)
    if self.leaf_hidden is not None:
      for leaf, g in enumerate(self.leaf_group):
        out[:, g] |= self.leaf_hidden[:, leaf]
    return out

  def group_visibility(self, labels: Mapping[str, Any]) -> jax.Array:
    """bool [B, G]: which groups each example sees in its forward pass (`~hidden_table[class]`)."""
    hot = _one_hot(self.route_class(labels), self.num_classes)
    return ~jnp.any(hot[..., None] & jnp.asarray(self.hidden_table), axis=-2)

  def leaf_visibility(self, labels: Mapping[str, Any]) -> Any:
    """Params-shaped pytree: None for a leaf every example sees, else bool [B], False where the
    leaf acts as zero in that example's forward pass. Leaves hidden from the same classes share
    one array object (routing treats them as one visibility)."""
    if not self.has_visibility:
      return jax.tree_util.tree_unflatten(self.treedef, [None] * self.num_leaves)
    hot = _one_hot(self.route_class(labels), self.num_classes)
    columns, which = np.unique(self.leaf_hidden, axis=1, return_inverse=True)
    per_column = [
      None if not columns[:, j].any() else ~jnp.any(hot & jnp.asarray(columns[:, j]), axis=-1)
      for j in range(columns.shape[1])
    ]
    return jax.tree_util.tree_unflatten(self.treedef, [per_column[j] for j in np.ravel(which)])

  @property
  def num_groups(self) -> int:
    return len(self.group_names)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def num_leaves(self) -> int:
    return len(self.leaf_paths)

  def route_class(self, labels: Mapping[str, Any]) -> jax.Array:
    """int32 [B]: each example's composed route class (traced; jit/vmap/shard safe)."""
    return self.classify(labels)

  def group_weights(self, labels: Mapping[str, Any]) -> jax.Array:
    """float32 [B, G]: `table[route_class(labels)]`."""
    hot = _one_hot(self.route_class(labels), self.num_classes)
    return jnp.sum(
      jnp.where(hot[..., None], jnp.asarray(self.table, jnp.float32), jnp.float32(0)), axis=-2
    )

  def leaf_weights(self, labels: Mapping[str, Any]) -> Any:
    """Params-shaped pytree; each leaf float32 [B] (broadcast it over the leaf's own axes), or for
    a sliced leaf [B, n, 1, ..., 1]: a weight per position of its sliced axis."""
    hot = _one_hot(self.route_class(labels), self.num_classes)
    columns, which = np.unique(np.asarray(self.leaf_table, np.float32), axis=1, return_inverse=True)
    per_column = [_select(hot, columns[:, j]) for j in range(columns.shape[1])]
    out = [per_column[j] for j in np.ravel(which)]
    for leaf, parts in slices.by_leaf(self.parts_list).items():
      out[leaf] = slices.sliced_weight(hot, parts, self.part_table, self.leaf_shapes[leaf])
    return jax.tree_util.tree_unflatten(self.treedef, out)

  def group_of(self, params_like: Any) -> Any:
    """Params-shaped pytree (structure of `params_like`) of each leaf's int group index."""
    got = paths.tree_paths(params_like)
    if tuple(got) != self.leaf_paths:
      raise PolicyError(
        f"tree with {len(got)} leaves does not match the {self.num_leaves} compiled parameter paths "
        "(first difference: "
        + _first_difference(got, self.leaf_paths)
        + "); compile the policy for this tree"
      )
    return jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(params_like), list(self.leaf_group)
    )

  def uncovered_leaves(self) -> tuple[str, ...]:
    """Paths of leaves no composed policy covers."""
    if UNCOVERED_GROUP not in self.group_names:
      return ()
    g = self.group_names.index(UNCOVERED_GROUP)
    return tuple(p for p, lg in zip(self.leaf_paths, self.leaf_group) if lg == g)


def _one_hot(cls: jax.Array, num_classes: int) -> jax.Array:
  return cls[..., None] == jnp.arange(num_classes, dtype=jnp.int32)


def _select(hot: jax.Array, column: np.ndarray) -> jax.Array:
  """`column[cls]` as an exact masked sum: no gather, so explicitly batch-sharded labels need no
  mesh context and no output-sharding annotation."""
  return jnp.sum(jnp.where(hot, jnp.asarray(column, jnp.float32), jnp.float32(0)), axis=-1)


def _first_difference(a: Iterable[str], b: Iterable[str]) -> str:
  for x, y in itertools.zip_longest(a, b, fillvalue="(none)"):
    if x != y:
      return f"{x!r} vs compiled {y!r}"
  return "none"


def _policy_leaf_groups(policy: Policy, candidates: list[tuple[str, ...]]) -> list[int]:
  """Index into `policy.groups` of each leaf's first matching whole-leaf group, -1 when uncovered."""
  whole = [(i, pats) for i, (g, pats) in enumerate(policy.groups) if policy.slice_of(g) is None]
  return [next((i for i, pats in whole if paths.covers(pats, c)), -1) for c in candidates]


def _policy_leaf_table(policy: Policy, leaf_groups: list[int]) -> np.ndarray:
  """[n_rules + 2, L] weights of each leaf per route class of one policy."""
  routes = policy.routes()
  out = np.empty((len(routes), len(leaf_groups)), np.float32)
  for k, route in enumerate(routes):
    for leaf, g in enumerate(leaf_groups):
      out[k, leaf] = policy.uncovered if g < 0 else route.get(policy.groups[g][0], 0.0)
  return out


def _policy_leaf_hidden(policy: Policy, leaf_groups: list[int], table: np.ndarray) -> np.ndarray:
  """bool [n_rules + 2, L]: the leaf's group is `visible = "routed"` and the class's weight is 0."""
  routed = np.array(
    [g >= 0 and policy.groups[g][0] in policy.routed_visibility for g in leaf_groups], bool
  )
  return routed[None, :] & (table == 0)


def compile_policy(
  policy_or_policies: Policy | PolicySet | Iterable[Policy],
  params: Any,
  labels: Taxonomy | LabelSpace | Iterable[Taxonomy] | None,
) -> CompiledPolicy:
  """Bind verified policies (composed: most restrictive wins) to `params` and a label space.

  `params` is any pytree (plain dicts, Linen params, `nnx.State`, Equinox modules); only its
  structure, paths and leaf shapes are used. Rule expressions are type-checked against
  `labels`; with `labels=None` the tables are built (for `explain`) but `route_class` refuses.
  Issues an `UncoveredParametersWarning` when some policy covers a parameter with no group.
  """
  pset = compose(policy_or_policies)
  check_route_classes(pset)
  space = None if labels is None else LabelSpace.of(labels)
  with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  leaf_paths = tuple(paths.path_string(kp) for kp, _ in with_path)
  if not leaf_paths:
    raise PolicyError(
      "params has no array leaves; pass the parameter pytree the policy should govern"
    )
  if len(set(leaf_paths)) != len(leaf_paths):
    dup = next(p for p in leaf_paths if leaf_paths.count(p) > 1)
    raise PolicyError(
      f"two parameters share the path {dup!r}; policies address parameters by path, so make keys unique"
    )
  candidates = [paths.match_paths(kp) for kp, _ in with_path]
  shapes = tuple(tuple(int(d) for d in getattr(x, "shape", np.shape(x))) for _, x in with_path)

  group_names = list(pset.group_names)
  parts = part_groups(pset, group_names, candidates, leaf_paths, shapes)
  if any(p.group < 0 for p in parts):
    group_names.append(UNCOVERED_GROUP)
    parts = [p._replace(group=len(group_names) - 1) if p.group < 0 else p for p in parts]
  per_leaf = [_policy_leaf_groups(p, candidates) for p in pset.policies]
  per_groups = [
    policy_part_groups(p, parts, group_names, g) for p, g in zip(pset.policies, per_leaf)
  ]
  tables = [_policy_leaf_table(p, g) for p, g in zip(pset.policies, per_groups)]
  n_units = len(parts)
  # credentialed classes: mixed-radix product of (rules + default); then all-uncredentialed
  credentialed = np.full((1, n_units), np.inf, np.float32)
  for t in tables:
    credentialed = np.minimum(credentialed[:, None, :], t[None, :-1, :]).reshape(-1, n_units)
  uncred = np.min(np.stack([t[-1] for t in tables]), axis=0, keepdims=True)
  part_table = np.concatenate([credentialed, uncred]).astype(np.float32)
  # hidden if any policy hides it: the most restrictive wins, enumerated like the weights
  hiddens = [_policy_leaf_hidden(p, g, t) for p, g, t in zip(pset.policies, per_groups, tables)]
  hidden = np.zeros((1, n_units), bool)
  for h in hiddens:
    hidden = (hidden[:, None, :] | h[None, :-1, :]).reshape(-1, n_units)
  part_hidden = np.concatenate(
    [hidden, np.any(np.stack([h[-1] for h in hiddens]), axis=0, keepdims=True)]
  )
  part_leaf = np.asarray([p.leaf for p in parts], np.int64)
  leaf_table = np.stack([part_table[:, part_leaf == i].max(axis=1) for i in range(len(shapes))], 1)
  leaf_hidden = np.stack(
    [part_hidden[:, part_leaf == i].any(axis=1) for i in range(len(shapes))], 1
  )
  refuse_hidden_slices(parts, part_hidden, leaf_paths)
  class_names = class_names_of(pset)

  part_group = [p.group for p in parts]
  leaf_group = [next(p.group for p in parts if p.leaf == i) for i in range(len(shapes))]
  for p in parts:
    if p.remainder:
      leaf_group[p.leaf] = p.group  # a sliced leaf's whole-leaf group holds its remainder
  _refuse_empty_groups(pset, candidates, leaf_paths)
  table = _group_table(pset, group_names, part_group, part_table)
  uncovered = _uncovered_notes(pset, per_leaf, leaf_paths)
  if uncovered:
    warnings.warn("; ".join(uncovered), UncoveredParametersWarning, stacklevel=2)
  notes = uncovered + _group_notes(pset, group_names, part_group, part_table)
  return CompiledPolicy(
    policy_ids=pset.policy_ids,
    group_names=tuple(group_names),
    class_names=class_names,
    table=table,
    leaf_paths=leaf_paths,
    leaf_group=tuple(leaf_group),
    leaf_table=leaf_table,
    treedef=treedef,
    classify=classifier(pset, space, len(class_names)),
    leaf_shapes=shapes,
    warnings=tuple(notes),
    leaf_hidden=leaf_hidden,
    leaf_parts=tuple(parts) if any(p.axis is not None for p in parts) else (),
    part_table=part_table,
    subspaces=subspaces.class_subspaces(
      pset.policies, per_leaf, {p.leaf for p in parts if p.axis is not None}, leaf_paths
    ),
  )


def _group_table(
  pset: PolicySet, group_names: list[str], leaf_group: list[int], leaf_table: np.ndarray
) -> np.ndarray:
  """[C, G]: the largest weight of any part of each group (`leaf_group`/`leaf_table` per part)."""
  table = np.zeros((leaf_table.shape[0], len(group_names)), np.float32)
  members = np.asarray(leaf_group, np.int64)
  for g, name in enumerate(group_names):
    cols = np.flatnonzero(members == g)
    if cols.size:
      table[:, g] = leaf_table[:, cols].max(axis=1)
      continue
    # a group with no leaves: the policy-level weight, minimum over the policies declaring it
    per = []
    for p in pset.policies:
      routes = p.routes()
      col = (
        np.array([r.get(name, 0.0) for r in routes], np.float32) if name in p.group_names else None
      )
      per.append(col)
    rows = []
    for combo in itertools.product(*[range(len(p.rules) + 1) for p in pset.policies]):
      ws = [c[k] for c, k in zip(per, combo) if c is not None]
      rows.append(min(ws))
    rows.append(min(c[-1] for c in per if c is not None))
    table[:, g] = rows
  return table


def _refuse_empty_groups(
  pset: PolicySet, candidates: list[tuple[str, ...]], leaf_paths: tuple[str, ...]
) -> None:
  """A group whose patterns match no parameter path would route nothing and pass trivially:
  refuse it unless every policy declaring it marks it `optional = true`."""
  for name in pset.group_names:
    if any(paths.covers(pset.patterns(name), cands) for cands in candidates):
      continue
    declaring = [p for p in pset.policies if name in p.group_names]
    if all(name in p.optional_groups for p in declaring):
      continue
    shown = ", ".join(leaf_paths[:6]) + (", ..." if len(leaf_paths) > 6 else "")
    raise PolicyError(
      f"group {name!r} ({', '.join(pset.patterns(name))}) of policy {declaring[0].name!r} matches no "
      f"parameter of this model (paths look like: {shown}); fix its patterns, or declare it "
      f"`{name} = {{ patterns = [...], optional = true }}` if it may be absent"
    )


def _uncovered_notes(
  pset: PolicySet, per_groups: list[list[int]], leaf_paths: tuple[str, ...]
) -> list[str]:
  out = []
  for p, groups in zip(pset.policies, per_groups):
    missing = [path for path, g in zip(leaf_paths, groups) if g < 0]
    if missing:
      shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
      out.append(
        f"policy {p.name!r} covers {len(missing)} parameter(s) with no group: {shown}; they get its "
        f"uncovered weight {p.uncovered} from every example (add a group pattern or set 'uncovered')"
      )
  return out


def _group_notes(
  pset: PolicySet, group_names: list[str], leaf_group: list[int], leaf_table: np.ndarray
) -> list[str]:
  out = []
  members = np.asarray(leaf_group, np.int64)
  for g, name in enumerate(group_names):
    cols = np.flatnonzero(members == g)
    if not cols.size and name != UNCOVERED_GROUP:
      out.append(f"group {name!r} ({', '.join(pset.patterns(name))}) covers no parameter")
    elif np.any(leaf_table[:, cols].min(axis=1) != leaf_table[:, cols].max(axis=1)):
      out.append(
        f"leaves of group {name!r} get different weights under the composed policies "
        "(their groups differ); leaf weights are authoritative"
      )
  return out
