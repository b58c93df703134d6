"""Policy rule conditions: a small, safe expression language over label fields.

Grammar (keywords are lower case; nothing is ever evaluated as Python):

  expr       := or_expr
  or_expr    := and_expr ("or" and_expr)*
  and_expr   := not_expr ("and" not_expr)*
  not_expr   := "not" not_expr | atom
  atom       := "(" or_expr ")" | "true" | "false" | comparison | membership
  comparison := FIELD OP LITERAL | LITERAL OP FIELD          OP: == != < <= > >=
  membership := STRING ["not"] "in" FIELD                    (flag sets)
  FIELD      := name | authority.name     (authority names may contain '-')
  LITERAL    := 'single' | "double" quoted string (backslash escapes the next character) | integer

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

from typing import Any, Callable, Mapping, NamedTuple, Union

import jax.numpy as jnp

from aqgov.errors import PolicyError, TaxonomyError
from aqgov.credentials._taxonomy import CREDENTIALED, PRESENT, Field, LabelSpace, string_code

MAX_LENGTH = 4096
MAX_DEPTH = 64
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
COMPARISONS = ("==", "!=", "<", "<=", ">", ">=")
KEYWORDS = ("and", "or", "not", "in", "true", "false")
_FLIP = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
_DIGITS = "0123456789"
_NAME_START = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_"
_NAME_CHARS = _NAME_START + _DIGITS + "-"
_WHITESPACE = " \t\r\n"


# ---------------------------------------------------------------------------------------------
# Syntax tree


class Bool(NamedTuple):
  """The constant `true` or `false`."""

  value: bool


class Compare(NamedTuple):
  """`field op value` (a literal on the left is normalised to the right, flipping `op`)."""

  field: str
  op: str
  value: Union[int, str]


class Member(NamedTuple):
  """`'value' in field` (or `not in` when `negated`) over a flags field."""

  value: str
  field: str
  negated: bool = False


class Not(NamedTuple):
  operand: "Expr"


class And(NamedTuple):
  operands: tuple["Expr", ...]


class Or(NamedTuple):
  operands: tuple["Expr", ...]


Expr = Union[Bool, Compare, Member, Not, And, Or]


# ---------------------------------------------------------------------------------------------
# Tokens


class Token(NamedTuple):
  kind: str  # name, keyword, int, str, op, lparen, rparen, end
  text: str
  pos: int
  value: Any = None


def _describe(tok: Token) -> str:
  if tok.kind == "end":
    return "the end of the expression"
  return repr(tok.text)


def _error(text: str, pos: int, message: str) -> PolicyError:
  return PolicyError(f"policy expression {text!r}, column {pos + 1}: {message}")


def tokenize(text: str) -> list[Token]:
  """Tokens of `text` followed by an `end` token; `PolicyError` at the first bad character."""
  if not isinstance(text, str):
    raise PolicyError(f"a policy expression must be a string, got {type(text).__name__}")
  if len(text) > MAX_LENGTH:
    raise PolicyError(f"policy expression is {len(text)} characters long; at most {MAX_LENGTH} are allowed")
  out: list[Token] = []
  i, n = 0, len(text)
  while i < n:
    c = text[i]
    if c in _WHITESPACE:
      i += 1
    elif c == "(" or c == ")":
      out.append(Token("lparen" if c == "(" else "rparen", c, i))
      i += 1
    elif text.startswith(("==", "!=", "<=", ">="), i):
      out.append(Token("op", text[i:i + 2], i))
      i += 2
    elif c in "<>":
      out.append(Token("op", c, i))
      i += 1
    elif c in "'\"":
      i = _string(text, i, out)
    elif c in _DIGITS or (c == "-" and i + 1 < n and text[i + 1] in _DIGITS):
      i = _integer(text, i, out)
    elif c in _NAME_START:
      i = _name(text, i, out)
    elif c == "=":
      raise _error(text, i, "expected a comparison operator; write '==' for equality")
    else:
      raise _error(text, i, f"unexpected character {c!r}; expected a field name, a quoted string, an integer, "
                   "'(' , ')' or one of == != < <= > >=")
  out.append(Token("end", "", n))
  return out


def _string(text: str, start: int, out: list[Token]) -> int:
  quote, i, chars = text[start], start + 1, []
  while i < len(text):
    c = text[i]
    if c == "\\":
      if i + 1 >= len(text):
        break
      chars.append(text[i + 1])
      i += 2
    elif c == quote:
      out.append(Token("str", text[start:i + 1], start, "".join(chars)))
      return i + 1
    else:
      chars.append(c)
      i += 1
  raise _error(text, start, f"string starting here is not closed; expected a closing {quote}")


def _integer(text: str, start: int, out: list[Token]) -> int:
  i = start + 1
  while i < len(text) and text[i] in _DIGITS:
    i += 1
  if i < len(text) and text[i] in _NAME_CHARS + ".":
    raise _error(text, start, f"{text[start:i + 1]!r}... is neither an integer nor a field name "
                 "(field names start with a letter or '_')")
  value = int(text[start:i]) if i - start <= 12 else INT32_MAX + 1
  if not INT32_MIN <= value <= INT32_MAX:
    raise _error(text, start, f"integer {text[start:i][:16]} does not fit int32 labels; expected a value in "
                 f"[{INT32_MIN}, {INT32_MAX}]")
  out.append(Token("int", text[start:i], start, value))
  return i


def _name(text: str, start: int, out: list[Token]) -> int:
  i = start
  while i < len(text) and text[i] in _NAME_CHARS:
    i += 1
  if i < len(text) and text[i] == ".":
    if i + 1 >= len(text) or text[i + 1] not in _NAME_START:
      raise _error(text, i, "expected a field name after 'authority.'")
    i += 1
    while i < len(text) and text[i] in _NAME_START + _DIGITS:
      i += 1
    if i < len(text) and text[i] in "-.":
      raise _error(text, i, f"unexpected {text[i]!r} in a field name; field names use letters, digits and '_'")
  word = text[start:i]
  out.append(Token("keyword" if word in KEYWORDS else "name", word, start, word))
  return i


# ---------------------------------------------------------------------------------------------
# Parser


class _Parser:
  """Recursive descent over tokens; remembers where each comparison started for type errors."""

  def __init__(self, text: str):
    self.text = text
    self.tokens = tokenize(text)
    self.i = 0
    self.depth = 0
    self.spans: dict[int, int] = {}

  def peek(self) -> Token:
    return self.tokens[self.i]

  def take(self) -> Token:
    tok = self.tokens[self.i]
    self.i += 1
    return tok

  def is_keyword(self, word: str) -> bool:
    tok = self.peek()
    return tok.kind == "keyword" and tok.text == word

  def fail(self, expected: str) -> PolicyError:
    tok = self.peek()
    return _error(self.text, tok.pos, f"expected {expected}, found {_describe(tok)}")

  def nest(self, pos: int) -> None:
    self.depth += 1
    if self.depth > MAX_DEPTH:
      raise _error(self.text, pos, f"expression nests deeper than {MAX_DEPTH} levels; simplify it")

  def parse(self) -> Expr:
    if self.peek().kind == "end":
      raise self.fail("a condition such as \"field == 'value'\" or true")
    expr = self.or_expr()
    if self.peek().kind != "end":
      raise self.fail("'and', 'or', ')' or the end of the expression")
    return expr

  def or_expr(self) -> Expr:
    items = [self.and_expr()]
    while self.is_keyword("or"):
      self.take()
      items.append(self.and_expr())
    return items[0] if len(items) == 1 else Or(tuple(items))

  def and_expr(self) -> Expr:
    items = [self.not_expr()]
    while self.is_keyword("and"):
      self.take()
      items.append(self.not_expr())
    return items[0] if len(items) == 1 else And(tuple(items))

  def not_expr(self) -> Expr:
    if self.is_keyword("not"):
      tok = self.take()
      self.nest(tok.pos)
      out = Not(self.not_expr())
      self.depth -= 1
      return out
    return self.atom()

  def atom(self) -> Expr:
    tok = self.peek()
    if tok.kind == "lparen":
      self.take()
      self.nest(tok.pos)
      inner = self.or_expr()
      if self.peek().kind != "rparen":
        raise self.fail(f"')' to close the '(' at column {tok.pos + 1}")
      self.take()
      self.depth -= 1
      return inner
    if tok.kind == "keyword" and tok.text in ("true", "false"):
      self.take()
      return Bool(tok.text == "true")
    if tok.kind == "name":
      return self.comparison_from_field()
    if tok.kind in ("str", "int"):
      return self.comparison_from_literal()
    raise self.fail("a field name, a quoted value, an integer, 'not', '(' , true or false")

  def comparison_from_field(self) -> Expr:
    field = self.take()
    if self.peek().kind != "op":
      raise self.fail(f"a comparison operator (== != < <= > >=) after field {field.text!r}")
    op = self.take().text
    lit = self.peek()
    if lit.kind not in ("str", "int"):
      raise self.fail(f"a quoted string or an integer after '{op}'")
    self.take()
    return self.mark(Compare(field.text, op, lit.value), field.pos)

  def comparison_from_literal(self) -> Expr:
    lit = self.take()
    if self.peek().kind == "op":
      op = self.take().text
      field = self.peek()
      if field.kind != "name":
        raise self.fail(f"a field name after '{op}' (compare a field with a literal)")
      self.take()
      return self.mark(Compare(field.text, _FLIP[op], lit.value), lit.pos)
    negated = False
    if self.is_keyword("not"):
      self.take()
      negated = True
      if not self.is_keyword("in"):
        raise self.fail("'in' after 'not' (write \"'value' not in field\")")
    if not self.is_keyword("in"):
      raise self.fail(f"a comparison operator or 'in' after {lit.text}")
    self.take()
    if lit.kind != "str":
      raise _error(self.text, lit.pos, f"flag membership needs a quoted flag name, found {lit.text}")
    field = self.peek()
    if field.kind != "name":
      raise self.fail("a flags field name after 'in'")
    self.take()
    return self.mark(Member(lit.value, field.text, negated), lit.pos)

  def mark(self, node: Expr, pos: int) -> Expr:
    self.spans[id(node)] = pos
    return node


def parse(text: str) -> Expr:
  """The syntax tree of `text`; `PolicyError` naming the column and what was expected."""
  return _Parser(text).parse()


# ---------------------------------------------------------------------------------------------
# Canonical text

_PRECEDENCE = {Or: 1, And: 2, Not: 3}


def _quote(s: str) -> str:
  return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _literal(value: Union[int, str]) -> str:
  return _quote(value) if isinstance(value, str) else str(int(value))


def to_text(expr: Expr) -> str:
  """Canonical text of `expr`: single spaces, single quotes, minimal parentheses.

  `parse(to_text(e)) == e` for every tree `parse` returns, so the canonical text can stand for
  the expression in hashes and signatures.
  """
  if isinstance(expr, Bool):
    return "true" if expr.value else "false"
  if isinstance(expr, Compare):
    return f"{expr.field} {expr.op} {_literal(expr.value)}"
  if isinstance(expr, Member):
    return f"{_quote(expr.value)} {'not in' if expr.negated else 'in'} {expr.field}"
  if isinstance(expr, Not):
    inner = to_text(expr.operand)
    return "not " + (f"({inner})" if isinstance(expr.operand, (And, Or)) else inner)
  if isinstance(expr, (And, Or)):
    word = " and " if isinstance(expr, And) else " or "
    mine = _PRECEDENCE[type(expr)]
    parts = []
    for child in expr.operands:
      text = to_text(child)
      parts.append(f"({text})" if _PRECEDENCE.get(type(child), 9) <= mine else text)
    return word.join(parts)
  raise PolicyError(f"not a policy expression node: {type(expr).__name__}")


def canonical_text(text: str) -> str:
  """`to_text(parse(text))`: the form policies store and hash."""
  return to_text(parse(text))


def fields(expr: Expr) -> tuple[str, ...]:
  """Field names `expr` mentions, in first-use order."""
  out: list[str] = []

  def walk(e: Expr) -> None:
    if isinstance(e, (Compare, Member)):
      if e.field not in out:
        out.append(e.field)
    elif isinstance(e, Not):
      walk(e.operand)
    elif isinstance(e, (And, Or)):
      for c in e.operands:
        walk(c)

  walk(expr)
  return tuple(out)


# ---------------------------------------------------------------------------------------------
# Type checking and compilation

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
  raise PolicyError(f"label arrays lack {missing}; build them with LabelSpace.encode over the same taxonomies "
                    "the policy was compiled with")


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
      raise _field_error(where(expr), f"'in' tests a flags field, but {qualified} is {field.kind}; "
                         f"compare it with {_ops_for(field)}")
    if expr.value not in field.values:
      raise _field_error(where(expr), f"{expr.value!r} is not a flag of {qualified}; expected {field.allowed()}")
    return
  if field.kind == "flags":
    raise _field_error(where(expr), f"{qualified} is a flag set: test it with \"'{field.values[0]}' in {expr.field}\" "
                       f"(flags: {', '.join(map(repr, field.values))})")
  if field.kind in ("enum", "string") and expr.op not in ("==", "!="):
    raise _field_error(where(expr), f"{qualified} is {field.kind}: only == and != apply, not {expr.op}")
  if field.kind == "int":
    if not isinstance(expr.value, int):
      raise _field_error(where(expr), f"{qualified} is int: compare it with an integer, not {_literal(expr.value)}")
    return
  if not isinstance(expr.value, str):
    raise _field_error(where(expr), f"{qualified} is {field.kind}: compare it with a quoted string"
                       + (f", one of {', '.join(map(repr, field.values))}" if field.kind == "enum" else ""))
  if field.kind == "enum" and expr.value not in field.values:
    raise _field_error(where(expr), f"{expr.value!r} is not a value of {qualified}; expected {field.allowed()}")


def _ops_for(field: Field) -> str:
  return {"int": "== != < <= > >= and an integer", "enum": "== or != and a quoted value",
          "string": "== or != and a quoted string"}.get(field.kind, "'in'")


def _resolve(expr: Union[Compare, Member], space: LabelSpace, where: Callable[[Expr], str]) -> tuple[str, Field]:
  try:
    return space.resolve(expr.field)
  except TaxonomyError as exc:
    raise _field_error(where(expr), f"{exc}; known fields: {', '.join(k for k in _field_keys(space))}") from None


def _field_keys(space: LabelSpace) -> list[str]:
  return [f"{t.authority}.{f.name}" for t in space.taxonomies for f in t.fields]


def check(expr: Union[Expr, str], space: LabelSpace) -> Expr:
  """`expr` (parsed if text) after type-checking it against `space`; `PolicyError` otherwise."""
  if isinstance(expr, str):
    text = expr
    parser = _Parser(text)
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


def compile_expr(expr: Union[Expr, str], label_space: Any) -> Condition:
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
    return jnp.logical_and(lab[present] != 0, op(jnp.asarray(lab[qualified], jnp.int32), jnp.int32(code)))

  return compare


_JNP_OPS = {"==": jnp.equal, "!=": jnp.not_equal, "<": jnp.less, "<=": jnp.less_equal,
            ">": jnp.greater, ">=": jnp.greater_equal}
