"""Policy condition expressions: parsing, canonical text, typing, compiled semantics, fuzzing."""

from __future__ import annotations

import string
from unittest import mock

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aqgov.credentials._taxonomy import LabelSpace, Taxonomy
from aqgov.errors import PolicyError
from aqgov.policy._conditions import check, compile_expr
from aqgov.policy._expressions import (
  MAX_DEPTH,
  And,
  Bool,
  Compare,
  Member,
  Not,
  Or,
  canonical_text,
  fields,
  parse,
  to_text,
  tokenize,
)

from policy_reference import ACME, EU, SPACE, batches, evaluate, expressions

# -- parsing ------------------------------------------------------------------------------------


def test_parses_the_issue_example_into_a_tree():
  assert parse("sensitivity_tier >= 2 or 'EU' in jurisdictions") == Or(
    (Compare("sensitivity_tier", ">=", 2), Member("EU", "jurisdictions"))
  )


def test_and_binds_tighter_than_or_and_not_tighter_than_and():
  assert parse("a == 1 or not b == 2 and c == 3") == Or(
    (Compare("a", "==", 1), And((Not(Compare("b", "==", 2)), Compare("c", "==", 3))))
  )


def test_parentheses_override_precedence():
  assert parse("(a == 1 or b == 2) and c == 3") == And(
    (Or((Compare("a", "==", 1), Compare("b", "==", 2))), Compare("c", "==", 3))
  )


def test_literal_on_the_left_is_normalised_with_the_operator_flipped():
  assert parse("2 <= sensitivity_tier") == parse("sensitivity_tier >= 2")
  assert parse("'x' != source") == parse("source != 'x'")


def test_qualified_names_may_have_dashes_in_the_authority():
  assert parse("acme-data.sensitivity_tier > -1") == Compare("acme-data.sensitivity_tier", ">", -1)


def test_not_in_is_negated_membership():
  assert parse("'EU' not in jurisdictions") == Member("EU", "jurisdictions", True)


def test_both_quote_styles_and_escapes_give_the_same_string():
  assert (
    parse('source == "it\'s"') == parse("source == 'it\\'s'") == Compare("source", "==", "it's")
  )


def test_true_and_false_are_constants():
  assert parse("true") == Bool(True)
  assert parse("not false") == Not(Bool(False))


def test_fields_lists_each_mentioned_field_once_in_order():
  assert fields(parse("a == 1 or 'x' in b and a != 2")) == ("a", "b")


@pytest.mark.parametrize(
  "text, column, expected",
  [
    ("", 1, "a condition"),
    ("a =", 3, "'=='"),
    ("a == ", 6, "quoted string or an integer"),
    ("(a == 1", 8, "')' to close"),
    ("a == 1 b", 8, "'and', 'or'"),
    ("a == 1.5", 6, "neither an integer"),
    ("a == 99999999999", 6, "int32"),
    ("a == 'open", 6, "not closed"),
    ("a == 1 && b == 2", 8, "unexpected character '&'"),
    ("1 in jurisdictions", 1, "quoted flag"),
    ("'EU' not jurisdictions", 10, "'in' after 'not'"),
    ("a == b", 6, "quoted string or an integer"),
  ],
)
def test_syntax_errors_name_the_column_and_what_was_expected(text, column, expected):
  with pytest.raises(PolicyError) as info:
    parse(text)
  assert f"column {column}:" in str(info.value)
  assert expected in str(info.value)


def test_nesting_deeper_than_the_limit_is_refused():
  with pytest.raises(PolicyError, match="nests deeper"):
    parse("(" * (MAX_DEPTH + 1) + "true" + ")" * (MAX_DEPTH + 1))
  with pytest.raises(PolicyError, match="nests deeper"):
    parse("not " * (MAX_DEPTH + 1) + "true")


def test_overlong_text_is_refused():
  with pytest.raises(PolicyError, match="characters long"):
    parse(" or ".join(["true"] * 2000))


def test_non_string_input_is_refused():
  with pytest.raises(PolicyError, match="must be a string"):
    parse(42)


@given(expressions)
def test_canonical_text_parses_back_to_the_same_tree(expr):
  assert parse(to_text(expr)) == expr


@given(expressions)
def test_canonical_text_is_a_fixed_point(expr):
  text = to_text(expr)
  assert canonical_text(text) == text


def test_canonical_text_normalises_spacing_and_quotes():
  assert canonical_text('(sensitivity_tier>=2)or"EU"in  jurisdictions') == (
    "sensitivity_tier >= 2 or 'EU' in jurisdictions"
  )


# -- typing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "text, message",
  [
    ("license_class == 'mystery'", "'public-domain', 'cc-by', 'proprietary', 'unknown'"),
    ("license_class < 'cc-by'", "only == and != apply"),
    ("license_class == 2", "quoted string"),
    ("sensitivity_tier == 'two'", "compare it with an integer"),
    ("jurisdictions == 'EU'", "'EU' in jurisdictions"),
    ("'EU' in license_class", "'in' tests a flags field"),
    ("'FR' in jurisdictions", "not a flag"),
    ("source > 'a'", "only == and != apply"),
    ("nonexistent == 1", "no trusted taxonomy defines field"),
    ("ghost.license_class == 'cc-by'", "no taxonomy for authority"),
  ],
)
def test_ill_typed_conditions_raise_policy_errors_saying_what_is_allowed(text, message):
  with pytest.raises(PolicyError) as info:
    check(text, SPACE)
  assert message in str(info.value)
  assert text in str(info.value)


