"""Routing-aware attribution: which training examples shaped a probe's behaviour, at which group.

TracIn-style: the score of training example i for probe p at group g is

    Σ_t η · ⟨φ_g(p; θ_c(t)), φ_g(i; θ_{t-1})⟩

over the effective steps t that trained on i, where φ_g(i; θ_{t-1}) is the sketch the step
recorded of i's *routed* gradient `w_i[g] ∇_g L_i` (`aqgov.routing.SketchSpec`, the run's sketch
store) and φ_g(p; θ_c) the probe's gradient projected the same way at c(t), the latest effective
checkpoint at or before step t - 1. η is one constant learning rate (a scale: the ranking does not
depend on it). An example routed away from g has a sketch of exactly zero there, so its score at g
is exactly zero: attribution at g only ever names examples the policy let shape g.

Without sketches (a run that recorded none) the scores fall back to TracIn over checkpoints: the
examples each step's record says reached g are looked up in the data (content hashes checked as
replay checks them), their gradients at c(t) projected with the task's spec and weighted by their
recorded weights. With a checkpoint after every step the two agree up to the sketch dtype's
rounding; with sparser checkpoints the fallback uses older parameters than training did.

Nothing runs before the lineage verifies against the caller's keys, and only the recorded task
(as replay imports it). The result is an `AttributionResult`, signed as a document
(`ATTRIBUTION`) naming the signed head it was computed against, so a reader can check both who
computed it and which state of the log it describes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from aqgov.credentials._manifest import Example, content_hash
from aqgov.documents import _canonical as canonical
from aqgov.documents._document_type import DocumentType, register, verify
from aqgov.documents._keys import TrustStore
from aqgov.documents._signing import SignedDocument
from aqgov.errors import CheckpointError, LineageError
from aqgov.lineage import _history as hist
from aqgov.lineage import _record as rec
from aqgov.lineage import _sketches as sketch_store
from aqgov.lineage._checkpoint import Checkpoints
from aqgov.lineage._heads import read_heads
from aqgov.lineage._labels import run_labels
from aqgov.lineage._progress import ProgressFn, report
from aqgov.lineage._replay import _example_index, trusted_task
from aqgov.lineage._segments import records
from aqgov.lineage._task import Task
from aqgov.lineage._verify import lineage_dir, verify_lineage

BY = ("example", "source", "label")
SKETCHES, CHECKPOINTS = "sketches", "checkpoints"


@dataclasses.dataclass(frozen=True)
class Score:
  """One attributed key (an example id, a source or a route class) and its score per group."""

  key: str
  score: float  # summed over the result's groups
  groups: tuple[float, ...]  # one per run group


@dataclasses.dataclass(frozen=True)
class AttributionResult:
  """Top attributed keys per probe, and exactly what they were computed against."""

  run_id: str
  head_size: int  # the signed tree head the scores were computed against
  head_root: str
  method: str  # "sketches" or "checkpoints"
  run_groups: tuple[str, ...]
  groups: tuple[str, ...]  # the groups scored
  steps: tuple[int, int]  # first and last step included
  by: str
  learning_rate: float
  normalized: bool
  sketch: Mapping[str, Any]  # the spec the projections used
  probes: tuple[tuple[str, str], ...]  # (id, content sha256)
  scores: tuple[tuple[Score, ...], ...]  # per probe, best first

  def to_payload(self) -> dict:
    return {
      "run_id": self.run_id,
      "head": {"size": self.head_size, "root": self.head_root},
      "method": self.method,
      "run_groups": list(self.run_groups),
      "groups": list(self.groups),
      "steps": list(self.steps),
      "by": self.by,
      "learning_rate": canonical.canonical_float(self.learning_rate),
      "normalized": self.normalized,
      "sketch": dict(self.sketch),
      "probes": [{"id": i, "sha256": h} for i, h in self.probes],
      "scores": [
        [
          {
            "key": s.key,
            "score": canonical.canonical_float(s.score),
            "groups": [canonical.canonical_float(g) for g in s.groups],
          }
          for s in per_probe
        ]
        for per_probe in self.scores
      ],
    }

  @classmethod
  def from_payload(cls, p: Mapping[str, Any]) -> AttributionResult:
    try:
      return cls(
        run_id=str(p["run_id"]),
        head_size=int(p["head"]["size"]),
        head_root=str(p["head"]["root"]),
        method=str(p["method"]),
        run_groups=tuple(p["run_groups"]),
        groups=tuple(p["groups"]),
        steps=(int(p["steps"][0]), int(p["steps"][1])),
        by=str(p["by"]),
        learning_rate=float(p["learning_rate"]),
        normalized=bool(p["normalized"]),
        sketch=dict(p["sketch"]),
        probes=tuple((str(q["id"]), str(q["sha256"])) for q in p["probes"]),
        scores=tuple(
          tuple(Score(str(s["key"]), float(s["score"]), tuple(map(float, s["groups"]))) for s in ps)
          for ps in p["scores"]
        ),
      )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
      raise LineageError(f"not an attribution result payload ({exc!r})") from None


ATTRIBUTION: DocumentType[AttributionResult] = register(
  DocumentType(
    name="attribution",
    kind="lineage-attribution",
    noun="attribution result",
    to_payload=AttributionResult.to_payload,
    from_payload=AttributionResult.from_payload,
    error=LineageError,
  )
)


def verify_attribution(
  signed: SignedDocument, trust: TrustStore, run_dir: str | os.PathLike | None = None
) -> AttributionResult:
  """The result once a trusted (governance or authority) key signed it; with `run_dir`, also
  check that the head it names is a signed head of that run's log."""
  result = verify(ATTRIBUTION, signed, trust)
  if run_dir is not None:
    _, ldir = lineage_dir(run_dir)
    heads, _ = read_heads(ldir)
    if not any(
      int(h.payload["size"]) == result.head_size and h.payload["root"] == result.head_root
      for h in heads
    ):
      raise LineageError(
        f"the attribution result names head {result.head_size} / {result.head_root[:16]}..., "
        f"which is not a signed head of {run_dir}"
      )
  return result


