"""Questions an auditor asks of a lineage: which examples reached a group, and what a run did.

Membership: an example *reached* group g at a step when the weight its gradient was actually
applied with in g was positive there (`StepView.applied_weights`: the policy weight after fallback
routes, dropped examples, pause, reroute and freeze); the contribution norm says how much of its
gradient arrived (`applied_scale[g] * || w_i[g] * grad_g L_i ||`). `policy=True` asks what the
policy allowed instead (the `weights` a step record also keeps).
Only effective records count unless `include_superseded` (see `aqgov.lineage.history`), and only
records a signed tree head covers: an unsigned tail (records anyone could have appended after the
last signed head) is never read, only counted.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import NamedTuple

from aqgov.errors import LineageError
from aqgov.lineage import _history as hist
from aqgov.lineage import _record as rec
from aqgov.lineage._heads import read_heads
from aqgov.lineage._segments import records
from aqgov.lineage._verify import lineage_dir


def _run_start(scan, ldir) -> dict:
  """The run-start body of a scanned log; `LineageError` when the log holds no complete record."""
  if scan.size == 0:
    raise LineageError(
      f"{ldir} holds no complete record (its segments/ directory is empty or its first record "
      "was torn); nothing to show",
      index=0,
    )
  return scan.bodies[0]


class Membership(NamedTuple):
  """One example reaching one group at one step."""

  step: int
  record: int
  example_id: str
  route_class: int
  weight: float  # the weight applied (the policy's with `policy=True`)
  contribution_norm: float
  superseded: bool
  policy_weight: float = 0.0  # the weight the policy gave


def membership(
  run_dir: str | os.PathLike,
  group: str,
  *,
  step: int | None = None,
  include_superseded: bool = False,
  policy: bool = False,
) -> list[Membership]:
  """Every (step, example) whose applied weight in `group` was positive (with `policy`: whose
  policy weight was), in log order."""
  _, ldir = lineage_dir(run_dir)
  scan, history = hist.load(ldir)
  groups = list(_run_start(scan, ldir)["groups"])
  if group not in groups:
    raise LineageError(f"group {group!r} is not one of this run's groups: {', '.join(groups)}")
  g = groups.index(group)
  out = []
  for index, _, body in records(
    ldir, kinds=(rec.STEP,), stop=history.size
  ):  # never the unsigned tail
    superseded = not history.effective(index)
    if (superseded and not include_superseded) or (step is not None and int(body["step"]) != step):
      continue
    view = rec.view_step(body, index, len(groups))
    ids = view.row_ids
    weights, norms = _reach(view, policy)
    for r in range(view.weights.shape[0]):
      w = float(weights[r, g])
      if w > 0:
        out.append(
          Membership(
            view.step,
            index,
            ids[r],
            int(view.route_class[r]),
            w,
            float(norms[r, g]),
            superseded,
            float(view.weights[r, g]),
          )
        )
  return out


def _reach(view: rec.StepView, policy: bool):
  """([B, G] weights, [B, G] contribution norms) a membership question counts."""
  if policy:
    return view.weights, view.contribution_norms
  return view.applied_weights, view.applied_norms


class RunDescription(NamedTuple):
  """What `aqgov lineage show` prints."""

  run_id: str
  start: dict
  size: int
  heads: int
  signed_size: int
  closed: bool
  status: str | None
  steps: int
  last_step: int
  last_loss: float | None
  examples: int
  checkpoints: tuple[hist.CheckpointRef, ...]
  resumes: int
  kinds: dict[str, int]
  group_reach: dict[str, int]
  group_norm: dict[str, float]
  torn_bytes: int
  unsigned: int = 0  # records after the last signed head: counted, never read


def describe(run_dir: str | os.PathLike) -> RunDescription:
  """Summary of the signed part of a run's lineage (chain and head signatures checked; verify checks
  everything else)."""
  _, ldir = lineage_dir(run_dir)
  scan, history = hist.load(ldir)
  start = _run_start(scan, ldir)
  groups = list(start["groups"])
  heads, _ = read_heads(ldir)
  steps, last_step, last_loss, seen = 0, 0, None, set()
  reach, norm = Counter(), Counter()
  for index, _, body in records(ldir, kinds=(rec.STEP,), stop=history.size):
    if not history.effective(index):
      continue
    view = rec.view_step(body, index, len(groups))
    steps, last_step, last_loss = steps + 1, view.step, view.loss
    seen.update(view.row_ids)
    weights, norms = _reach(view, policy=False)
    for gi, name in enumerate(groups):
      reach[name] += int((weights[:, gi] > 0).sum())
      norm[name] += float(norms[:, gi].sum())
  signed = history.size
  ends = [(i, b) for i, b in scan.of_kind(rec.RUN_END) if i < signed]
  closed = signed == scan.size and scan.kinds[-1] == rec.RUN_END
  return RunDescription(
    run_id=start["run_id"],
    start=start,
    size=scan.size,
    heads=len(heads),
    signed_size=signed,
    closed=closed,
    status=ends[-1][1]["status"] if ends and closed else None,
    steps=steps,
    last_step=last_step,
    last_loss=last_loss,
    examples=len(seen),
    checkpoints=history.checkpoints,
    resumes=sum(1 for i, _ in scan.of_kind(rec.RUN_RESUME) if i < signed),
    kinds=dict(Counter(scan.kinds[:signed])),
    group_reach={g: reach[g] for g in groups},
    group_norm={g: norm[g] for g in groups},
    torn_bytes=scan.torn.nbytes if scan.torn else 0,
    unsigned=scan.size - signed,
  )