def test_type_errors_point_at_the_offending_comparison():
  with pytest.raises(PolicyError, match="column 26 "):
    check("sensitivity_tier > 1 and license_class == 'mystery'", SPACE)


def test_a_field_two_authorities_define_must_be_qualified():
  other = Taxonomy.from_dict(
    {"authority": {"name": "other"}, "fields": {"source": {"type": "string"}}}
  )
  space = LabelSpace.of([ACME, other])
  with pytest.raises(PolicyError, match="authority.source"):
    check("source == 'wiki'", space)
  check("other.source == 'wiki'", space)


def test_a_single_taxonomy_is_a_label_space():
  fn = compile_expr("sensitivity_tier >= 2", ACME)
  labels = ACME.encode(
    [
      {"license_class": "cc-by", "sensitivity_tier": t, "jurisdictions": [], "source": "x"}
      for t in range(4)
    ]
  )
  assert fn(labels).tolist() == [False, False, True, True]


# -- compiled semantics ---------------------------------------------------------------------------


@given(expressions, batches)
def test_compiled_expression_equals_the_reference_evaluator(expr, examples):
  labels = SPACE.encode(examples)
  got = np.asarray(compile_expr(expr, SPACE)(labels))
  assert got.dtype == np.bool_ and got.shape == (len(examples),)
  assert got.tolist() == [evaluate(expr, ex) for ex in examples]


@settings(max_examples=10)
@given(expressions, batches)
def test_compiled_expression_is_the_same_under_jit_and_vmap(expr, examples):
  labels = SPACE.encode(examples)
  fn = compile_expr(expr, SPACE)
  eager = np.asarray(fn(labels))
  assert np.array_equal(np.asarray(jax.jit(fn)(labels)), eager)
  assert np.array_equal(np.asarray(jax.vmap(fn)(labels)), eager)


def _one(example):
  return SPACE.encode([example])


def test_any_comparison_on_a_missing_authority_is_false():
  only_acme = {
    "acme-data": {
      "license_class": "cc-by",
      "sensitivity_tier": 0,
      "jurisdictions": [],
      "source": "x",
    }
  }
  for text in ("personal_data == 'yes'", "personal_data != 'yes'", "lawful_basis != 'none'"):
    assert not bool(compile_expr(text, SPACE)(_one(only_acme))[0])


def test_not_negates_the_whole_sub_expression_on_missing_labels():
  only_acme = {
    "acme-data": {
      "license_class": "cc-by",
      "sensitivity_tier": 0,
      "jurisdictions": [],
      "source": "x",
    }
  }
  assert bool(compile_expr("not (personal_data == 'no')", SPACE)(_one(only_acme))[0])


def test_string_fields_compare_by_their_code():
  ex = {
    "acme-data": {
      "license_class": "cc-by",
      "sensitivity_tier": 0,
      "jurisdictions": ["UK"],
      "source": "forum",
    }
  }
  assert bool(compile_expr("source == 'forum'", SPACE)(_one(ex))[0])
  assert not bool(compile_expr("source == 'wiki'", SPACE)(_one(ex))[0])


def test_labels_lacking_the_compiled_keys_are_refused():
  with pytest.raises(PolicyError, match="LabelSpace.encode"):
    compile_expr("sensitivity_tier > 1", SPACE)(
      EU.encode([{"lawful_basis": "none", "personal_data": "no"}])
    )


# -- fuzzing: only PolicyError, and nothing is executed ---------------------------------------------

TOKENS = [
  "and",
  "or",
  "not",
  "in",
  "true",
  "false",
  "(",
  ")",
  "==",
  "!=",
  "<",
  "<=",
  ">",
  ">=",
  "=",
  "'EU'",
  '"x"',
  "'",
  '"',
  "0",
  "-1",
  "99999999999",
  "license_class",
  "acme-data.sensitivity_tier",
  "jurisdictions",
  "a.b.c",
  "__import__('os')",
  "\\",
  ".",
  "-",
  ",",
  "lambda",
  "1e3",
  "@present",
  " ",
  "\t",
  "\u00e9",
  "\u0661",
]


def _parse_or_policy_error(text: str) -> None:
  no_exec = AssertionError("the expression language must never evaluate Python")
  with (
    mock.patch("builtins.eval", side_effect=no_exec),
    mock.patch("builtins.exec", side_effect=no_exec),
    mock.patch("builtins.compile", side_effect=no_exec),
  ):
    try:
      expr = parse(text)
    except PolicyError:
      return
    try:
      check(expr, SPACE)
    except PolicyError:
      pass
  assert parse(to_text(expr)) == expr


@settings(max_examples=300)
@given(st.text(max_size=60))
def test_random_text_only_ever_raises_policy_errors(text):
  _parse_or_policy_error(text)


@settings(max_examples=300)
@given(st.text(alphabet=string.printable, max_size=60))
def test_random_printable_text_only_ever_raises_policy_errors(text):
  _parse_or_policy_error(text)


@settings(max_examples=300)
@given(st.lists(st.sampled_from(TOKENS), max_size=14), st.sampled_from(["", " "]))
def test_random_token_soups_only_ever_raise_policy_errors(tokens, sep):
  _parse_or_policy_error(sep.join(tokens))


def test_python_code_is_data_not_code():
  with pytest.raises(PolicyError):
    parse("__import__('os').system('false')")
  expr = parse("source == \"__import__('os').system('false')\"")
  assert expr == Compare("source", "==", "__import__('os').system('false')")


def test_tokenizer_rejects_non_ascii_digits_and_letters():
  for text in ("\u0661 == tier", "caf\u00e9 == 'x'"):
    with pytest.raises(PolicyError, match="unexpected character"):
      tokenize(text)