# ---------------------------------------------------------------------------------------------


class _Step:
  """One effective step record in range: its view and its sketch field (None without one)."""

  def __init__(self, index: int, view: rec.StepView, field: Mapping | None):
    self.index, self.view, self.field = index, view, field


def _signed_head(ldir) -> tuple[int, str]:
  heads, _ = read_heads(ldir)
  if not heads:
    raise LineageError(f"{ldir} has no signed tree head; nothing vouches for its records", index=0)
  return int(heads[-1].payload["size"]), str(heads[-1].payload["root"])


def _steps_in(ldir, history, size: int, steps: tuple[int, int] | None) -> list[_Step]:
  out = []
  for index, _, body in records(ldir, kinds=(rec.STEP,), stop=size):
    if not history.effective(index):
      continue
    view = rec.view_step(body, index)
    if steps is not None and not steps[0] <= view.step <= steps[1]:
      continue
    out.append(_Step(index, view, body.get("sketch")))
  return out


def _verified(run_dir, trust: TrustStore | None, chosen: bool):
  if trust is None and not chosen:
    raise LineageError(
      "attribution needs trust=: the run key and the authorities' public keys, obtained out of "
      "band (the lineage must verify before any task code is imported)"
    )
  if trust is not None:
    verify_lineage(
      run_dir, trust, require_closed=False, require_references=False, check_checkpoints=False
    )


def _keyer(by: str, labels, classes: Sequence[str]) -> Callable[[str, int], str]:
  """Key of a training row: its example id, its route class name, or its credentialed `source`
  (through the run's manifests, `aqgov.lineage._labels`)."""
  if by == "example":
    return lambda ex_id, rc: ex_id
  if by == "label":
    return lambda ex_id, rc: classes[rc] if rc < len(classes) else f"class {rc}"

  def source(ex_id: str, rc: int) -> str:
    for authority_labels in (labels.labels_of(ex_id) or {}).values():
      if "source" in authority_labels:
        return str(authority_labels["source"])
    return "(no source)"

  return source


