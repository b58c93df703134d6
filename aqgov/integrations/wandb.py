"""Weights & Biases for governed runs: governance metrics per step, document and output artifacts,
and a check of a logged W&B run against the signed lineage. Needs the `wandb` extra
(`pip install 'aqgov[wandb]'`); wandb is imported only when a function uses it.

Every key is logged with `run.log(..., step=step)` at the caller's step, so it lands in the same
history row as the caller's own metrics for that step (wandb merges the calls of one step):

    aqgov/reach/<group>              examples with an applied weight > 0 in the group
    aqgov/contribution/<group>       mean applied contribution norm of those examples (0 when none)
    aqgov/entropy/<metric>/<group>   the measurement (mean over heads for per-head metrics)
    aqgov/bound/<metric>/<group>/low, .../high   the profile's bound covering the step
    aqgov/events                     out-of-bounds measurements at the step
    aqgov/event/<metric>/<group>     the action taken (its index in `aqgov.entropy` ACTION_NAMES)
    aqgov/lineage/size, root, record  the log's tree size, Merkle root and last record hash
    aqgov/lineage/head, head_size     the id and size of the last signed tree head
    aqgov/lineage/cosigned            1 once the witnesses' cosignatures of that head are stored
                                      (only for runs with witnesses)

`run.config["aqgov"]` holds the run id, groups, route classes and policy ids. Only process 0
(`jax.process_index() == 0`) logs; other processes return without touching wandb.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from aqgov.documents._signing import SignedDocument
from aqgov.entropy._enforce import METRICS
from aqgov.errors import AqgovError, IntegrationError
from aqgov.integrations import _wandb_store as store
from aqgov.lineage import _history as hist
from aqgov.lineage import _record as rec
from aqgov.lineage._cosign import note_path
from aqgov.lineage._distributed import process_index
from aqgov.lineage._heads import LogHead, read_heads
from aqgov.lineage._scan import scan
from aqgov.lineage._segments import LogReader

PREFIX = "aqgov"
# The files of a run directory an output artifact may carry (relative to the run directory).
OUTPUT_FILES = ("attestation.intoto.json", "report.html")


def _wandb():
  try:
    import wandb
  except ImportError:
    raise IntegrationError(
      "wandb is not installed; install it with pip install 'aqgov[wandb]'"
    ) from None
  return wandb


def is_primary() -> bool:
  """True on the process that logs (process 0 of a multi-process JAX job); a `LineageError`
  before `jax.distributed.initialize` in a job a launcher started as several processes, where
  every process would otherwise claim to be process 0."""
  return process_index() == 0


# ---- per-step metrics ---------------------------------------------------------------------------


def step_metrics(
  summary: Any, compiled: Any, *, step: int | None = None, profile: Any = None
) -> dict[str, Any]:
  """The governance metrics of one step (see the module doc), from a `StepSummary` and the
  `CompiledPolicy` (or anything with its `group_names`); `profile` (an `EntropyProfile`) adds the bounds covering `step`."""
  s = jax.device_get(summary)
  groups = list(compiled.group_names)
  real = np.asarray(s.example_index) >= 0
  # as applied (after fallback routes, dropped examples, pause, reroute, freeze) when it says
  applied = getattr(s, "applied_weights", None)
  scale = getattr(s, "applied_scale", None)
  weights = np.asarray(s.weights if applied is None else applied, np.float64)[real]
  norms = np.asarray(s.contribution_norms, np.float64)[real]
  if scale is not None:
    norms = norms * np.asarray(scale, np.float64)[None, :]
  out: dict[str, Any] = {}
  for g, name in enumerate(groups):
    reached = weights[:, g] > 0
    out[f"{PREFIX}/reach/{name}"] = int(reached.sum())
    out[f"{PREFIX}/contribution/{name}"] = float(norms[reached, g].mean()) if reached.any() else 0.0
  for key, value in dict(s.measurements).items():
    v = np.asarray(value, np.float64)
    out[f"{PREFIX}/entropy/{key}"] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
  at = int(s.step) if step is None else int(step)
  for b in () if profile is None else profile.bounds:
    if b.heads is None and b.covers(at, None):
      for side in ("low", "high"):
        if getattr(b, side) is not None:
          out[f"{PREFIX}/bound/{b.metric}/{b.group}/{side}"] = float(getattr(b, side))
  events = s.events
  if hasattr(events, "out_of_bounds"):
    oob = np.asarray(events.out_of_bounds)
    action = np.asarray(events.action)
    out[f"{PREFIX}/events"] = int(oob.sum())
    for g, m, h in zip(*np.nonzero(oob), strict=True):
      out[f"{PREFIX}/event/{METRICS[m]}/{groups[g]}"] = int(action[g, m, h])
  return out


def lineage_metrics(
  head: LogHead, lineage_dir: str | os.PathLike | None = None, *, witnessed: bool = False
) -> dict[str, Any]:
  """The log's size, root and last record hash, and (with `lineage_dir`) its last signed head."""
  out: dict[str, Any] = {
    f"{PREFIX}/lineage/size": int(head.size),
    f"{PREFIX}/lineage/root": head.root.hex(),
    f"{PREFIX}/lineage/record": head.last_record.hex(),
  }
  if lineage_dir is not None:
    heads, _ = read_heads(lineage_dir)
    if heads:
      last = heads[-1]
      out[f"{PREFIX}/lineage/head"] = last.id
      out[f"{PREFIX}/lineage/head_size"] = int(last.payload["size"])
      if witnessed:
        out[f"{PREFIX}/lineage/cosigned"] = int(
          note_path(lineage_dir, int(last.payload["size"])).exists()
        )
  return out


