"""Route classes of a composition: their names, how many, and the traced classifier.

A composition's class is the tuple of each policy's class (rule1..rule_n, default), enumerated in
mixed radix with the first policy varying slowest, then the single all-uncredentialed class.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from aqgov.credentials._taxonomy import CREDENTIALED, LabelSpace
from aqgov.errors import PolicyError
from aqgov.policy import _conditions as expressions
from aqgov.policy._policy import PolicySet

MAX_ROUTE_CLASSES = (
  4096  # larger compositions make [C, leaves] tables and explain output impractically large
)


def class_names_of(pset: PolicySet) -> tuple[str, ...]:
  """Composed class names ("acme:rule1|eu:default"), in class-index order."""
  names = [p.class_names for p in pset.policies]
  return tuple(
    "|".join(f"{p.name}:{k}" for p, k in zip(pset.policies, combo))
    for combo in itertools.product(*[n[:-1] for n in names])
  ) + ("|".join(f"{p.name}:uncredentialed" for p in pset.policies),)


def classifier(pset: PolicySet, space: LabelSpace | None, num_classes: int) -> Callable:
  if space is None:

    def unbound(labels: Mapping[str, Any]):
      raise PolicyError(
        "this policy was compiled without taxonomies, so it cannot classify examples; "
        "call compile_policy(..., labels=<Taxonomy | LabelSpace>)"
      )

    return unbound
  per_policy = []
  for p in pset.policies:
    per_policy.append([expressions.compile_expr(r.when, space) for r in p.rules])
  radices = [len(p.rules) + 1 for p in pset.policies]
  strides = [int(np.prod(radices[i + 1 :], dtype=np.int64)) for i in range(len(radices))]
  uncredentialed = num_classes - 1

  def classify(labels: Mapping[str, Any]):
    lab = expressions.namespaced(labels, space)
    credentialed = jnp.asarray(lab[CREDENTIALED]) != 0
    cls = jnp.zeros(jnp.shape(credentialed), jnp.int32)
    for conds, stride in zip(per_policy, strides):
      idx = jnp.full(jnp.shape(credentialed), len(conds), jnp.int32)
      for i in reversed(range(len(conds))):
        idx = jnp.where(conds[i](lab), jnp.int32(i), idx)
      cls = cls + idx * jnp.int32(stride)
    return jnp.where(credentialed, cls, jnp.int32(uncredentialed))

  return classify


def num_route_classes(pset: PolicySet) -> int:
  """Route classes of a composition: the product over policies of (rules + default), plus uncredentialed."""
  return math.prod(len(p.rules) + 1 for p in pset.policies) + 1


def check_route_classes(pset: PolicySet) -> None:
  """Raise `PolicyError` when the composition has more than `MAX_ROUTE_CLASSES` route classes."""
  n = num_route_classes(pset)
  if n > MAX_ROUTE_CLASSES:
    sizes = " x ".join(f"{p.name!r} ({len(p.rules)} rules + default)" for p in pset.policies)
    raise PolicyError(
      f"composing {sizes} gives {n:,} route classes, more than the {MAX_ROUTE_CLASSES} a compiled policy may "
      "have (every class gets a row of weights per parameter); merge rules that route alike, drop rules that "
      "match no example, or compose fewer policies"
    )
