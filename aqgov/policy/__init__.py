"""Routing policies: rule expressions, the `POLICY` document type, composition, and binding to a parameter pytree."""

from aqgov.policy._compile import (
  CompiledPolicy,
  UncoveredParametersWarning,
  compile_policy,
)
from aqgov.policy._explain import (
  ExplainTable,
  explain,
  explain_table,
  param_shapes,
)
from aqgov.policy._expressions import (
  parse,
  to_text,
)
from aqgov.policy._paths import (
  glob_match,
  path_string,
  tree_paths,
)
from aqgov.policy._policy import (
  POLICY,
  UNCOVERED_GROUP,
  Policy,
  PolicySet,
  Route,
  Rule,
  compose,
)
from aqgov.policy._slices import (
  Part,
  Slice,
)

__all__ = [
  "compile_policy",
  "CompiledPolicy",
  "compose",
  "explain",
  "explain_table",
  "ExplainTable",
  "glob_match",
  "param_shapes",
  "parse",
  "path_string",
  "Part",
  "Policy",
  "POLICY",
  "PolicySet",
  "Route",
  "Rule",
  "Slice",
  "to_text",
  "tree_paths",
  "UNCOVERED_GROUP",
  "UncoveredParametersWarning",
]