def log_config(run: Any, compiled: Any, *, run_id: str | None = None) -> None:
  """Record the policy ids, groups and route classes in `run.config["aqgov"]` (process 0 only)."""
  if not is_primary():
    return
  config = {
    "policy_ids": list(getattr(compiled, "policy_ids", ())),
    "groups": list(compiled.group_names),
    "classes": list(getattr(compiled, "class_names", ())),
  }
  if run_id is not None:
    config["run_id"] = run_id
  run.config.update({PREFIX: config}, allow_val_change=True)


def log_step(
  run: Any,
  summary: Any,
  compiled: Any,
  *,
  step: int,
  profile: Any = None,
  head: LogHead | None = None,
  lineage_dir: str | os.PathLike | None = None,
  witnessed: bool = False,
) -> dict[str, Any]:
  """Log one step's governance metrics (and, given `head`, the lineage's) to the wandb `run` at
  `step`, the step of the caller's own `run.log` calls. Returns what was logged ({} off process 0)."""
  if not is_primary():
    return {}
  data = step_metrics(summary, compiled, step=step, profile=profile)
  if head is not None:
    data.update(lineage_metrics(head, lineage_dir, witnessed=witnessed))
  run.log(data, step=int(step))
  return data


class WandbLogger:
  """A `GovernedRun` whose steps are logged to a wandb run: call `step(examples)` instead of
  `governed_run.step`. The lineage is flushed (not signed) every `lineage_every` steps to log
  where it stands; `close`/`abandon` log its final head too."""

  def __init__(
    self, governed_run: Any, wandb_run: Any, *, lineage_every: int = 1, log_documents: bool = True
  ):
    if lineage_every < 1:
      raise IntegrationError(f"lineage_every must be at least 1, got {lineage_every}")
    self.run, self.wandb_run, self.lineage_every = governed_run, wandb_run, int(lineage_every)
    task = governed_run.task
    # a `GovernedTask` has its `CompiledPolicy`; any other `Task` names its groups itself
    self.compiled, self.profile = getattr(task, "compiled", task), getattr(task, "profile", None)
    first = next(iter(LogReader(governed_run.layout.lineage)))
    self.witnessed = bool(first.body["config"].get("lineage", {}).get("witnesses"))
    log_config(wandb_run, self.compiled, run_id=governed_run.run_id)
    if log_documents:
      log_manifests(wandb_run, governed_run.layout.root)

  def step(self, examples: Sequence[Any]) -> Any:
    """`governed_run.step(examples)`, then its metrics logged at the step's number (nothing is
    logged for a batch admission refused whole: no step was taken)."""
    summary = self.run.step(examples)
    if summary is None:
      return None
    step = self.run.next_step - 1
    head = self.run.head() if step % self.lineage_every == 0 else None
    log_step(
      self.wandb_run,
      summary,
      self.compiled,
      step=step,
      profile=self.profile,
      head=head,
      lineage_dir=self.run.layout.lineage,
      witnessed=self.witnessed,
    )
    return summary

  def _log_final(self, head: LogHead) -> None:
    if is_primary():
      self.wandb_run.log(
        lineage_metrics(head, self.run.layout.lineage, witnessed=self.witnessed),
        step=self.run.next_step - 1,
      )

  def close(self, **kwargs: Any) -> LogHead:
    """Close the governed run (see `GovernedRun.close`) and log its final signed head."""
    head = self.run.close(**kwargs)
    self._log_final(head)
    return head

  def abandon(self) -> None:
    """Stop the governed run without run-end (see `GovernedRun.abandon`) and log its last head."""
    self.run.abandon()
    self._log_final(scan(self.run.layout.lineage).head())


