"""Reference semantics for policy tests: plain-Python evaluation over raw label values, and
hypothesis strategies for label spaces, examples, expressions and policies."""

from __future__ import annotations

import operator

from hypothesis import strategies as st

from aqgov.credentials._taxonomy import LabelSpace, Taxonomy
from aqgov.examples import sample as sample
from aqgov.policy._expressions import And, Bool, Compare, Member, Not, Or, parse, to_text
from aqgov.policy._policy import Policy, Rule

ACME_TOML = sample.taxonomy_path(
  "acme-data"
).read_text()  # the taxonomy, shipped as sample data
EU_TOML = sample.taxonomy_path("eu-office").read_text()

ACME = Taxonomy.from_toml(ACME_TOML)
EU = Taxonomy.from_toml(EU_TOML)
SPACE = LabelSpace.of([ACME, EU])
SOURCES = ("forum", "wiki", "books")
GROUPS = ("embed", "core", "adapter", "head")

POLICY_TOML = """
name = "acme-routing"
[groups]
embed = ["embed/**"]
core = ["blocks/**"]
adapter = ["adapter/**"]
head = ["head/**"]
[[rules]]
when = "license_class == 'unknown'"
route = {}
[[rules]]
when = "sensitivity_tier >= 2 or 'EU' in jurisdictions"
route = { adapter = 1.0 }
[default]
route = { embed = 1.0, core = 1.0, head = 1.0 }
"""

_OPS = {
  "==": operator.eq,
  "!=": operator.ne,
  "<": operator.lt,
  "<=": operator.le,
  ">": operator.gt,
  ">=": operator.ge,
}


def evaluate(expr, example, space: LabelSpace = SPACE) -> bool:
  """Truth of `expr` for one example `{authority: labels}` (None: uncredentialed)."""
  if isinstance(expr, Bool):
    return expr.value
  if isinstance(expr, Not):
    return not evaluate(expr.operand, example, space)
  if isinstance(expr, And):
    return all(evaluate(e, example, space) for e in expr.operands)
  if isinstance(expr, Or):
    return any(evaluate(e, example, space) for e in expr.operands)
  qualified, _ = space.resolve(expr.field)
  authority, _, name = qualified.partition(".")
  if example is None or authority not in example:
    return False
  value = example[authority][name]
  if isinstance(expr, Member):
    return (expr.value in value) != expr.negated
  return _OPS[expr.op](value, expr.value)


def route_class(policy: Policy, example) -> int:
  """Index of the policy's route class for one example."""
  if example is None:
    return len(policy.rules) + 1
  for i, rule in enumerate(policy.rules):
    if evaluate(parse(rule.when), example):
      return i
  return len(policy.rules)


def leaf_weight(policies, path: str, example) -> float:
  """Composed weight of parameter `path` for one example: minimum over policies."""
  out = 1.0
  for p in policies:
    route = p.routes()[route_class(p, example)]
    group = p.group_of_path(path)
    out = min(out, p.uncovered if group is None else route.get(group, 0.0))
  return out


# -- strategies ---------------------------------------------------------------------------------

acme_labels = st.fixed_dictionaries(
  {
    "license_class": st.sampled_from(ACME.field("license_class").values),
    "sensitivity_tier": st.integers(0, 3),
    "jurisdictions": st.lists(st.sampled_from(("EU", "US", "UK")), unique=True),
    "source": st.sampled_from(SOURCES),
  }
)
eu_labels = st.fixed_dictionaries(
  {
    "lawful_basis": st.sampled_from(EU.field("lawful_basis").values),
    "personal_data": st.sampled_from(("yes", "no")),
  }
)


@st.composite
def examples(draw):
  """One example's labels by authority, some authorities absent, or None (uncredentialed)."""
  if draw(st.integers(0, 9)) == 0:
    return None
  out = {}
  if draw(st.integers(0, 4)):
    out["acme-data"] = draw(acme_labels)
  if draw(st.booleans()):
    out["eu-office"] = draw(eu_labels)
  return out


batches = st.lists(examples(), min_size=1, max_size=6)


def _name(draw, qualified: str) -> str:
  return qualified if draw(st.booleans()) else qualified.partition(".")[2]


@st.composite
def atoms(draw):
  kind = draw(st.sampled_from(("enum", "int", "flags", "string", "eu", "bool")))
  if kind == "bool":
    return Bool(draw(st.booleans()))
  if kind == "enum":
    return Compare(
      _name(draw, "acme-data.license_class"),
      draw(st.sampled_from(("==", "!="))),
      draw(st.sampled_from(ACME.field("license_class").values)),
    )
  if kind == "eu":
    field = draw(st.sampled_from(("lawful_basis", "personal_data")))
    return Compare(
      _name(draw, f"eu-office.{field}"),
      draw(st.sampled_from(("==", "!="))),
      draw(st.sampled_from(EU.field(field).values)),
    )
  if kind == "int":
    return Compare(
      _name(draw, "acme-data.sensitivity_tier"),
      draw(st.sampled_from(tuple(_OPS))),
      draw(st.integers(-1, 4)),
    )
  if kind == "flags":
    return Member(
      draw(st.sampled_from(("EU", "US", "UK"))),
      _name(draw, "acme-data.jurisdictions"),
      draw(st.booleans()),
    )
  return Compare(
    _name(draw, "acme-data.source"),
    draw(st.sampled_from(("==", "!="))),
    draw(st.sampled_from(SOURCES)),
  )


expressions = st.recursive(
  atoms(),
  lambda inner: st.one_of(
    inner.map(Not),
    st.lists(inner, min_size=2, max_size=3).map(lambda xs: And(tuple(xs))),
    st.lists(inner, min_size=2, max_size=3).map(lambda xs: Or(tuple(xs))),
  ),
  max_leaves=6,
)

weights = st.sampled_from((0.0, 0.25, 0.5, 1.0))


def routes(groups):
  return st.dictionaries(st.sampled_from(groups), weights, max_size=len(groups))


@st.composite
def policies(draw, name: str = "p", group_patterns=None):
  """A random well-typed policy over `group_patterns` (name -> patterns)."""
  groups = group_patterns or {g: [f"{g}/**"] for g in GROUPS}
  names = tuple(groups)
  rules = [
    Rule(to_text(draw(expressions)), draw(routes(names))) for _ in range(draw(st.integers(0, 3)))
  ]
  return Policy(name, groups, rules, draw(routes(names)), draw(routes(names)), draw(weights))
