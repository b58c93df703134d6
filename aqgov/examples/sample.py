"""Sample data shipped with aqgov: two authorities' taxonomies and 240 labelled text examples.

`acme-data` (a dataset owner: license class, sensitivity tier, jurisdictions, source) labels every
example; `eu-office` (a jurisdiction authority: lawful basis, personal data) labels about half.
Labels in `examples.jsonl` are keyed by authority, so `aqgov credentials issue` can be run once per
authority over the same file.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from aqgov.credentials._manifest import Example, read_examples
from aqgov.credentials._taxonomy import Taxonomy

AUTHORITIES = ("acme-data", "eu-office")


def _data(*parts: str) -> Path:
  return Path(str(resources.files("aqgov").joinpath("data", *parts)))


def taxonomy_path(authority: str) -> Path:
  """Path of a sample authority's taxonomy TOML."""
  if authority not in AUTHORITIES:
    raise ValueError(f"no sample taxonomy for {authority!r}; sample authorities: {AUTHORITIES}")
  return _data("taxonomies", f"{authority}.toml")


def taxonomy_paths() -> dict[str, Path]:
  """Taxonomy TOML path of every sample authority."""
  return {a: taxonomy_path(a) for a in AUTHORITIES}


def examples_path() -> Path:
  """Path of the sample examples JSONL."""
  return _data("examples.jsonl")


def taxonomies() -> dict[str, Taxonomy]:
  """The sample authorities' parsed taxonomies."""
  return {a: Taxonomy.read(p) for a, p in taxonomy_paths().items()}


def examples() -> list[Example]:
  """The sample examples (labels keyed by authority)."""
  return read_examples(examples_path())


POLICIES = ("acme-routing", "eu-office")


def policy_path(name: str) -> Path:
  """Path of a sample routing policy TOML (`acme-routing` by acme-data, `eu-office` by eu-office)."""
  if name not in POLICIES:
    raise ValueError(f"no sample policy {name!r}; sample policies: {POLICIES}")
  return _data("policies", f"{name}.toml")


def profile_path() -> Path:
  """Path of the sample entropy profile for `aqgov.examples.tiny_lm` under the sample policies' groups."""
  return _data("profiles", "demo-profile.toml")