def attach(governed_run: Any, wandb_run: Any, **kwargs: Any) -> WandbLogger:
  """Log `governed_run` (a `GovernedRun`) to `wandb_run`: see `WandbLogger`."""
  return WandbLogger(governed_run, wandb_run, **kwargs)


# ---- artifacts ----------------------------------------------------------------------------------


def _artifact_name(text: str) -> str:
  return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)


def log_manifests(wandb_run: Any, run_dir: str | os.PathLike) -> list[Any]:
  """Each credential manifest of the run as a reference artifact (type "credential-manifest")
  whose metadata carries its Merkle root, size, authority and document id; used as an input of
  `wandb_run` (`use_artifact`; an offline run, where wandb refuses that, logs it instead)."""
  if not is_primary():
    return []
  wandb = _wandb()
  out = []
  for path in sorted((Path(run_dir) / "manifests").glob("*.signed")):
    doc = SignedDocument.from_bytes(path.read_bytes())
    p = doc.payload
    art = wandb.Artifact(
      _artifact_name(f"manifest-{p.get('authority', doc.id[:16])}"),
      type="credential-manifest",
      metadata={
        "merkle_root": p.get("root"),
        "size": p.get("size"),
        "authority": p.get("authority"),
        "document_id": doc.id,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
      },
    )
    art.add_reference(path.absolute().as_uri(), name=path.name)
    out.append(wandb_run.log_artifact(art) if wandb_run.offline else wandb_run.use_artifact(art))
  return out


def private_file_problem(path: Path) -> str | None:
  """Why `path` must never be uploaded (a key, a private file, not a plain file), or None."""
  if path.is_symlink() or not path.is_file():
    return "is not a plain file"
  if path.suffix == ".key":
    return "is a private key"
  if stat.S_IMODE(path.stat().st_mode) & 0o077 == 0:
    return "is private (readable by its owner only, like a key)"
  return None


def _allowed(run_dir: Path, name: str) -> Path | None:
  path = run_dir / name
  if not path.exists() and not path.is_symlink():
    return None
  problem = private_file_problem(path)
  if problem:
    raise IntegrationError(
      f"{path} {problem}; it is never uploaded: make it a plain, readable file or remove it"
    )
  return path


def output_digests(run_dir: str | os.PathLike) -> dict[str, Any]:
  """The signed part of the lineage (size, root, last signed head) and every effective checkpoint's
  digests, as the output artifact records them (`checkpoints.json`)."""
  from aqgov.lineage._verify import lineage_dir

  _, ldir = lineage_dir(run_dir)
  scanned, history = hist.load(ldir)
  heads, _ = read_heads(ldir)
  head = scanned.head(history.size)
  return {
    "run_id": scanned.bodies[0]["run_id"] if scanned.size else None,
    "lineage": {
      "size": head.size,
      "root": head.root.hex(),
      "record": head.last_record.hex(),
      "head": heads[-1].id if heads else None,
    },
    "checkpoints": [
      {
        "step": c.step,
        "path": c.path,
        "params_sha256": c.params_sha256,
        "digests": dict(c.digests or {}),
        "files_sha256": c.files_sha256,
      }
      for c in history.checkpoints
    ],
  }