def _probe_examples(probe) -> list[Example]:
  pool = _example_index(probe)
  if not pool:
    raise LineageError("the probe holds no example; give at least one (JSONL: id, content)")
  return list(pool.values())


def self_influence(
  run_dir: str | os.PathLike,
  *,
  trust: TrustStore,
  group: str | Sequence[str] | None = None,
  steps: tuple[int, int] | None = None,
  learning_rate: float = 1.0,
) -> dict[str, np.ndarray]:
  """example id -> float64 [G] `Σ_t η ‖φ_g(i; θ_{t-1})‖²` from the sketch store alone (no task
  code runs): large where an example's own gradient stayed large, e.g. a flipped label."""
  run_dir, ldir = lineage_dir(run_dir)
  verify_lineage(
    run_dir, trust, require_closed=False, require_references=False, check_checkpoints=False
  )
  size, _ = _signed_head(ldir)
  _, history = hist.load(ldir)
  blocks = sketch_store.read_blocks(run_dir)
  out: dict[str, np.ndarray] = {}
  for s in _steps_in(ldir, history, size, steps):
    block = _block(s, blocks)
    sq = np.sum(np.square(block.astype(np.float64)), axis=-1) * learning_rate  # [B, G]
    for row, ex_id in enumerate(s.view.row_ids):
      out[ex_id] = out.get(ex_id, 0.0) + sq[row]
  return out


def _block(s: _Step, blocks: Mapping[int, sketch_store.SketchBlock]) -> np.ndarray:
  block = blocks.get(s.index)
  if s.field is None or block is None or block.sha256 != bytes(s.field["sha256"]):
    raise LineageError(
      f"step {s.view.step} (record {s.index}) has no sketch block matching its record; "
      "attribute it from checkpoints (pass the data) or restore the sketch store",
      index=s.index,
    )
  return np.asarray(block.sketch, np.float32)


