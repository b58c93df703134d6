"""Taxonomies: typed fields, int32 encodings that can enter jit, clear errors, namespaced label spaces."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aqgov.credentials._taxonomy import CREDENTIALED, Field, LabelSpace, Taxonomy, string_code
from aqgov.errors import TaxonomyError
from aqgov.examples import sample as sample

ACME = sample.taxonomy_path("acme-data").read_text()  # exactly the taxonomy TOML of the format spec

OWNER = """
[authority]
name = "model-owner"
[fields.sensitivity_tier]
type = "int"
min = 0
max = 9
[fields.approved]
type = "enum"
values = ["no", "yes"]
"""

LABELS = [
  {"license_class": "cc-by", "sensitivity_tier": 2, "jurisdictions": ["EU"], "source": "forum"},
  {
    "license_class": "unknown",
    "sensitivity_tier": 0,
    "jurisdictions": ["US", "UK"],
    "source": "news",
  },
  {"license_class": "public-domain", "sensitivity_tier": 3, "jurisdictions": [], "source": "forum"},
]


@pytest.fixture
def acme() -> Taxonomy:
  return Taxonomy.from_toml(ACME)


def test_encode_gives_int32_arrays_of_batch_shape(acme):
  arrays = acme.encode(LABELS)
  assert set(arrays) == {"license_class", "sensitivity_tier", "jurisdictions", "source"}
  for a in arrays.values():
    assert isinstance(a, jax.Array) and a.dtype == jnp.int32 and a.shape == (3,)


def test_encode_uses_enum_index_integer_bit_set_and_string_code(acme):
  arrays = acme.encode(LABELS)
  assert arrays["license_class"].tolist() == [1, 3, 0]
  assert arrays["sensitivity_tier"].tolist() == [2, 0, 3]
  assert arrays["jurisdictions"].tolist() == [0b001, 0b110, 0]
  assert arrays["source"].tolist() == [
    string_code("forum"),
    string_code("news"),
    string_code("forum"),
  ]


def test_encoded_labels_enter_jit(acme):
  select = jax.jit(lambda lab: (lab["sensitivity_tier"] >= 2) | ((lab["jurisdictions"] & 1) != 0))
  assert select(acme.encode(LABELS)).tolist() == [True, False, True]


def test_an_empty_batch_encodes_to_empty_arrays(acme):
  assert all(a.shape == (0,) and a.dtype == jnp.int32 for a in acme.encode([]).values())


@pytest.mark.parametrize(
  "field, value, allowed",
  [
    ("license_class", "gpl", "one of 'public-domain', 'cc-by', 'proprietary', 'unknown'"),
    ("sensitivity_tier", 4, "an integer in [0, 3]"),
    ("sensitivity_tier", True, "an integer in [0, 3]"),
    ("sensitivity_tier", "2", "an integer in [0, 3]"),
    ("jurisdictions", ["EU", "FR"], "a list drawn from 'EU', 'US', 'UK'"),
    ("jurisdictions", "EU", "a list drawn from 'EU', 'US', 'UK'"),
    ("source", 7, "a string"),
  ],
)
def test_a_wrong_label_names_field_value_and_what_is_allowed(acme, field, value, allowed):
  labels = dict(LABELS[0], **{field: value})
  with pytest.raises(TaxonomyError) as err:
    acme.encode([labels])
  message = str(err.value)
  assert f"acme-data.{field}" in message and repr(value) in message and allowed in message


def test_missing_and_unknown_label_fields_are_named(acme):
  with pytest.raises(TaxonomyError, match="acme-data.source is missing"):
    acme.encode_one({k: v for k, v in LABELS[0].items() if k != "source"})
  with pytest.raises(TaxonomyError, match=r"unknown field\(s\) \['colour'\]"):
    acme.encode_one(dict(LABELS[0], colour="red"))


@pytest.mark.parametrize(
  "toml, message",
  [
    ("[fields.a]\ntype = 'int'\nmin = 0\nmax = 1", "needs \\[authority\\]"),
    ("[authority]\nname = 'x'", "defines no"),
    ("[authority]\nname = 'x'\n[fields.a]\ntype = 'float'", "allowed types"),
    (
      "[authority]\nname = 'x'\n[fields.a]\ntype = 'enum'\nvalues = ['p', 'p']",
      "lists a value twice",
    ),
    ("[authority]\nname = 'x'\n[fields.a]\ntype = 'enum'\nvalues = []", "non-empty list"),
    ("[authority]\nname = 'x'\n[fields.a]\ntype = 'int'\nmin = 0", "integer 'min' and 'max'"),
    ("[authority]\nname = 'x'\n[fields.a]\ntype = 'int'\nmin = 3\nmax = 1", "min <= max"),
    (
      "[authority]\nname = 'x'\n[fields.a]\ntype = 'flags'\nvalues = [{}]".format(
        ", ".join(f"'v{i}'" for i in range(32))
      ),
      "at most 31",
    ),
    ("[authority]\nname = 'x'\n[fields.a]\ntype = 'string'\ncolour = 'red'", "unknown keys"),
    ("[authority]\nname = 'x'\n[fields.a-b]\ntype = 'string'", "must be an identifier"),
    ("[authority]\nname = 'x'\n[fields.a\ntype = 'string'", "not valid TOML"),
  ],
)
def test_malformed_taxonomies_are_refused_with_a_reason(toml, message):
  with pytest.raises(TaxonomyError, match=message):
    Taxonomy.from_toml(toml)


def test_read_reads_a_path(tmp_path):
  path = tmp_path / "acme.toml"
  path.write_text(ACME)
  assert Taxonomy.read(path) == Taxonomy.read(str(path)) == Taxonomy.from_toml(ACME)
  with pytest.raises(TaxonomyError, match="does not exist"):
    Taxonomy.read(path.with_name("absent.toml"))


identifiers = st.from_regex(r"[a-z][a-z0-9_]{0,7}", fullmatch=True)
labels_text = st.text(
  st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=6
)


@st.composite
def taxonomies(draw) -> Taxonomy:
  names = draw(st.lists(identifiers, min_size=1, max_size=5, unique=True))
  fields = []
  for name in names:
    kind = draw(st.sampled_from(["enum", "int", "flags", "string"]))
    if kind in ("enum", "flags"):
      fields.append(
        Field(name, kind, tuple(draw(st.lists(labels_text, min_size=1, max_size=5, unique=True))))
      )
    elif kind == "int":
      lo = draw(st.integers(-(2**31), 2**31 - 1))
      fields.append(Field(name, kind, (), lo, draw(st.integers(lo, 2**31 - 1))))
    else:
      fields.append(Field(name, kind))
  return Taxonomy(draw(identifiers), tuple(fields))


@given(taxonomies())
def test_toml_round_trip_preserves_the_taxonomy_and_its_id(tax):
  back = Taxonomy.from_toml(tax.to_toml())
  assert back == tax
  assert back.id == tax.id
  assert Taxonomy.from_dict(tax.to_dict()) == tax


def test_taxonomy_id_changes_with_any_field(acme):
  changed = acme._replace(fields=acme.fields[:-1] + (Field("source", "enum", ("forum",)),))
  assert changed.id != acme.id


def test_string_codes_are_stable_31_bit_values():
  assert string_code("forum") == string_code("forum") != string_code("news")
  assert 0 <= string_code("anything at all") < 2**31


def test_label_space_namespaces_every_authority(acme):
  owner = Taxonomy.from_toml(OWNER)
  space = LabelSpace.of([acme, owner])
  arrays = space.encode(
    [
      {"acme-data": LABELS[0], "model-owner": {"sensitivity_tier": 7, "approved": "yes"}},
      {"acme-data": LABELS[1]},
      None,
    ]
  )
  assert list(arrays) == space.keys()
  assert arrays[CREDENTIALED].tolist() == [1, 1, 0]
  assert arrays["acme-data.@present"].tolist() == [1, 1, 0]
  assert arrays["model-owner.@present"].tolist() == [1, 0, 0]
  assert arrays["acme-data.sensitivity_tier"].tolist() == [2, 0, 0]
  assert arrays["model-owner.sensitivity_tier"].tolist() == [7, 0, 0]
  assert all(a.dtype == jnp.int32 and a.shape == (3,) for a in arrays.values())


def test_label_space_resolves_bare_names_only_when_unambiguous(acme):
  space = LabelSpace.of([acme, Taxonomy.from_toml(OWNER)])
  assert space.resolve("license_class") == ("acme-data.license_class", acme.field("license_class"))
  assert space.resolve("model-owner.sensitivity_tier")[0] == "model-owner.sensitivity_tier"
  with pytest.raises(TaxonomyError, match="write it as authority.sensitivity_tier"):
    space.resolve("sensitivity_tier")
  with pytest.raises(TaxonomyError, match="no trusted taxonomy defines"):
    space.resolve("colour")
  with pytest.raises(TaxonomyError, match="no taxonomy for authority"):
    space.resolve("nobody.colour")


def test_label_space_refuses_duplicate_authorities_and_unknown_ones(acme):
  with pytest.raises(TaxonomyError, match="same authority"):
    LabelSpace.of([acme, acme])
  with pytest.raises(TaxonomyError, match="unknown authorities"):
    LabelSpace.of(acme).encode([{"eu-office": {}}])


def test_a_single_taxonomy_is_a_one_authority_label_space(acme):
  assert LabelSpace.of(acme) == LabelSpace((acme,))
  assert LabelSpace.of(LabelSpace.of(acme)) == LabelSpace((acme,))


def test_sample_taxonomies_parse_and_encode_the_sample_labels():
  taxes = sample.taxonomies()
  assert set(taxes) == {"acme-data", "eu-office"}
  assert taxes["acme-data"] == Taxonomy.from_toml(ACME)
  space = LabelSpace.of(taxes.values())
  arrays = space.encode_numpy([ex.labels for ex in sample.examples()])
  assert len(np.unique(arrays["acme-data.license_class"])) == 4
  assert 0.3 < arrays["eu-office.@present"].mean() < 0.7