def log_outputs(
  wandb_run: Any,
  run_dir: str | os.PathLike,
  *,
  name: str | None = None,
  files: Sequence[str] = OUTPUT_FILES,
) -> Any:
  """Log the run's outputs as one artifact (type "governed-run"): `checkpoints.json` (see
  `output_digests`) and those of `files` (names in the run directory, by default the attestation
  and the report) that exist. Only names in `OUTPUT_FILES` are accepted, and none that is a key
  or private (`IntegrationError`): nothing else of the run directory is ever read into it."""
  if not is_primary():
    return None
  wandb = _wandb()
  root = Path(run_dir)
  extra = sorted(set(files) - set(OUTPUT_FILES))
  if extra:
    raise IntegrationError(
      f"{', '.join(extra)} not in the output allow-list {list(OUTPUT_FILES)}; an output "
      "artifact carries only those files"
    )
  digests = output_digests(root)
  art = wandb.Artifact(
    _artifact_name(name or f"aqgov-run-{digests['run_id']}"),
    type="governed-run",
    metadata={"lineage": digests["lineage"]},
  )
  staging = Path(tempfile.mkdtemp(prefix="aqgov-artifact-"))
  try:
    (staging / "checkpoints.json").write_text(json.dumps(digests, indent=2, sort_keys=True) + "\n")
    art.add_file(str(staging / "checkpoints.json"), name="checkpoints.json")
    for f in files:
      path = _allowed(root, f)
      if path is not None:
        art.metadata[f"{Path(f).stem}_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        art.add_file(str(path), name=f)
    return wandb_run.log_artifact(art)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


# ---- checking a logged run ----------------------------------------------------------------------


def check_logged(run_dir: str | os.PathLike, wandb_dir: str | os.PathLike) -> dict[str, int]:
  """Check what an offline W&B run logged against the run's signed lineage: every logged
  (size, root, record) is where the log stood at that size, every logged head id is a signed head
  of that size, and the logged policy ids are those run-start recorded. Raises `IntegrationError`
  at the first mismatch; returns counts of what was checked."""
  from aqgov.lineage._verify import lineage_dir

  logged = store.read_run(wandb_dir)
  _, ldir = lineage_dir(run_dir)
  rows = {s: r for s, r in sorted(logged.history.items()) if f"{PREFIX}/lineage/size" in r}
  if not rows:
    raise IntegrationError(
      f"{logged.path} logged no {PREFIX}/lineage/* values; log the run with "
      "aqgov.integrations.wandb.attach (or log_step with head=)"
    )
  sizes = sorted({int(r[f"{PREFIX}/lineage/size"]) for r in rows.values()})
  try:
    scanned = scan(ldir, bodies=(rec.RUN_START,), roots_at=sizes)
  except AqgovError as exc:
    raise IntegrationError(f"cannot read the lineage of {run_dir}: {exc}") from None
  heads = {h.id: h for h in read_heads(ldir)[0]}
  start = scanned.bodies.get(0, {})
  policy_ids = [p["id"] for p in start.get("policies", ())]
  config = logged.config.get(PREFIX)
  if isinstance(config, Mapping) and "value" in config and len(config) <= 2:
    config = config["value"]
  if (
    isinstance(config, Mapping)
    and "policy_ids" in config
    and sorted(config["policy_ids"]) != sorted(policy_ids)
  ):
    raise IntegrationError(
      f"W&B config {PREFIX}.policy_ids {config['policy_ids']} are not the policies run-start "
      f"recorded ({policy_ids}): the W&B run describes another run"
    )
  if isinstance(config, Mapping) and config.get("run_id") not in (None, start.get("run_id")):
    raise IntegrationError(
      f"W&B config names run {config['run_id']}, but {run_dir} is run {start.get('run_id')}"
    )
  checked_heads = 0
  for step, row in rows.items():
    size = int(row[f"{PREFIX}/lineage/size"])
    if size > scanned.size:
      raise IntegrationError(
        f"W&B step {step} logged lineage size {size}, but {run_dir} holds {scanned.size} "
        "records: the log was cut back after it was logged, or this is another run"
      )
    head = scanned.head(size)
    for key, want in (("root", head.root.hex()), ("record", head.last_record.hex())):
      got = row.get(f"{PREFIX}/lineage/{key}")
      if got != want:
        what = "Merkle root" if key == "root" else "last record hash"
        raise IntegrationError(
          f"W&B step {step} logged lineage {key} {str(got)[:16]}... at size {size}, but the "
          f"signed lineage's {what} there is {want[:16]}...: the W&B history or the "
          "lineage was altered, or they belong to different runs"
        )
    head_id = row.get(f"{PREFIX}/lineage/head")
    if head_id is not None:
      signed = heads.get(head_id)
      if signed is None or int(signed.payload["size"]) != int(
        row.get(f"{PREFIX}/lineage/head_size", -1)
      ):
        raise IntegrationError(
          f"W&B step {step} logged signed head {str(head_id)[:16]}..., which is not a signed "
          f"head of {run_dir} of the logged size"
        )
      if signed.payload["root"] != scanned.head(int(signed.payload["size"])).root.hex():
        raise IntegrationError(
          f"signed head {head_id[:16]}... does not match the records it covers; run "
          "aqgov lineage verify"
        )
      checked_heads += 1
  return {"rows": len(rows), "heads": checked_heads, "records": scanned.size}
