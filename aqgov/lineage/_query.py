"""Questions an auditor asks of a lineage: which examples reached a group, which were refused at
admission, and what a run did.

Membership: an example *reached* group g at a step when the weight its gradient was actually
applied with in g was positive there (`StepView.applied_weights`: the policy weight after fallback
routes, dropped examples, pause, reroute and freeze); the weight and contribution norm reported are
the applied ones (`applied_scale[g] * || w_i[g] * grad_g L_i ||`). `membership(..., policy=True)`
asks what the policy allowed instead (the `weights` a step record also keeps).
Only effective records count unless `include_superseded` (see `aqgov.lineage.history`), and only
records a signed tree head covers: an unsigned tail (records anyone could have appended after the
last signed head) is never read, only counted.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from aqgov.documents._keys import TrustStore
from aqgov.errors import LineageError
from aqgov.lineage import _history as hist
from aqgov.lineage import _record as rec
from aqgov.lineage._heads import read_heads
from aqgov.lineage._index import Columns, load_columns
from aqgov.lineage._labels import matching, run_labels
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
  weight: float
  contribution_norm: float
  superseded: bool
  group: str = ""
  route_class_name: str = ""


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
    weights, norms = reach(view, policy)
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
            group,
          )
        )
  return out


@dataclasses.dataclass(frozen=True)
class QueryResult:
  """What a query found: how many rows matched, the rows (the first `top` after sorting, built on
  first use), and where they came from."""

  count: int
  source: str  # "index": the signed index; "scan": the log's signed part, read now
  note: str  # why the index was not used ("" when it was)
  columns: Columns = dataclasses.field(repr=False)
  at: np.ndarray = dataclasses.field(repr=False)  # row positions, in result order
  group_at: np.ndarray = dataclasses.field(repr=False)  # group index of each

  @functools.cached_property
  def rows(self) -> tuple[Membership, ...]:
    c = self.columns
    return tuple(
      Membership(
        int(c.step[r]),
        int(c.record[r]),
        c.ids[int(c.example[r])],
        int(c.route_class[r]),
        float(c.weight[gi][r]),
        float(c.norm[gi][r]),
        bool(c.superseded[r]),
        c.groups[gi],
        class_name(c.classes, int(c.route_class[r])),
      )
      for r, gi in zip(self.at.tolist(), self.group_at.tolist())
    )


SORT_KEYS = ("norm", "weight", "step")


def class_name(classes: Sequence[str], c: int) -> str:
  """The name of route class `c` (run-start's class names; `class c` beyond them)."""
  return classes[c] if 0 <= c < len(classes) else f"class {c}"


def class_number(classes: Sequence[str], value: str | int) -> int:
  """The route class a name (or number) denotes; `LineageError` listing the names otherwise."""
  if isinstance(value, int) or str(value).isdigit():
    return int(value)
  if value in classes:
    return list(classes).index(value)
  raise LineageError(
    f"route class {value!r} is not one of this run's: {', '.join(classes) or '(none recorded)'}"
  )


def query(
  run_dir: str | os.PathLike,
  group: str | None = None,
  *,
  where: str | None = None,
  example: str | None = None,
  step: int | None = None,
  route_class: str | int | None = None,
  sort: str | None = None,
  top: int | None = None,
  include_superseded: bool = False,
  use_index: bool = True,
  trust: TrustStore | None = None,
) -> QueryResult:
  """The (step, example, group) rows where an example reached `group` (every group when None),
  optionally only examples whose credential labels satisfy `where` (the policy expression
  language, see `aqgov.policy`), one `example`, one `step` or one `route_class` (name or number);
  sorted by `sort` (norm, weight: largest first; step) and cut to `top`.

  Answered from the run's signed index when it is current and intact, else by a scan of the log's
  signed part (`QueryResult.note` says why); both give the same rows. Labels come from the
  manifests run-start names (checked against its record, and against `trust` when given)."""
  if sort is not None and sort not in SORT_KEYS:
    raise LineageError(f"sort by one of {', '.join(SORT_KEYS)}, not {sort!r}")
  if top is not None and top < 0:
    raise LineageError(f"top must be a non-negative count, not {top}")
  labels = None
  if trust is not None:
    root, ldir = lineage_dir(run_dir)
    labels = run_labels(root, _first_body(ldir), trust)
  loaded = load_columns(
    run_dir, groups=None if group is None else [group], use_index=use_index, labels=labels
  )
  cols = loaded.columns
  names = [group] if group is not None else list(cols.groups)
  gis = [cols.group(n) for n in names]
  base = np.ones(cols.size, bool) if include_superseded else ~cols.superseded
  if step is not None:
    base &= cols.step == step
  if route_class is not None:
    base &= cols.route_class == class_number(cols.classes, route_class)
  if example is not None:
    where_id = [i for i, e in enumerate(cols.ids) if e == example]
    base &= cols.example == (where_id[0] if where_id else -1)
  if where is not None:
    base &= matching(where, cols.space, cols.label_table())[cols.example]
  picked = [(gi, np.flatnonzero(base & cols.reached[gi])) for gi in gis]
  rows_at = np.concatenate([p for _, p in picked]) if picked else np.zeros(0, np.int64)
  group_at = np.concatenate([np.full(p.size, gi) for gi, p in picked]) if picked else rows_at
  count = int(rows_at.size)
  if sort in ("norm", "weight"):
    column = cols.norm if sort == "norm" else cols.weight
    key = np.concatenate([column[gi][p] for gi, p in picked]) if picked else np.zeros(0)
    if top is not None and top < key.size:
      keep = np.argpartition(-key, top - 1)[:top] if top else np.zeros(0, np.int64)
      rows_at, group_at, key = rows_at[keep], group_at[keep], key[keep]
    order = np.lexsort((group_at, rows_at, -key.astype(np.float64)))
  else:
    order = np.lexsort(
      (group_at, rows_at) if sort is None else (group_at, rows_at, cols.step[rows_at])
    )
  order = order[:top] if top is not None else order
  return QueryResult(count, loaded.source, loaded.note, cols, rows_at[order], group_at[order])


def _first_body(ldir) -> dict:
  from aqgov.lineage._index import _start

  return _start(ldir)


def reach(view: rec.StepView, policy: bool = False) -> tuple:
  """([B, G] weights, [B, G] contribution norms) of a step a membership question counts: as
  applied (default), or as the policy allowed."""
  if policy:
    return view.weights, view.contribution_norms
  return view.applied_weights, view.applied_norms


class Refusal(NamedTuple):
  """An example refused at admission: left out of the batch of `step` (or, for a batch refused
  whole, of any step: `taken` is False and `step` is the last step taken before it)."""

  step: int
  record: int
  example_id: str
  reason: str
  taken: bool
  superseded: bool


def refusals(
  run_dir: str | os.PathLike, *, step: int | None = None, include_superseded: bool = False
) -> list[Refusal]:
  """Every example refused at admission that the signed part of the log records, in log order."""
  _, ldir = lineage_dir(run_dir)
  scan, history = hist.load(ldir)
  _run_start(scan, ldir)
  out = []
  for index, kind, body in records(ldir, kinds=(rec.STEP, rec.EVENT), stop=history.size):
    superseded = not history.effective(index)
    if (superseded and not include_superseded) or (step is not None and int(body["step"]) != step):
      continue
    out += [
      Refusal(int(body["step"]), index, r.example_id, str(r.reason), kind == rec.STEP, superseded)
      for r in rec.rejected_of(body)
    ]
  return out


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
  refused: dict[str, int] = {}  # reason -> examples refused at admission (effective records)


def describe(run_dir: str | os.PathLike) -> RunDescription:
  """Summary of the signed part of a run's lineage (chain and head signatures checked; verify checks
  everything else)."""
  _, ldir = lineage_dir(run_dir)
  scan, history = hist.load(ldir)
  start = _run_start(scan, ldir)
  groups = list(start["groups"])
  heads, _ = read_heads(ldir)
  steps, last_step, last_loss, seen = 0, 0, None, set()
  reached, norm, refused = Counter(), Counter(), Counter()
  for index, kind, body in records(ldir, kinds=(rec.STEP, rec.EVENT), stop=history.size):
    if not history.effective(index):
      continue
    if kind == rec.EVENT:
      refused.update(str(r.reason) for r in rec.rejected_of(body))
      continue
    view = rec.view_step(body, index, len(groups))
    refused.update(str(r.reason) for r in view.rejected)
    steps, last_step, last_loss = steps + 1, view.step, view.loss
    seen.update(view.row_ids)
    weights, norms = reach(view, policy=False)
    for gi, name in enumerate(groups):
      reached[name] += int((weights[:, gi] > 0).sum())
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
    group_reach={g: reached[g] for g in groups},
    group_norm={g: norm[g] for g in groups},
    torn_bytes=scan.torn.nbytes if scan.torn else 0,
    unsigned=scan.size - signed,
    refused=dict(sorted(refused.items())),
  )
