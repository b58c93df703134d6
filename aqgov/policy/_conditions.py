"""Type checking policy expressions against a `LabelSpace`, and compiling them to traced conditions.

Types are checked against a `LabelSpace` when an expression is compiled: an enum field compares
with `==`/`!=` against one of its values, an int field with integers (ordering allowed), a flags
field only through `in`/`not in`, and a free-string field with `==`/`!=` (through `string_code`).

Missing labels (a simplification of three-valued logic): a comparison or membership test on a
field whose authority did not label the example is False, whatever the operator, so
`personal_data != 'yes'` is False on an example the authority never saw. `not` negates the
whole sub-expression, so `not (personal_data == 'no')` is True on such an example: write
conditions that way when an unlabelled example must take the restrictive rule.

A compiled expression is a pure function of the int32 label arrays (`LabelSpace.encode` keys)
returning bool[B]; it is safe under `jax.jit`, `jax.vmap` and sharding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp

from aqgov.credentials._taxonomy import CREDENTIALED, PRESENT, Field, LabelSpace, string_code
from aqgov.errors import PolicyError, TaxonomyError
from aqgov.policy._expressions import (
  And,
  Bool,
  Compare,
  Expr,
  Member,
  Not,
  Or,
  Parser,
  literal,
  to_text,
)

Labels = Mapping[str, Any]
Condition = Callable[[Labels], Any]


def namespaced(labels: Labels, space: LabelSpace) -> dict[str, Any]:
  """Label arrays keyed like `LabelSpace.encode`.

  Arrays from a one-authority `Taxonomy.encode` (bare field keys) are accepted too: they are
  treated as credentialed and labelled by that authority.
  """
  keys = space.keys()
  if all(k in labels for k in keys):
    return dict(labels)
  if len(space.taxonomies) == 1:
    tax = space.taxonomies[0]
    names = [f.name for f in tax.fields]
    if all(n in labels for n in names):
      ones = jnp.ones_like(jnp.asarray(labels[names[0]]), dtype=jnp.int32)
      out = {CREDENTIALED: ones, f"{tax.authority}.{PRESENT}": ones}
      out.update({f"{tax.authority}.{n}": labels[n] for n in names})
      return out
  missing = [k for k in keys if k not in labels]
  raise PolicyError(
    f"label arrays lack {missing}; build them with LabelSpace.encode over the same taxonomies "
    "the policy was compiled with"
  )


def _field_error(where: str, message: str) -> PolicyError:
  return PolicyError(f"{where}: {message}")


def _check(expr: Expr, space: LabelSpace, where: Callable[[Expr], str]) -> None:
  """Raise `PolicyError` unless every comparison in `expr` is well typed in `space`."""
  if isinstance(expr, Bool):
    return
  if isinstance(expr, Not):
    _check(expr.operand, space, where)
    return
  if isinstance(expr, (And, Or)):
    for c in expr.operands:
      _check(c, space, where)
    return
  qualified, field = _resolve(expr, space, where)
  if isinstance(expr, Member):
    if field.kind != "flags":
      raise _field_error(
        where(expr),
        f"'in' tests a flags field, but {qualified} is {field.kind}; "
        f"compare it with {_ops_for(field)}",
      )
    if expr.value not in field.values:
      raise _field_error(
        where(expr), f"{expr.value!r} is not a flag of {qualified}; expected {field.allowed()}"
      )
    return
  if field.kind == "flags":
    raise _field_error(
      where(expr),
      f"{qualified} is a flag set: test it with \"'{field.values[0]}' in {expr.field}\" "
      f"(flags: {', '.join(map(repr, field.values))})",
    )
  if field.kind in ("enum", "string") and expr.op not in ("==", "!="):
    raise _field_error(
      where(expr), f"{qualified} is {field.kind}: only == and != apply, not {expr.op}"
    )
  if field.kind == "int":
    if not isinstance(expr.value, int):
      raise _field_error(
        where(expr), f"{qualified} is int: compare it with an integer, not {literal(expr.value)}"
      )
    return
  if not isinstance(expr.value, str):
    raise _field_error(
      where(expr),
      f"{qualified} is {field.kind}: compare it with a quoted string"
      + (f", one of {', '.join(map(repr, field.values))}" if field.kind == "enum" else ""),
    )
  if field.kind == "enum" and expr.value not in field.values:
    raise _field_error(
      where(expr), f"{expr.value!r} is not a value of {qualified}; expected {field.allowed()}"
    )


def _ops_for(field: Field) -> str:
  return {
    "int": "== != < <= > >= and an integer",
    "enum": "== or != and a quoted value",
    "string": "== or != and a quoted string",
  }.get(field.kind, "'in'")


def _resolve(
  expr: Compare | Member, space: LabelSpace, where: Callable[[Expr], str]
) -> tuple[str, Field]:
  try:
    return space.resolve(expr.field)
  except TaxonomyError as exc:
    raise _field_error(
      where(expr), f"{exc}; known fields: {', '.join(k for k in _field_keys(space))}"
    ) from None


def _field_keys(space: LabelSpace) -> list[str]:
  return [f"{t.authority}.{f.name}" for t in space.taxonomies for f in t.fields]


def check(expr: Expr | str, space: LabelSpace) -> Expr:
  """`expr` (parsed if text) after type-checking it against `space`; `PolicyError` otherwise."""
  if not isinstance(expr, (str, Bool, Compare, Member, Not, And, Or)):
    raise PolicyError(
      f'a condition is expression text (such as "acme.tier <= 2") or a parsed expression, got '
      f"{type(expr).__name__} {expr!r:.40}"
    )
  if isinstance(expr, str):
    text = expr
    parser = Parser(text)
    tree = parser.parse()

    def where(node: Expr) -> str:
      pos = parser.spans.get(id(node))
      col = f", column {pos + 1}" if pos is not None else ""
      return f"policy expression {text!r}{col} ({to_text(node)})"
  else:
    tree = expr

    def where(node: Expr) -> str:
      return f"policy expression {to_text(tree)!r} ({to_text(node)})"

  _check(tree, LabelSpace.of(space), where)
  return tree


def compile_expr(expr: Expr | str, label_space: Any) -> Condition:
  """A pure function `labels -> bool[B]` for `expr`, type-checked against `label_space`.

  `label_space` is a `LabelSpace`, a `Taxonomy` or an iterable of them. `labels` are the arrays
  of `LabelSpace.encode` (or a one-authority `Taxonomy.encode`).
  """
  space = LabelSpace.of(label_space)
  tree = check(expr, space)
  fn = _build(tree, space)

  def condition(labels: Labels):
    return fn(namespaced(labels, space))

  return condition


def _build(expr: Expr, space: LabelSpace) -> Callable[[dict], Any]:
  if isinstance(expr, Bool):
    value = expr.value
    return lambda lab: jnp.full(jnp.shape(lab[CREDENTIALED]), value, dtype=bool)
  if isinstance(expr, Not):
    inner = _build(expr.operand, space)
    return lambda lab: jnp.logical_not(inner(lab))
  if isinstance(expr, (And, Or)):
    parts = [_build(c, space) for c in expr.operands]
    combine = jnp.logical_and if isinstance(expr, And) else jnp.logical_or

    def fold(lab: dict):
      out = parts[0](lab)
      for p in parts[1:]:
        out = combine(out, p(lab))
      return out

    return fold
  qualified, field = space.resolve(expr.field)
  present = qualified.partition(".")[0] + "." + PRESENT
  if isinstance(expr, Member):
    bit = 1 << field.values.index(expr.value)
    negated = expr.negated

    def member(lab: dict):
      has = jnp.bitwise_and(jnp.asarray(lab[qualified], jnp.int32), jnp.int32(bit)) != 0
      if negated:
        has = jnp.logical_not(has)
      return jnp.logical_and(lab[present] != 0, has)

    return member
  if field.kind == "enum":
    code = field.values.index(expr.value)
  elif field.kind == "string":
    code = string_code(expr.value)
  else:
    code = int(expr.value)
  op = _JNP_OPS[expr.op]

  def compare(lab: dict):
    return jnp.logical_and(
      lab[present] != 0, op(jnp.asarray(lab[qualified], jnp.int32), jnp.int32(code))
    )

  return compare


_JNP_OPS = {
  "==": jnp.equal,
  "!=": jnp.not_equal,
  "<": jnp.less,
  "<=": jnp.less_equal,
  ">": jnp.greater,
  ">=": jnp.greater_equal,
}
