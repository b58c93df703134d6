"""Regulator exports validated by the official models: SPDX 3.0.1 (spdx-python-model, the bindings
generated from the SPDX 3.0.1 SHACL model) and CycloneDX 1.6 (cyclonedx-python-lib's strict JSON
schema validator); an invalid document fails each, so the validators are live. And the EU GPAI
training-content summary draft."""

from __future__ import annotations

import copy
import io
import json

import pytest
from click.testing import CliRunner
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from spdx_python_model import v3_0_1 as spdx

from aqgov.cli import main
from aqgov.lineage import cyclonedx_bom, eu_gpai_summary, query, spdx_document
from aqgov.lineage._regulator import BLANK


@pytest.fixture(scope="module")
def run_dir(governed_run):
  return governed_run[0]


@pytest.fixture(scope="module")
def manifests(governed_run):
  from aqgov.credentials._manifest import MANIFEST, Manifest
  from aqgov.documents._document_type import read

  return [Manifest(read(MANIFEST, p)) for p in governed_run[1].manifests]


def spdx_problem(doc: dict) -> str | None:
  """None when `doc` is valid SPDX 3.0.1: it decodes into the model's classes (types, enums,
  property names, value kinds) and encodes back (required properties and cardinalities)."""
  try:
    objects = spdx.SHACLObjectSet()
    spdx.JSONLDDeserializer().deserialize_data(copy.deepcopy(doc), objects)
    spdx.JSONLDSerializer().write(objects, io.BytesIO())
  except (ValueError, TypeError, KeyError) as exc:
    return f"{type(exc).__name__}: {exc}"
  return None


def cyclonedx_problem(bom: dict) -> str | None:
  error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(json.dumps(bom))
  return None if error is None else str(error)


def _of_type(doc: dict, kind: str) -> list[dict]:
  return [g for g in doc["@graph"] if g["type"] == kind]


def test_the_spdx_document_is_valid_spdx_3_with_the_model_its_datasets_and_trained_on(
  run_dir, manifests
):
  doc = spdx_document(run_dir)
  assert spdx_problem(doc) is None
  (model,) = _of_type(doc, "ai_AIPackage")
  datasets = _of_type(doc, "dataset_DatasetPackage")
  assert {d["verifiedUsing"][0]["hashValue"] for d in datasets} == {m.root.hex() for m in manifests}
  owners = {o["spdxId"]: o["name"] for o in _of_type(doc, "Organization")}
  assert sorted(owners[d["originatedBy"][0]] for d in datasets) == sorted(
    m.authority for m in manifests
  )
  (rel,) = _of_type(doc, "Relationship")
  assert rel["relationshipType"] == "trainedOn" and rel["from"] == model["spdxId"]
  assert sorted(rel["to"]) == sorted(d["spdxId"] for d in datasets)
  (document,) = _of_type(doc, "SpdxDocument")
  assert {"ai", "dataset"} <= set(document["profileConformance"])


@pytest.mark.parametrize(
  "break_it",
  [
    lambda g: g.update(relationshipType="trainedWith") if g["type"] == "Relationship" else None,
    lambda g: g.pop("dataset_datasetType") if g["type"] == "dataset_DatasetPackage" else None,
    lambda g: g.update(ai_foo="x") if g["type"] == "ai_AIPackage" else None,
    lambda g: g.pop("created") if g["type"] == "CreationInfo" else None,
  ],
  ids=["unknown-relationship", "missing-dataset-type", "unknown-property", "missing-created"],
)
def test_an_invalid_spdx_document_fails_validation(run_dir, break_it):
  doc = spdx_document(run_dir)
  for g in doc["@graph"]:
    break_it(g)
  assert spdx_problem(doc) is not None


def test_the_cyclonedx_bom_is_a_valid_1_6_ml_bom_with_datasets_and_owners(run_dir, manifests):
  bom = cyclonedx_bom(run_dir)
  assert cyclonedx_problem(bom) is None
  model = next(c for c in bom["components"] if c["type"] == "machine-learning-model")
  data = [c for c in bom["components"] if c["type"] == "data"]
  assert [d["ref"] for d in model["modelCard"]["modelParameters"]["datasets"]] == [
    c["bom-ref"] for c in data
  ]
  assert sorted(c["data"][0]["governance"]["owners"][0]["organization"]["name"] for c in data) == (
    sorted(m.authority for m in manifests)
  )
  assert {c["hashes"][0]["content"] for c in data} == {m.root.hex() for m in manifests}
  (workflow,) = bom["formulation"][0]["workflows"]
  assert workflow["uid"] == bom["metadata"]["component"]["name"]


def test_an_invalid_cyclonedx_bom_fails_validation(run_dir):
  bom = cyclonedx_bom(run_dir)
  bad = copy.deepcopy(bom)
  bad["components"][1]["data"][0]["type"] = "spreadsheet"
  assert cyclonedx_problem(bad) is not None
  bad = copy.deepcopy(bom)
  bad["components"][0]["modelCard"]["owner"] = "nobody"
  assert cyclonedx_problem(bad) is not None


def test_the_export_command_writes_both_documents(run_dir, tmp_path):
  s, c = tmp_path / "run.spdx.json", tmp_path / "run.cdx.json"
  result = CliRunner().invoke(
    main, ["lineage", "export", str(run_dir), "--spdx", str(s), "--cyclonedx", str(c)]
  )
  assert result.exit_code == 0, result.output
  assert spdx_problem(json.loads(s.read_text())) is None
  assert cyclonedx_problem(json.loads(c.read_text())) is None
  none = CliRunner().invoke(main, ["lineage", "export", str(run_dir)])
  assert none.exit_code == 2 and "at least one output" in none.output


def test_the_eu_gpai_summary_has_the_template_sections_facts_and_marked_blanks(
  run_dir, manifests, tmp_path
):
  text = eu_gpai_summary(run_dir)
  for heading in (
    "## 1. General information",
    "## 2. List of data sources",
    "## 3. Data processing aspects",
    "### 2.3 Data crawled and scraped from online sources",
  ):
    assert heading in text
  assert BLANK.format("provider name and contact") in text
  assert text.count("[to be completed by the provider:") >= 10
  for m in manifests:
    assert f"| {m.authority} |" in text and m.root.hex()[:16] in text
  trained = {m.example_id for m in query(run_dir).rows}
  assert f"{len(trained)} distinct examples reached the model" in text
  out = tmp_path / "summary.md"
  result = CliRunner().invoke(
    main, ["lineage", "summary", str(run_dir), "--eu-gpai", "-o", str(out)]
  )
  assert result.exit_code == 0 and out.read_text() == text
