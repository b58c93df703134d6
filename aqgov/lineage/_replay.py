"""Forensic replay: rebuild the params at step T by re-executing the recorded steps.

`replay(run_dir, step=T, examples=...)` restores the nearest effective checkpoint at or before T
(its params must hash to what its lineage record says), then re-runs steps s+1..T with the run's
`Task` on the recorded examples, looked up by recorded id in `examples`:

- each example's content SHA-256 must equal the hash recorded for it at that step (the hash
  admission checked against its credential); a different or missing example is named;
- each step's recomputed record must equal the recorded one bit for bit, field by field in this
  order: the batch rows, route classes, weights, contribution norms, loss, entropy measurements,
  governance events, then the fingerprint, then (when the step recorded them) the gradient
  sketches, whose block must hash to the record's `sketch.sha256`; the first field that differs is named with the step
  and, where it has one, the example and group (`ReplayDivergence.field`, `.step`, `.example_id`,
  `.group`). All of them are float32 (or integer) outputs of the same jitted step, so on the same
  platform and device configuration they reproduce exactly: there is no tolerance;
- where the lineage recorded a checkpoint at a replayed step, the rebuilt params must hash to its
  full SHA-256; if the checkpoint is on disk the first differing leaf is named.

Replay imports no code a run directory names before the lineage verifies against `trust` (the
run key and the authorities' keys, obtained out of band), and then only the task the caller names
(`task="module:attr"`, which must be the recorded one) or an installed `aqgov.tasks` entry point
recording it; the policies, profiles, manifests and task source must be those run-start recorded.
A caller who passes a `Task` object chose the code: then `trust` is optional. A run that records
no task (a loop its user owns, `GovernedRun.open`) replays only with a task its caller names
(`ReplayUnavailable` otherwise): there is no recorded task code to check it against, so the
recorded fingerprints are the whole check.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from aqgov.credentials._manifest import Example, as_example, content_hash, iter_examples
from aqgov.documents._keys import TrustStore
from aqgov.errors import CheckpointError, LineageError, ReplayDivergence, ReplayUnavailable
from aqgov.lineage import _history as hist
from aqgov.lineage import _record as rec
from aqgov.lineage import _sketches as sketch_store
from aqgov.lineage import _trust as trustlib
from aqgov.lineage._checkpoint import Checkpoints
from aqgov.lineage._progress import ProgressFn, report
from aqgov.lineage._segments import records
from aqgov.lineage._summary import params_sha256
from aqgov.lineage._task import Task, TrainState, load_task
from aqgov.lineage._verify import lineage_dir, verify_lineage
from aqgov.policy._paths import tree_paths


class ReplayResult(NamedTuple):
  """The rebuilt state at `step` and what was checked on the way."""

  state: TrainState
  step: int
  from_checkpoint: int
  steps_replayed: int
  hashes_checked: tuple[int, ...]


def _example_index(
  examples: Mapping[str, Example] | Iterable[Example | Mapping[str, Any]] | str | os.PathLike,
) -> Mapping[str, Example]:
  if isinstance(examples, (str, os.PathLike)):
    examples = iter_examples(examples)
  if isinstance(examples, Mapping):
    return {k: as_example(v) for k, v in examples.items()}
  out: dict[str, Example] = {}
  for e in examples:
    ex = as_example(e)
    out[ex.id] = ex
  return out


def _first_difference(a: np.ndarray, b: np.ndarray) -> int | None:
  """Index of the first row where float arrays differ bitwise (None if identical)."""
  a32 = np.ascontiguousarray(a, np.float32).view(np.uint32).reshape(a.shape[0], -1)
  b32 = np.ascontiguousarray(b, np.float32).view(np.uint32).reshape(b.shape[0], -1)
  if a32.shape != b32.shape:
    return 0
  rows = np.nonzero((a32 != b32).any(axis=1))[0]
  return int(rows[0]) if rows.size else None


def trusted_task(run_dir, start: Mapping[str, Any], task: str | None, trust: TrustStore) -> Task:
  """The run's task, imported only once its lineage verified (the caller's job): the recorded
  reference (or `task`, which must be it), its documents and source checked against run-start.
  A run recorded from its user's own loop records no task: then only a named `task` re-executes it,
  else `ReplayUnavailable`."""
  recorded = start["config"].get("task")
  if recorded is None and task is None:
    raise ReplayUnavailable(
      f"run {start['run_id']} records no task: it was recorded from a loop its user owns "
      "(GovernedRun.open), so there is no recorded step code to re-execute. Verify, query and "
      "export it as usual; to replay, name a task that re-implements the loop (task="
      "'module:attr' / --task, or a Task object), or record runs with GovernedRun.start(task=...)",
      index=0,
    )
  ref = task if recorded is None else trustlib.resolve_task(recorded, task)
  authorities = trustlib.recorded_trust(start, trust, exact=False)
  trustlib.check_documents(run_dir, start)
  trustlib.check_task_source(start, ref)
  return load_task(ref, start["config"].get("task_config", {}), run_dir, trust=authorities)


def replay(
  run_dir: str | os.PathLike,
  *,
  step: int,
  examples: Mapping[str, Example] | Iterable[Example | Mapping[str, Any]] | str | os.PathLike,
  task: Task | str | None = None,
  trust: TrustStore | None = None,
  from_checkpoint: int | None = None,
  progress: ProgressFn | None = None,
) -> ReplayResult:
  """Rebuild the `TrainState` after step `step` (see the module doc); raises at the first divergence.

  `examples` is a mapping id -> example, an iterable of examples (or JSONL-shaped mappings) or a
  JSONL path. `from_checkpoint` starts from an earlier checkpoint than the nearest, so that later
  checkpoints are re-derived and checked against their recorded full hashes. `task` is a `Task`
  the caller built, or the recorded "module:attr" the caller trusts, or None for an installed
  entry point; without a `Task`, `trust` is required (see the module doc). `progress(steps
  replayed, steps to replay)` follows the re-execution.
  """
  run_dir, ldir = lineage_dir(run_dir)
  chosen = task is not None and not isinstance(task, str) and isinstance(task, Task)
  if trust is None and not chosen:
    raise LineageError(
      "replay needs trust=: the run key and the authorities' public keys, obtained out of band "
      "(the lineage must verify before any task code is imported)"
    )
  # the signed log must verify; an open run may be replayed, and replay checks the checkpoints it uses itself
  # (so that the params of a replaced one can be re-derived from an earlier one)
  if (
    trust is not None
    and verify_lineage(
      run_dir, trust, require_closed=False, require_references=False, check_checkpoints=False
    ).signed_size
    == 0
  ):
    raise LineageError(
      f"no signed tree head covers the run-start record of {run_dir}; nothing vouches for it",
      index=0,
    )
  scan, history = hist.load(ldir)
  start = scan.bodies[0]
  groups = tuple(start["groups"])
  if not chosen:
    task = trusted_task(run_dir, start, task, trust)
  checkpoints = Checkpoints(run_dir / "checkpoints")
  try:
    on_disk = set(checkpoints.steps())
    limit = step if from_checkpoint is None else min(step, from_checkpoint)
    usable = [c for c in history.checkpoints if c.step <= limit and c.step in on_disk]
    if not usable:
      raise CheckpointError(
        f"no recorded checkpoint at or before step {limit} is on disk in {checkpoints.directory}; "
        "replay needs one to start from"
      )
    ref = max(usable, key=lambda c: (c.step, c.index))
    restored = checkpoints.restore(ref.step, task.init())
    if restored.params_sha256 != ref.params_sha256:
      raise CheckpointError(
        f"checkpoint at step {ref.step} ({run_dir / ref.path}) holds params hashing to "
        f"{restored.params_sha256[:16]}..., but lineage record {ref.index} recorded "
        f"{ref.params_sha256[:16]}...: the checkpoint was altered"
      )
    state = restored.state
    if step == ref.step:
      return ReplayResult(state, step, ref.step, 0, (ref.step,))
    pool = _example_index(examples)
    expected, checked = ref.step + 1, [ref.step]
    report(progress, 0, step - ref.step)
    for index, _, body in records(ldir, kinds=(rec.STEP,), start=ref.index + 1):
      if not history.effective(index):
        continue
      view = rec.view_step(body)
      if view.step != expected:
        raise ReplayDivergence(
          f"record {index} is step {view.step} but step {expected} comes next after the "
          f"checkpoint at step {ref.step}",
          index=index,
          step=expected,
        )
      state = _replay_step(task, state, view, index, pool, groups, body.get("sketch"))
      report(progress, view.step - ref.step, step - ref.step)
      done = history.checkpoint_at(view.step)
      if done is not None:
        _check_full_hash(state, done, checkpoints, on_disk, index)
        checked.append(view.step)
      if view.step == step:
        return ReplayResult(state, step, ref.step, step - ref.step, tuple(checked))
      expected += 1
    raise LineageError(
      f"the signed part of the lineage records steps only up to {expected - 1} (records after "
      f"its last valid signed head are not read); cannot replay to step {step}",
      index=history.size,
    )
  finally:
    checkpoints.close()


def _bits(a: np.ndarray) -> np.ndarray:
  """`a` as unsigned integers of the same width, so that equality is bitwise (NaN == NaN, -0 != 0)."""
  a = np.ascontiguousarray(a)
  if a.dtype == bool or a.dtype.itemsize not in (1, 2, 4, 8):
    return a
  return a.view(f"u{a.dtype.itemsize}")


def _mismatch(recorded: np.ndarray, replayed: np.ndarray) -> tuple[int, ...] | None:
  """The first index where two arrays differ bitwise (() when their shapes differ), None if equal."""
  recorded, replayed = np.atleast_1d(recorded), np.atleast_1d(replayed)
  if recorded.shape != replayed.shape or recorded.dtype != replayed.dtype:
    return ()
  where = np.argwhere(_bits(recorded) != _bits(replayed))
  return tuple(int(i) for i in where[0]) if where.size else None


def _check_record(
  view: rec.StepView, replayed: rec.StepView, index: int, groups: tuple[str, ...]
) -> None:
  """Raise `ReplayDivergence` at the first field of the replayed step record that differs."""
  absent = np.zeros((0,))
  fields = [
    ("rows", view.rows, replayed.rows, True),
    ("route_class", view.route_class, replayed.route_class, True),
    ("weights", view.weights, replayed.weights, True),
    ("contribution_norms", view.contribution_norms, replayed.contribution_norms, True),
    ("loss", np.float64(view.loss), np.float64(replayed.loss), False),
  ]
  for kind, recorded, got in (
    ("measurements", view.measurements, replayed.measurements),
    ("events", view.events, replayed.events),
  ):
    fields += [
      (f"{kind}[{k!r}]", recorded.get(k, absent), got.get(k, absent), False)
      for k in sorted(set(recorded) | set(got))
    ]
  for field, recorded, got, per_row in fields:
    at = _mismatch(recorded, got)
    if at is None:
      continue
    example = view.row_ids[at[0]] if per_row and at and at[0] < len(view.rows) else None
    group = groups[at[1]] if per_row and len(at) == 2 and at[1] < len(groups) else None
    where = (f" of example {example!r}" if example else "") + (
      f" in group {group!r}" if group else ""
    )
    detail = (
      f"recorded {np.atleast_1d(recorded)[at].tolist()}, replayed {np.atleast_1d(got)[at].tolist()}"
      if at
      else f"recorded shape {np.shape(recorded)}, replayed {np.shape(got)}"
    )
    raise ReplayDivergence(
      f"step {view.step}: the replayed {field}{where} diverge from the record ({detail})",
      index=index,
      step=view.step,
      group=group,
      example_id=example,
      field=field,
    )


def _replay_step(
  task: Task,
  state: TrainState,
  view: rec.StepView,
  index: int,
  pool: Mapping[str, Example],
  groups: tuple[str, ...],
  sketch: Mapping[str, Any] | None = None,
) -> TrainState:
  batch_examples = []
  for k, ex_id in enumerate(view.example_ids):
    ex = pool.get(ex_id)
    if ex is None:
      raise ReplayDivergence(
        f"step {view.step}: example {ex_id!r} is not in the examples given; replay needs "
        "every example the step trained on",
        index=index,
        step=view.step,
        example_id=ex_id,
      )
    if view.example_sha256 is not None and content_hash(ex.content) != view.example_sha256[k]:
      raise ReplayDivergence(
        f"step {view.step}: example {ex_id!r} hashes to {content_hash(ex.content)[:16]}... but "
        f"the lineage recorded {view.example_sha256[k][:16]}...: these are not the bytes "
        "that were trained on",
        index=index,
        step=view.step,
        example_id=ex_id,
      )
    batch_examples.append(ex)
  batch, labels = task.make_batch(batch_examples)
  state, summary = task.step(state, batch, labels)
  _check_record(
    view, rec.view_step(rec.step_body(summary, view.example_ids, time_s=0.0)), index, groups
  )
  got = np.asarray(jax.device_get(summary.fingerprint), np.float32)
  g = _first_difference(got, view.fingerprint)
  if g is not None:
    name = groups[g] if g < len(groups) else str(g)
    raise ReplayDivergence(
      f"step {view.step}: the params of group {name!r} diverge from the recorded fingerprint "
      f"(recorded {view.fingerprint[g].tolist()}, replayed {got[g].tolist()})",
      index=index,
      step=view.step,
      group=name,
      field="fingerprint",
    )
  if sketch is not None:
    _check_sketch(summary, sketch, view, index)
  return state


def _check_sketch(summary, recorded: Mapping[str, Any], view: rec.StepView, index: int) -> None:
  """The replayed step's sketch block must hash to the digest its record holds, bit for bit."""
  got = getattr(summary, "sketch", None)
  digest = None
  if got is not None:
    rows = sketch_store.sketch_rows(jax.device_get(got), jax.device_get(summary.example_index))
    digest = hashlib.sha256(sketch_store.encode_block(index, view.step, rows)).digest()
  if digest != bytes(recorded["sha256"]):
    raise ReplayDivergence(
      f"step {view.step}: the replayed gradient sketches diverge from the recorded block "
      f"({recorded['chunk']}); the step computed other sketches than it recorded",
      index=index,
      step=view.step,
      field="sketch",
    )


def _check_full_hash(
  state: TrainState,
  ref: hist.CheckpointRef,
  checkpoints: Checkpoints,
  on_disk: set[int],
  index: int,
) -> None:
  digest = params_sha256(state.params)
  if digest == ref.params_sha256:
    return
  where = ""
  if ref.step in on_disk:
    saved = checkpoints.restore(ref.step, state).state.params
    for path, a, b in zip(
      tree_paths(state.params), jax.tree.leaves(state.params), jax.tree.leaves(saved), strict=True
    ):
      if np.asarray(a).tobytes() != np.asarray(b).tobytes():
        where = f"; first differing leaf: {path}"
        break
  raise ReplayDivergence(
    f"step {ref.step}: replayed params hash to {digest[:16]}... but the checkpoint record "
    f"{ref.index} says {ref.params_sha256[:16]}...{where}",
    index=index,
    step=ref.step,
  )