def attribute(
  run_dir: str | os.PathLike,
  probe: Iterable[Example | Mapping[str, Any]] | str | os.PathLike,
  *,
  trust: TrustStore | None = None,
  task: Task | str | None = None,
  group: str | Sequence[str] | None = None,
  steps: tuple[int, int] | None = None,
  top: int = 10,
  by: str = "example",
  examples: Any = None,
  learning_rate: float = 1.0,
  method: str | None = None,
  normalize: bool = False,
  progress: ProgressFn | None = None,
) -> AttributionResult:
  """Score the run's training examples for each probe example (see the module doc).

  `probe`: examples (or a JSONL path) whose behaviour is asked about. `group`: the group(s) to
  score (default all; each score keeps its per-group parts). `steps`: an inclusive step range.
  `by`: "example", "label" (the route class) or "source" (the credentialed `source` label).
  `examples`: the training data (mapping, iterable or JSONL), needed only without sketches.
  `method`: "sketches" or "checkpoints" (default: sketches when every step in range has them).
  `task`: as for `replay` (a `Task`, the recorded "module:attr", or None for an entry point).
  `normalize`: each step's inner product divided by both sketches' norms (over all groups):
  cosine TracIn, which keeps examples whose gradients are merely large (early steps, outliers)
  from outranking the ones that point the probe's way.
  `progress(done, total)` is called as checkpoints are processed."""
  if by not in BY:
    raise LineageError(f"--by must be one of {', '.join(BY)}, got {by!r}")
  if top < 1:
    raise LineageError(f"top must be at least 1, got {top}")
  run_dir, ldir = lineage_dir(run_dir)
  chosen = task is not None and not isinstance(task, str) and isinstance(task, Task)
  _verified(run_dir, trust, chosen)
  size, root = _signed_head(ldir)
  scan, history = hist.load(ldir)
  start = scan.bodies[0]
  run_groups = tuple(start["groups"])
  selected = _groups(group, run_groups)
  if not chosen:
    task = trusted_task(run_dir, start, task, trust)
  spec = getattr(task, "sketch_spec", None)
  if spec is None or not hasattr(task, "sketch_examples"):
    raise LineageError(
      "the run's task does not project gradients (no sketch_spec / sketch_examples); attribution "
      "needs the spec the run sketched with: build the task with sketch=SketchSpec(...)"
    )
  in_range = _steps_in(ldir, history, size, steps)
  if not in_range:
    raise LineageError(f"no effective step record in range {steps} of the signed log")
  has_sketches = (
    all(s.field is not None for s in in_range) and sketch_store.store_dir(run_dir).is_dir()
  )
  method = method or (SKETCHES if has_sketches else CHECKPOINTS)
  if method == SKETCHES and not has_sketches:
    raise LineageError("some steps in range have no sketches; use method='checkpoints'")
  if method == CHECKPOINTS and examples is None:
    raise LineageError(
      "without sketches attribution recomputes the training examples' gradients: pass the "
      "data (--data), as for replay"
    )
  for s in in_range:
    if s.field is not None and (s.field["dim"] != spec.dim or s.field["dtype"] != spec.dtype):
      raise LineageError(
        f"step {s.view.step} recorded {s.field['dim']}-dim {s.field['dtype']} sketches but the "
        f"task projects to {spec.dim}-dim {spec.dtype}: not the run's task configuration"
      )
  probes = _probe_examples(probe)
  labels = run_labels(run_dir, start, trust) if by == "source" else None
  key_of = _keyer(by, labels, tuple(start.get("classes", ())))
  scores = _scores(
    run_dir,
    task,
    in_range,
    history,
    probes,
    method,
    examples,
    key_of,
    learning_rate,
    normalize,
    progress,
  )
  mask = np.asarray([g in selected for g in run_groups])
  ranked = []
  for p in range(len(probes)):
    rows = [(k, v[p]) for k, v in scores.items()]
    rows.sort(key=lambda kv: (-float(np.sum(kv[1][mask])), kv[0]))
    ranked.append(
      tuple(Score(k, float(np.sum(v[mask])), tuple(float(x) for x in v)) for k, v in rows[:top])
    )
  return AttributionResult(
    run_id=str(start["run_id"]),
    head_size=size,
    head_root=root,
    method=method,
    run_groups=run_groups,
    groups=selected,
    steps=(in_range[0].view.step, in_range[-1].view.step),
    by=by,
    learning_rate=float(learning_rate),
    normalized=bool(normalize),
    sketch=spec.to_wire(),
    probes=tuple((e.id, content_hash(e.content)) for e in probes),
    scores=tuple(ranked),
  )


def _groups(group, run_groups: tuple[str, ...]) -> tuple[str, ...]:
  if group is None:
    return run_groups
  names = (group,) if isinstance(group, str) else tuple(group)
  unknown = [g for g in names if g not in run_groups]
  if unknown:
    raise LineageError(f"no group {unknown[0]!r} in this run; its groups are {list(run_groups)}")
  return names


