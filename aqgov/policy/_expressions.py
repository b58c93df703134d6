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

This module holds the syntax: tokens, the parser, the syntax tree and its canonical text.
Type checking and compilation to traced conditions are in `_conditions`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from aqgov.errors import PolicyError

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
  value: int | str


class Member(NamedTuple):
  """`'value' in field` (or `not in` when `negated`) over a flags field."""

  value: str
  field: str
  negated: bool = False


class Not(NamedTuple):
  operand: Expr


class And(NamedTuple):
  operands: tuple[Expr, ...]


class Or(NamedTuple):
  operands: tuple[Expr, ...]


Expr = Bool | Compare | Member | Not | And | Or


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
    raise PolicyError(
      f"policy expression is {len(text)} characters long; at most {MAX_LENGTH} are allowed"
    )
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
      out.append(Token("op", text[i : i + 2], i))
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
      raise _error(
        text,
        i,
        f"unexpected character {c!r}; expected a field name, a quoted string, an integer, "
        "'(' , ')' or one of == != < <= > >=",
      )
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
      out.append(Token("str", text[start : i + 1], start, "".join(chars)))
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
    raise _error(
      text,
      start,
      f"{text[start : i + 1]!r}... is neither an integer nor a field name "
      "(field names start with a letter or '_')",
    )
  value = int(text[start:i]) if i - start <= 12 else INT32_MAX + 1
  if not INT32_MIN <= value <= INT32_MAX:
    raise _error(
      text,
      start,
      f"integer {text[start:i][:16]} does not fit int32 labels; expected a value in "
      f"[{INT32_MIN}, {INT32_MAX}]",
    )
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
      raise _error(
        text, i, f"unexpected {text[i]!r} in a field name; field names use letters, digits and '_'"
      )
  word = text[start:i]
  out.append(Token("keyword" if word in KEYWORDS else "name", word, start, word))
  return i


# ---------------------------------------------------------------------------------------------
# Parser


class Parser:
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
      raise _error(
        self.text, lit.pos, f"flag membership needs a quoted flag name, found {lit.text}"
      )
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
  return Parser(text).parse()


# ---------------------------------------------------------------------------------------------
# Canonical text

_PRECEDENCE = {Or: 1, And: 2, Not: 3}


def _quote(s: str) -> str:
  return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def literal(value: int | str) -> str:
  return _quote(value) if isinstance(value, str) else str(int(value))


def to_text(expr: Expr) -> str:
  """Canonical text of `expr`: single spaces, single quotes, minimal parentheses.

  `parse(to_text(e)) == e` for every tree `parse` returns, so the canonical text can stand for
  the expression in hashes and signatures.
  """
  if isinstance(expr, Bool):
    return "true" if expr.value else "false"
  if isinstance(expr, Compare):
    return f"{expr.field} {expr.op} {literal(expr.value)}"
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
