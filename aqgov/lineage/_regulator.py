"""Documents for regulators and supply-chain tools, drafted from a run's lineage and manifests:

- `spdx_document`: SPDX 3.0.1 JSON-LD with the Core, Software, AI and Dataset profiles: the
  model (`ai_AIPackage`, its digest: the last checkpoint's params), one `dataset_DatasetPackage`
  per credential manifest (its Merkle root as the hash, its authority as originator), and a
  `trainedOn` relationship from the model to each;
- `cyclonedx_bom`: a CycloneDX 1.6 ML-BOM: the model component with a `modelCard` naming its
  datasets, one `data` component per manifest with its governance owner (the authority), and a
  `formulation` workflow for the governed run (its policies, profiles and lineage head);
- `eu_gpai_summary`: a Markdown draft of the EU AI Office's public summary of training content
  (1. general information, 2. list of data sources, 3. data processing aspects), with what the
  lineage cannot know left as marked blanks (`BLANK`).

Facts come from the signed part of the log (run-start, checkpoints, the last signed head) and the
manifests run-start names (held to their recorded SHA-256; see `aqgov.lineage._labels`), counted
over the examples that reached some group (`aqgov.lineage.query`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import uuid
from collections import Counter
from importlib.metadata import version
from typing import Any, NamedTuple

from aqgov.errors import LineageError
from aqgov.lineage import _history as hist
from aqgov.lineage._heads import read_heads
from aqgov.lineage._index import load_columns
from aqgov.lineage._labels import RunLabels, run_labels
from aqgov.lineage._verify import lineage_dir

SPDX_CONTEXT = "https://spdx.org/rdf/3.0.1/spdx-context.jsonld"
BLANK = "[to be completed by the provider: {}]"


class DatasetFacts(NamedTuple):
  """One credential manifest as a dataset: who vouches for it and how much of it was trained on."""

  manifest_id: str
  authority: str
  merkle_root: str
  size: int
  taxonomy_id: str
  trained: int  # distinct examples of it that reached some group
  labels: dict[str, Counter]  # field -> value -> trained examples with it


class RunFacts(NamedTuple):
  """What the lineage says about a run, for the regulator documents."""

  run_id: str
  task: str | None
  groups: tuple[str, ...]
  policies: tuple[str, ...]
  profiles: tuple[str, ...]
  head: dict
  time: str  # the last signed head's time, ISO 8601 UTC
  start_time: str
  params_sha256: str | None
  last_step: int
  steps: int
  trained_examples: int
  uncredentialed: int
  datasets: tuple[DatasetFacts, ...]
  closed: bool


def _iso(t: float) -> str:
  return dt.datetime.fromtimestamp(float(t), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _label_values(value: Any) -> list[str]:
  return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def run_facts(run_dir: str | os.PathLike, labels: RunLabels | None = None) -> RunFacts:
  """The facts of the signed part of a run that the regulator documents state."""
  root, ldir = lineage_dir(run_dir)
  scan, history = hist.load(ldir)
  if history.size == 0:
    raise LineageError(f"{ldir} has no signed part: nothing to describe")
  start = scan.bodies[0]
  heads, _ = read_heads(ldir)
  head = next(h for h in reversed(heads) if int(h.payload["size"]) == history.size)
  labels = labels if labels is not None else run_labels(root, start)
  cols = load_columns(root, labels=labels).columns
  effective = ~cols.superseded
  hit = effective.copy()
  hit[:] = False
  for r in cols.reached.values():
    hit |= r & effective
  trained_ids = {cols.ids[i] for i in set(cols.example[hit].tolist())}
  datasets = []
  credentialed = set()
  for m in labels.manifests:
    mine = sorted(i for i in trained_ids if i in m)
    credentialed.update(mine)
    counts: dict[str, Counter] = {}
    for i in mine:
      for k, v in m.entry(i).labels.items():
        counts.setdefault(k, Counter()).update(_label_values(v))
    datasets.append(
      DatasetFacts(m.id, m.authority, m.root.hex(), m.size, m.taxonomy_id, len(mine), counts)
    )
  checkpoints = [c for c in history.checkpoints if c.index < history.size]
  ends = [i for i, k in enumerate(scan.kinds[: history.size]) if k == "run-end"]
  steps = sorted(set(cols.step[effective].tolist()))
  return RunFacts(
    run_id=start["run_id"],
    task=start["config"].get("task"),
    groups=tuple(start["groups"]),
    policies=tuple(p["id"] for p in start["policies"]),
    profiles=tuple(p["id"] for p in start["profiles"]),
    head={"id": head.id, "size": int(head.payload["size"]), "root": head.payload["root"]},
    time=_iso(head.payload["time"]),
    start_time=_iso(start["time"]),
    params_sha256=checkpoints[-1].params_sha256 if checkpoints else None,
    last_step=steps[-1] if steps else 0,
    steps=len(steps),
    trained_examples=len(trained_ids),
    uncredentialed=len(trained_ids - credentialed),
    datasets=tuple(datasets),
    closed=bool(ends) and history.size == scan.size,
  )


# ---- SPDX 3.0.1 ---------------------------------------------------------------------------------


def spdx_document(run_dir: str | os.PathLike, facts: RunFacts | None = None) -> dict:
  """The run as an SPDX 3.0.1 JSON-LD document (Core, Software, AI and Dataset profiles)."""
  f = facts or run_facts(run_dir)
  base = f"https://aqgov.dev/spdx/{f.run_id}/{f.head['id']}"
  ci = "_:creationinfo"
  tool_id, doc_id, model_id = f"{base}#tool-aqgov", f"{base}#document", f"{base}#model"
  operator = f"{base}#operator"
  graph: list[dict] = [
    {
      "type": "CreationInfo",
      "@id": ci,
      "specVersion": "3.0.1",
      "created": f.time,
      "createdBy": [operator],
      "createdUsing": [tool_id],
    },
    {
      "type": "Agent",
      "spdxId": operator,
      "creationInfo": ci,
      "name": f"operator of run {f.run_id}",
    },
    {
      "type": "Tool",
      "spdxId": tool_id,
      "creationInfo": ci,
      "name": f"aqgov {version('aqgov')}",
    },
  ]
  model = {
    "type": "ai_AIPackage",
    "spdxId": model_id,
    "creationInfo": ci,
    "name": f"{f.run_id} (task {f.task})",
    "software_packageVersion": f"step-{f.last_step}",
    "software_primaryPurpose": "model",
    "software_downloadLocation": "NOASSERTION",
    "releaseTime": f.time,
    "suppliedBy": operator,
    "description": (
      f"Model trained by governed run {f.run_id}: {f.steps} effective steps, parameter groups "
      f"{', '.join(f.groups)}, routing policies {', '.join(p[:16] for p in f.policies) or 'none'}; "
      f"lineage head {f.head['id']} ({f.head['size']} records, Merkle root {f.head['root']})."
    ),
    "ai_typeOfModel": ["neural network"],
    "ai_informationAboutTraining": (
      f"Per-example, per-parameter-group routing under signed policies; {f.trained_examples} "
      f"distinct examples reached the model, {f.uncredentialed} of them uncredentialed."
    ),
    "ai_safetyRiskAssessment": "low" if not f.uncredentialed else "medium",
  }
  if f.params_sha256:
    model["verifiedUsing"] = [{"type": "Hash", "algorithm": "sha256", "hashValue": f.params_sha256}]
  graph.append(model)
  datasets = []
  for d in f.datasets:
    org = f"{base}#authority-{d.authority}"
    graph.append({"type": "Organization", "spdxId": org, "creationInfo": ci, "name": d.authority})
    ds = f"{base}#dataset-{d.manifest_id}"
    datasets.append(ds)
    graph.append(
      {
        "type": "dataset_DatasetPackage",
        "spdxId": ds,
        "creationInfo": ci,
        "name": f"examples credentialed by {d.authority} (manifest {d.manifest_id[:16]})",
        "description": (
          f"Credential manifest {d.manifest_id} of {d.authority}: {d.size} entries under "
          f"taxonomy {d.taxonomy_id[:16]}; {d.trained} of them reached the model."
        ),
        "originatedBy": [org],
        "suppliedBy": org,
        "releaseTime": f.start_time,
        "builtTime": f.start_time,
        "software_primaryPurpose": "data",
        "software_downloadLocation": "NOASSERTION",
        "verifiedUsing": [{"type": "Hash", "algorithm": "sha256", "hashValue": d.merkle_root}],
        "dataset_datasetType": ["text"],
        "dataset_datasetSize": d.size,
      }
    )
  if datasets:
    graph.append(
      {
        "type": "Relationship",
        "spdxId": f"{base}#trained-on",
        "creationInfo": ci,
        "from": model_id,
        "to": datasets,
        "relationshipType": "trainedOn",
      }
    )
  elements = [g["spdxId"] for g in graph if "spdxId" in g]
  graph.append(
    {
      "type": "SpdxDocument",
      "spdxId": doc_id,
      "creationInfo": ci,
      "name": f"aqgov lineage of {f.run_id}",
      "profileConformance": ["core", "software", "ai", "dataset"],
      "rootElement": [model_id],
      "element": elements,
    }
  )
  return {"@context": SPDX_CONTEXT, "@graph": graph}


# ---- CycloneDX 1.6 ------------------------------------------------------------------------------


def cyclonedx_bom(run_dir: str | os.PathLike, facts: RunFacts | None = None) -> dict:
  """The run as a CycloneDX 1.6 ML-BOM (JSON)."""
  f = facts or run_facts(run_dir)
  serial = uuid.UUID(hashlib.sha256(f"{f.run_id}/{f.head['id']}".encode()).hexdigest()[:32])
  data_refs = [f"dataset-{d.manifest_id}" for d in f.datasets]
  model = {
    "type": "machine-learning-model",
    "bom-ref": "model",
    "name": f.run_id,
    "version": f"step-{f.last_step}",
    "description": f"Model trained by governed run {f.run_id} (task {f.task})",
    "modelCard": {
      "modelParameters": {
        "approach": {"type": "supervised"},
        "task": str(f.task),
        "architectureFamily": "neural network",
        "datasets": [{"ref": r} for r in data_refs],
      },
      "considerations": {
        "technicalLimitations": [
          "Only examples routed to a parameter group shaped it; the signed lineage records, per "
          "step and example, which groups each example reached."
        ],
      },
      "properties": [
        {"name": "aqgov:lineage-head", "value": f.head["id"]},
        {"name": "aqgov:lineage-root", "value": f.head["root"]},
        {"name": "aqgov:trained-examples", "value": str(f.trained_examples)},
        {"name": "aqgov:uncredentialed-examples", "value": str(f.uncredentialed)},
      ],
    },
  }
  if f.params_sha256:
    model["hashes"] = [{"alg": "SHA-256", "content": f.params_sha256}]
  components = [model]
  for d, ref in zip(f.datasets, data_refs, strict=True):
    components.append(
      {
        "type": "data",
        "bom-ref": ref,
        "name": f"examples credentialed by {d.authority}",
        "version": d.manifest_id[:16],
        "hashes": [{"alg": "SHA-256", "content": d.merkle_root}],
        "data": [
          {
            "type": "dataset",
            "name": f"credential manifest {d.manifest_id}",
            "classification": ", ".join(
              f"{k}: {', '.join(sorted(c))}" for k, c in sorted(d.labels.items()) if k != "source"
            )
            or "unlabelled",
            "description": f"{d.size} credentialed examples, {d.trained} of them trained on",
            "governance": {"owners": [{"organization": {"name": d.authority}}]},
          }
        ],
      }
    )
  workflow = {
    "bom-ref": "governed-run",
    "uid": f.run_id,
    "name": f"governed training run {f.run_id}",
    "taskTypes": ["build"],
    "timeStart": f.start_time,
    "timeEnd": f.time,
    "properties": [{"name": "aqgov:policy", "value": p} for p in f.policies]
    + [{"name": "aqgov:profile", "value": p} for p in f.profiles]
    + [{"name": "aqgov:lineage-head", "value": f.head["id"]}],
  }
  return {
    "bomFormat": "CycloneDX",
    "specVersion": "1.6",
    "serialNumber": f"urn:uuid:{serial}",
    "version": 1,
    "metadata": {
      "timestamp": f.time,
      "tools": {
        "components": [{"type": "application", "name": "aqgov", "version": version("aqgov")}]
      },
      "component": {"type": "machine-learning-model", "bom-ref": "model-meta", "name": f.run_id},
    },
    "components": components,
    "formulation": [{"bom-ref": "formulation", "workflows": [workflow]}],
  }


# ---- EU GPAI training-content summary -----------------------------------------------------------


def eu_gpai_summary(run_dir: str | os.PathLike, facts: RunFacts | None = None) -> str:
  """A Markdown draft of the EU AI Office's public summary of training content, its three
  sections filled from the lineage and manifests, every other answer a marked blank."""
  f = facts or run_facts(run_dir)
  blank = BLANK.format
  lines = [
    f"# Public summary of training content: {f.run_id}",
    "",
    "Drafted by aqgov from the signed lineage (head "
    f"`{f.head['id']}`, {f.head['size']} records, Merkle root `{f.head['root']}`) and the "
    "credential manifests the run started with. Fields marked "
    f"`{blank('...')}` are not known to the lineage.",
    "",
    "## 1. General information",
    "",
    "### 1.1 Provider identification",
    f"- Provider name and contact details: {blank('provider name and contact')}",
    f"- Authorised representative: {blank('authorised representative, if any')}",
    "",
    "### 1.2 Model identification",
    f"- Versioned model name(s): {blank('model name')} (training run `{f.run_id}`, step "
    f"{f.last_step}, params SHA-256 `{f.params_sha256 or 'no checkpoint recorded'}`)",
    f"- Model dependencies: {blank('base model this one was fine-tuned from, if any')}",
    f"- Date of placement on the Union market: {blank('date')}",
    "",
    "### 1.3 Modalities, overall training data size and other characteristics",
    f"- Modalities: text {blank('confirm the modalities')}",
    f"- Training data size: {f.trained_examples} distinct examples reached the model over "
    f"{f.steps} governed steps ({f.uncredentialed} uncredentialed); "
    f"{blank('size in tokens or bytes')}",
    f"- Linguistic and other characteristics: {blank('languages and domains')}",
    f"- Knowledge cut-off: {blank('latest date of the training content')}",
    "",
    "## 2. List of data sources",
    "",
    "### 2.1 Publicly available datasets",
    f"{blank('which of the datasets below are publicly available, with links')}",
    "",
    "### 2.2 Private non-publicly available datasets obtained from third parties",
    "",
    "| dataset (credential manifest) | authority (data owner) | Merkle root | entries | trained on |",
    "|---|---|---|---|---|",
  ]
  for d in f.datasets:
    lines.append(
      f"| `{d.manifest_id[:16]}` | {d.authority} | `{d.merkle_root[:16]}...` | {d.size} | "
      f"{d.trained} |"
    )
  if not f.datasets:
    lines.append("| (the run named no credential manifest) | | | | |")
  lines += [""]
  for d in f.datasets:
    for field, counts in sorted(d.labels.items()):
      values = ", ".join(f"{v} ({n})" for v, n in counts.most_common(8))
      lines.append(f"- {d.authority}.{field} over the trained examples: {values}")
  lines += [
    "",
    "### 2.3 Data crawled and scraped from online sources",
    f"{blank('crawlers used, collection period, types of websites, top domains')}",
    "",
    "### 2.4 User data",
    f"{blank('whether user interactions or data from the provider’s services were used')}",
    "",
    "### 2.5 Synthetic data",
    f"{blank('whether synthetic data was used and the models that generated it')}",
    "",
    "### 2.6 Other sources of data",
    f"- Uncredentialed examples that reached the model: {f.uncredentialed}"
    + (f" {blank('their sources')}" if f.uncredentialed else ""),
    "",
    "## 3. Data processing aspects",
    "",
    "### 3.1 Respect of reservation of rights from text and data mining exception",
    f"{blank('measures to honour opt-outs (robots.txt and other machine-readable reservations)')}",
    "",
    "### 3.2 Removal of illegal content",
    "- Admission: only examples whose content hash matched a signed credential manifest entry "
    "were admitted with labels; each step record holds the example ids and content hashes.",
    "- Routing: signed policies "
    + (", ".join(f"`{p[:16]}`" for p in f.policies) or "(none)")
    + " decided per example which parameter groups "
    f"({', '.join(f.groups)}) it could shape; entropy profiles "
    + (", ".join(f"`{p[:16]}`" for p in f.profiles) or "(none)")
    + " bounded the updates.",
    f"- {blank('other measures to detect and remove illegal content')}",
    "",
    "### 3.3 Other information",
    f"{blank('anything else the provider wishes to state')}",
    "",
  ]
  return "\n".join(lines)