def _scores(
  run_dir, task, in_range, history, probes, method, examples, key_of, eta, normalize, progress
):
  """key -> float64 [P, G] summed scores."""
  ckpts = Checkpoints(run_dir / "checkpoints")
  try:
    on_disk = set(ckpts.steps())
    usable = sorted((c for c in history.checkpoints if c.step in on_disk), key=lambda c: c.step)
    by_ckpt: dict[int, list[_Step]] = {}
    for s in in_range:
      before = [c for c in usable if c.step <= s.view.step - 1]
      if not before:
        raise CheckpointError(
          f"no recorded checkpoint at or before step {s.view.step - 1} is on disk; attribution "
          "computes the probe's gradient at the checkpoint nearest before each step"
        )
      by_ckpt.setdefault(before[-1].step, []).append(s)
    blocks = sketch_store.read_blocks(run_dir) if method == SKETCHES else {}
    pool = _example_index(examples) if method == CHECKPOINTS else {}
    out: dict[str, np.ndarray] = {}
    refs = {c.step: c for c in usable}
    for done, (ck_step, group_steps) in enumerate(sorted(by_ckpt.items())):
      params = _restored_params(ckpts, refs[ck_step], task)
      phi = np.asarray(task.sketch_examples(params, probes), np.float64)  # [P, G, k]
      phi_norm = np.sqrt(np.sum(np.square(phi), axis=(1, 2)))  # [P]
      if method == SKETCHES:
        for s in group_steps:
          sk = _block(s, blocks).astype(np.float64)  # [B, G, k]
          contrib = np.einsum("pgk,bgk->bpg", phi, sk) * eta
          if normalize:
            sk_norm = np.sqrt(np.sum(np.square(sk), axis=(1, 2)))  # [B]
            contrib = contrib / _safe(sk_norm[:, None, None] * phi_norm[None, :, None])
          _add(out, s, contrib, key_of)
      else:
        _add_recomputed(
          out, task, params, phi, phi_norm if normalize else None, group_steps, pool, eta, key_of
        )
      report(progress, done + 1, len(by_ckpt))
    return out
  finally:
    ckpts.close()


def _restored_params(ckpts: Checkpoints, ref, task):
  restored = ckpts.restore(ref.step, task.init())
  if restored.params_sha256 != ref.params_sha256:
    raise CheckpointError(
      f"checkpoint at step {ref.step} holds params hashing to {restored.params_sha256[:16]}..., "
      f"but lineage record {ref.index} recorded {ref.params_sha256[:16]}...: it was altered"
    )
  return restored.state.params


def _add(out: dict, s: _Step, contrib: np.ndarray, key_of) -> None:
  """Accumulate [B, P, G] per-row contributions of step `s` under each row's key."""
  for row, ex_id in enumerate(s.view.row_ids):
    key = key_of(ex_id, int(s.view.route_class[row]))
    out[key] = out.get(key, 0.0) + contrib[row]


def _safe(norms: np.ndarray) -> np.ndarray:
  """Divisors for cosine scores: a zero sketch (routed away everywhere) keeps a score of 0."""
  return np.where(norms > 0, norms, 1.0)


def _add_recomputed(out, task, params, phi, phi_norm, group_steps, pool, eta, key_of) -> None:
  """TracIn over one checkpoint: each example the steps trained on, projected once at `params`
  with unit weights, then weighted by each step's recorded weights (sketches are linear in the
  weights; a weight of 0 contributes exactly 0)."""
  wanted: dict[str, Example] = {}
  for s in group_steps:
    for row, ex_id in enumerate(s.view.row_ids):
      ex = pool.get(ex_id)
      if ex is None:
        raise LineageError(
          f"step {s.view.step}: example {ex_id!r} is not in the data given; attribution from "
          "checkpoints needs every example the steps trained on",
          index=s.index,
        )
      k = s.view.rows[row]
      if s.view.example_sha256 is not None and content_hash(ex.content) != s.view.example_sha256[k]:
        raise LineageError(
          f"step {s.view.step}: example {ex_id!r} is not the bytes the lineage recorded",
          index=s.index,
        )
      wanted[ex_id] = ex
  ids = sorted(wanted)
  at = {i: n for n, i in enumerate(ids)}
  unit = np.asarray(task.sketch_examples(params, [wanted[i] for i in ids]), np.float64)
  dots = np.einsum("pgk,ngk->npg", phi, unit)  # [N, P, G]
  sq = np.sum(np.square(unit), axis=2)  # [N, G]
  for s in group_steps:
    w = s.view.weights.astype(np.float64)  # [B, G]
    rows = np.asarray([at[i] for i in s.view.row_ids])
    contrib = np.where(w[:, None, :] != 0, dots[rows] * w[:, None, :], 0.0) * eta  # [B, P, G]
    if phi_norm is not None:
      norms = np.sqrt(np.sum(np.square(w) * sq[rows], axis=1))  # [B]
      contrib = contrib / _safe(norms[:, None, None] * phi_norm[None, :, None])
    _add(out, s, contrib, key_of)
