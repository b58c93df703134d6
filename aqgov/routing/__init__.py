"""Routed gradients: exact per-example, per-group weighting as Optax transforms and value-and-grad functions."""

from aqgov.routing._cotangent import (
  cotangent_value_and_grad,
  norm_methods,
)
from aqgov.routing._sketch import SketchSpec
from aqgov.routing._transforms import (
  reached,
  route,
  routed,
  strict,
)
from aqgov.routing._value_and_grad import (
  STRATEGIES,
  gradient_sketches,
  group_norms,
  per_example_value_and_grad,
  routed_value_and_grad,
)

__all__ = [
  "cotangent_value_and_grad",
  "gradient_sketches",
  "group_norms",
  "norm_methods",
  "per_example_value_and_grad",
  "reached",
  "route",
  "routed",
  "routed_value_and_grad",
  "SketchSpec",
  "STRATEGIES",
  "strict",
]
