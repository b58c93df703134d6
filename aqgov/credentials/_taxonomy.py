"""Authority taxonomies: the typed label fields an authority publishes, and their integer encoding.

Field kinds and how a label becomes one int32 that can enter jit:
  enum   -> index of the value in `values`
  int    -> the integer itself (checked against `min`/`max`)
  flags  -> bit set: bit k is set when `values[k]` is present (at most 31 values)
  string -> a stable 31-bit hash of the UTF-8 text (compare only with == / !=)

A `LabelSpace` joins several authorities' taxonomies; its arrays are namespaced
`authority.field`, plus `authority.@present` (1 where that authority labelled the example) and
`@credentialed` (1 for credentialed examples, 0 for ones admitted as uncredentialed).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from aqgov.documents import _canonical as canonical
from aqgov.documents._files import read_text
from aqgov.documents._toml import dumps_toml, loads_toml
from aqgov.errors import TaxonomyError

FIELD_KINDS = ("enum", "int", "flags", "string")
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
CREDENTIALED = "@credentialed"
PRESENT = "@present"


def string_code(text: str) -> int:
  """Stable 31-bit code of a free-string label."""
  return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:4], "big") & 0x7FFFFFFF


class Field(NamedTuple):
  """One typed label field."""

  name: str
  kind: str
  values: tuple[str, ...] = ()
  min: int | None = None
  max: int | None = None

  def allowed(self) -> str:
    if self.kind in ("enum", "flags"):
      return ("one of " if self.kind == "enum" else "a list drawn from ") + ", ".join(
        map(repr, self.values)
      )
    if self.kind == "int":
      return f"an integer in [{self.min}, {self.max}]"
    return "a string"

  def encode_value(self, value: Any, authority: str = "") -> int:
    """The int32 code of one label value; `TaxonomyError` naming field, value and what is allowed."""
    where = f"{authority}.{self.name}" if authority else self.name

    def bad() -> TaxonomyError:
      return TaxonomyError(f"label {where} = {value!r} is not allowed: expected {self.allowed()}")

    if self.kind == "enum":
      if not isinstance(value, str) or value not in self.values:
        raise bad()
      return self.values.index(value)
    if self.kind == "int":
      if isinstance(value, bool) or not isinstance(value, int) or not self.min <= value <= self.max:
        raise bad()
      return int(value)
    if self.kind == "flags":
      if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
        raise bad()
      bits = 0
      for v in value:
        if not isinstance(v, str) or v not in self.values:
          raise bad()
        bits |= 1 << self.values.index(v)
      return bits
    if not isinstance(value, str):
      raise bad()
    return string_code(value)

  def to_dict(self) -> dict:
    out: dict[str, Any] = {"type": self.kind}
    if self.kind in ("enum", "flags"):
      out["values"] = list(self.values)
    if self.kind == "int":
      out["min"], out["max"] = self.min, self.max
    return out


def _parse_field(name: str, spec: Any) -> Field:
  if not isinstance(spec, Mapping):
    raise TaxonomyError(f"field {name!r} must be a table with a 'type'")
  kind = spec.get("type")
  if kind not in FIELD_KINDS:
    raise TaxonomyError(
      f"field {name!r} has type {kind!r}; allowed types: {', '.join(FIELD_KINDS)}"
    )
  unknown = set(spec) - {"type", "values", "min", "max", "description"}
  if unknown:
    raise TaxonomyError(f"field {name!r} has unknown keys {sorted(unknown)}")
  if kind in ("enum", "flags"):
    values = spec.get("values")
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
      raise TaxonomyError(f"{kind} field {name!r} needs a non-empty list of string 'values'")
    if len(set(values)) != len(values):
      raise TaxonomyError(f"{kind} field {name!r} lists a value twice")
    if kind == "flags" and len(values) > 31:
      raise TaxonomyError(
        f"flags field {name!r} has {len(values)} values; at most 31 fit one int32 bit set"
      )
    return Field(name, kind, tuple(values))
  if kind == "int":
    lo, hi = spec.get("min"), spec.get("max")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)):
      raise TaxonomyError(f"int field {name!r} needs integer 'min' and 'max'")
    if not INT32_MIN <= lo <= hi <= INT32_MAX:
      raise TaxonomyError(f"int field {name!r}: need {INT32_MIN} <= min <= max <= {INT32_MAX}")
    return Field(name, kind, (), lo, hi)
  return Field(name, kind)


def _valid_name(name: str) -> bool:
  return bool(name) and name.replace("_", "a").replace("-", "a").isalnum() and not name[0].isdigit()


class Taxonomy(NamedTuple):
  """An authority's published label fields."""

  authority: str
  fields: tuple[Field, ...]

  @classmethod
  def from_dict(cls, doc: Mapping[str, Any]) -> Taxonomy:
    if not isinstance(doc, Mapping):
      raise TaxonomyError(
        f"a taxonomy is a table of [authority] and [fields.<name>], got {type(doc).__name__}"
      )
    auth = doc.get("authority")
    if (
      not isinstance(auth, Mapping)
      or not isinstance(auth.get("name"), str)
      or not _valid_name(auth["name"])
    ):
      raise TaxonomyError("taxonomy needs [authority] name = \"...\" (letters, digits, '-', '_')")
    fields = doc.get("fields")
    if not isinstance(fields, Mapping) or not fields:
      raise TaxonomyError(f"taxonomy of {auth['name']!r} defines no [fields.<name>] tables")
    for name in fields:
      if not _valid_name(name) or "-" in name:
        raise TaxonomyError(f"field name {name!r} must be an identifier (letters, digits, '_')")
    return cls(auth["name"], tuple(_parse_field(n, s) for n, s in fields.items()))

  @classmethod
  def from_toml(cls, text: str) -> Taxonomy:
    """Parse the TOML form from `text` (read a file with `Taxonomy.read`)."""
    if not isinstance(text, str):
      raise TaxonomyError(
        f"Taxonomy.from_toml takes TOML text, got {type(text).__name__}; read a file with "
        "Taxonomy.read"
      )
    return cls.from_dict(loads_toml(text, TaxonomyError, "taxonomy"))

  @classmethod
  def read(cls, path: str | os.PathLike) -> Taxonomy:
    """Parse the TOML file at `path`."""
    return cls.from_toml(read_text(path, TaxonomyError, "taxonomy"))

  def to_dict(self) -> dict:
    return {
      "authority": {"name": self.authority},
      "fields": {f.name: f.to_dict() for f in self.fields},
    }

  def to_toml(self) -> str:
    """TOML text that `from_toml` reads back to an equal taxonomy."""
    fields = {
      f.name: {
        "type": f.kind,
        **({"values": list(f.values)} if f.values else {}),
        **({"min": f.min, "max": f.max} if f.kind == "int" else {}),
      }
      for f in self.fields
    }
    return dumps_toml({"authority": {"name": self.authority}, "fields": fields})

  @property
  def id(self) -> str:
    """Hex SHA-256 of the canonical form."""
    return canonical.digest_hex(self.to_dict())

  def field(self, name: str) -> Field:
    for f in self.fields:
      if f.name == name:
        return f
    raise TaxonomyError(
      f"{self.authority!r} has no field {name!r}; fields: {[f.name for f in self.fields]}"
    )

  def encode_one(self, labels: Mapping[str, Any]) -> dict[str, int]:
    """Codes of one example's labels; every field is required and no other key is allowed."""
    if not isinstance(labels, Mapping):
      raise TaxonomyError(
        f"labels for {self.authority!r} must be a mapping, got {type(labels).__name__}"
      )
    names = {f.name for f in self.fields}
    extra = sorted(set(labels) - names)
    if extra:
      raise TaxonomyError(
        f"labels name unknown field(s) {extra} of {self.authority!r}; fields: {sorted(names)}"
      )
    out = {}
    for f in self.fields:
      if f.name not in labels:
        raise TaxonomyError(f"label {self.authority}.{f.name} is missing: expected {f.allowed()}")
      out[f.name] = f.encode_value(labels[f.name], self.authority)
    return out

  def encode_numpy(self, labels_list: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    rows = [self.encode_one(lab) for lab in labels_list]
    return {
      f.name: np.asarray([r[f.name] for r in rows], dtype=np.int32).reshape(len(rows))
      for f in self.fields
    }

  def encode(self, labels_list: Sequence[Mapping[str, Any]]) -> dict[str, jnp.ndarray]:
    """Int32 arrays of shape [B], one per field, from a batch of label dicts."""
    return {k: jnp.asarray(v) for k, v in self.encode_numpy(labels_list).items()}


class LabelSpace(NamedTuple):
  """Several authorities' taxonomies under one namespace (`authority.field`)."""

  taxonomies: tuple[Taxonomy, ...]

  @classmethod
  def of(cls, taxonomies: Taxonomy | Iterable[Taxonomy]) -> LabelSpace:
    if isinstance(taxonomies, LabelSpace):
      return taxonomies
    taxes = (taxonomies,) if isinstance(taxonomies, Taxonomy) else tuple(taxonomies)
    names = [t.authority for t in taxes]
    if len(set(names)) != len(names):
      raise TaxonomyError(f"two taxonomies claim the same authority name: {names}")
    return cls(taxes)

  def taxonomy(self, authority: str) -> Taxonomy:
    for t in self.taxonomies:
      if t.authority == authority:
        return t
    raise TaxonomyError(
      f"no taxonomy for authority {authority!r}; known: {[t.authority for t in self.taxonomies]}"
    )

  def resolve(self, name: str) -> tuple[str, Field]:
    """(`authority.field`, Field) for a bare or qualified field name."""
    if "." in name:
      auth, _, fname = name.partition(".")
      return name, self.taxonomy(auth).field(fname)
    owners = [t for t in self.taxonomies if any(f.name == name for f in t.fields)]
    if not owners:
      raise TaxonomyError(f"no trusted taxonomy defines field {name!r}")
    if len(owners) > 1:
      raise TaxonomyError(
        f"field {name!r} is defined by {[t.authority for t in owners]}; write it as authority.{name}"
      )
    return f"{owners[0].authority}.{name}", owners[0].field(name)

  def keys(self) -> list[str]:
    """Names of every label array this space produces, in a fixed order."""
    out = [CREDENTIALED]
    for t in self.taxonomies:
      out.append(f"{t.authority}.{PRESENT}")
      out += [f"{t.authority}.{f.name}" for f in t.fields]
    return out

  def encode_numpy(
    self, examples: Sequence[Mapping[str, Mapping[str, Any]] | None]
  ) -> dict[str, np.ndarray]:
    """Arrays [B] from per-example `{authority: labels}`; `None` marks an uncredentialed example."""
    cols: dict[str, list[int]] = {k: [] for k in self.keys()}
    for ex in examples:
      cols[CREDENTIALED].append(0 if ex is None else 1)
      ex = ex or {}
      unknown = set(ex) - {t.authority for t in self.taxonomies}
      if unknown:
        raise TaxonomyError(
          f"labels from unknown authorities {sorted(unknown)}; add their taxonomies"
        )
      for t in self.taxonomies:
        codes = t.encode_one(ex[t.authority]) if t.authority in ex else None
        cols[f"{t.authority}.{PRESENT}"].append(0 if codes is None else 1)
        for f in t.fields:
          cols[f"{t.authority}.{f.name}"].append(0 if codes is None else codes[f.name])
    return {k: np.asarray(v, dtype=np.int32).reshape(len(examples)) for k, v in cols.items()}

  def encode(
    self, examples: Sequence[Mapping[str, Mapping[str, Any]] | None]
  ) -> dict[str, jnp.ndarray]:
    return {k: jnp.asarray(v) for k, v in self.encode_numpy(examples).items()}
