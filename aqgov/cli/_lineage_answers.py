"""`aqgov lineage` questions a run's signed lineage answers: which examples reached which group
(query, its signed index), entropy and events over training, and which examples shaped a probe
(attribute). They register on the `lineage` group."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from aqgov.cli.lineage import (
  _IMPORT_TRUST,
  _MORE_KEYS,
  _run_signing_key,
  _signing_key,
  _trust,
  lineage,
)
from aqgov.documents import _keys as keylib
from aqgov.documents._keys import TrustStore
from aqgov.lineage._progress import progress_bar


def _policy_query(run_dir, group, step, include_superseded, as_json, *filters) -> None:
  """`lineage query --policy`: the rows the policy allowed, from a scan of the signed log."""
  from aqgov.lineage._query import membership

  if group is None or any(f is not None for f in filters):
    raise click.UsageError("--policy answers --group GROUP (and --step) only")
  rows = membership(run_dir, group, step=step, include_superseded=include_superseded, policy=True)
  if as_json:
    for m in rows:
      click.echo(json.dumps(m._asdict()))
    return
  table = Table(title=f"examples the policy allowed to reach {group!r}")
  for col in ("step", "example", "route class", "policy weight", "contribution norm"):
    table.add_column(col, justify="left" if col == "example" else "right")
  for m in rows:
    table.add_row(
      str(m.step) + (" (superseded)" if m.superseded else ""),
      m.example_id,
      str(m.route_class),
      f"{m.weight:.6g}",
      f"{m.contribution_norm:.6g}",
    )
  Console().print(table)
  click.echo(f"{len(rows)} (step, example) rows the policy allowed")


@lineage.command("query")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--group", default=None, help="Parameter group name (default: every group).")
@click.option(
  "--where",
  default=None,
  help="Only examples whose credential labels satisfy this policy expression, e.g. "
  '"sensitivity_tier >= 2" (labels from the run\'s manifests).',
)
@click.option("--example", default=None, help="Only this example id.")
@click.option(
  "--refused", is_flag=True, help="The examples admission refused instead, with the reason."
)
@click.option("--step", type=int, default=None, help="Only this step.")
@click.option("--route-class", default=None, help="Only this route class (its name, or number).")
@click.option(
  "--sort",
  type=click.Choice(["norm", "weight", "step"]),
  default=None,
  help="Order rows by contribution norm or weight (largest first) or step; default: log order.",
)
@click.option("--top", type=click.IntRange(min=0), default=None, help="Only the first N rows.")
@click.option(
  "--include-superseded",
  is_flag=True,
  help="Also steps whose effect was lost to a crash and resume.",
)
@click.option("--no-index", is_flag=True, help="Scan the log even when a signed index is present.")
@click.option(
  "--trust",
  multiple=True,
  type=click.Path(exists=True, dir_okay=False),
  help="Authority keys (obtained out of band) to check the manifests' signatures with; without "
  "it each manifest is only held to the SHA-256 run-start recorded.",
)
@click.option(
  "--policy",
  is_flag=True,
  help="What the policy allowed instead of what was applied (the default counts pause, reroute, "
  "freeze, fallback routes and dropped examples); with --group and --step only.",
)
@click.option(
  "--json", "as_json", is_flag=True, help="One JSON object per line instead of a table."
)
def query_cmd(
  run_dir: str,
  group: str | None,
  refused: bool,
  where: str | None,
  example: str | None,
  step: int | None,
  route_class: str | None,
  sort: str | None,
  top: int | None,
  include_superseded: bool,
  no_index: bool,
  trust: tuple[str, ...],
  policy: bool,
  as_json: bool,
) -> None:
  """Which examples reached GROUP (applied weight > 0), at which steps, with what weight and norm
  as applied (--policy: as the policy allowed).

  Prints "none" when no row matches. Answered from the run's signed index (`aqgov lineage index`)
  when it is current and intact, else from a scan of the log's signed part (stderr says which).
  With --refused: which examples admission refused, at which steps and why."""
  from aqgov.lineage._query import query

  if policy:
    _policy_query(run_dir, group, step, include_superseded, as_json, where, example, route_class)
    return
  if refused:
    if group is not None or where is not None or route_class is not None:
      raise click.UsageError(
        "--refused lists refused examples: give no --group, --where or --route-class"
      )
    _query_refused(run_dir, step, example, include_superseded, as_json)
    return

  result = query(
    run_dir,
    group,
    where=where,
    example=example,
    step=step,
    route_class=route_class,
    sort=sort,
    top=top,
    include_superseded=include_superseded,
    use_index=not no_index,
    trust=TrustStore.from_paths(trust) if trust else None,
  )
  index_refused = result.source == "scan" and not result.note.startswith("no index")
  if index_refused or not as_json:  # JSON output stays clean unless an index was there but refused
    click.echo(
      "answered from the signed index"
      if result.source == "index"
      else f"{result.note}; scanned the signed part of the log",
      err=True,
    )
  if as_json:
    for m in result.rows:
      click.echo(json.dumps(m._asdict()))
    return
  if not result.rows:
    click.echo("none")
    return
  what = f"{group!r}" if group else "each group"
  table = Table(
    title=f"examples that reached {what}"
    + (f" where {where}" if where else "")
    + (f" at step {step}" if step is not None else "")
  )
  for col in ("step", "example", "group", "route class", "weight", "contribution norm"):
    table.add_column(
      col, justify="right" if col in ("step", "weight", "contribution norm") else "left"
    )
  for m in result.rows:
    table.add_row(
      str(m.step) + (" (superseded)" if m.superseded else ""),
      m.example_id,
      m.group,
      m.route_class_name,
      f"{m.weight:.6g}",
      f"{m.contribution_norm:.6g}",
    )
  Console().print(table)
  shown = f" ({len(result.rows)} shown)" if len(result.rows) < result.count else ""
  click.echo(
    f"{result.count} (step, example, group) rows{shown}; "
    f"{len({m.example_id for m in result.rows})} distinct examples shown"
  )


def _query_refused(
  run_dir: str, step: int | None, example: str | None, include_superseded: bool, as_json: bool
) -> None:
  from aqgov.lineage._query import refusals

  rows = [
    f
    for f in refusals(run_dir, step=step, include_superseded=include_superseded)
    if example is None or f.example_id == example
  ]
  if as_json:
    for f in rows:
      click.echo(json.dumps(f._asdict()))
    return
  table = Table(
    title="examples refused at admission" + (f" at step {step}" if step is not None else "")
  )
  for col in ("step", "example", "reason"):
    table.add_column(col, justify="right" if col == "step" else "left")
  for f in rows:
    where = str(f.step) if f.taken else f"after {f.step} (no update)"
    table.add_row(where + (" (superseded)" if f.superseded else ""), f.example_id, f.reason)
  Console().print(table)
  click.echo(f"{len(rows)} refused example(s); none of them reached any group")


@lineage.command("index")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@_run_signing_key("The run key")
def index_cmd(run_dir: str, key_path: str | None, key_dir: str | None) -> None:
  """Build RUN/index/, the columnar index of the signed log that queries read, signed by the run key."""
  from aqgov.lineage._index import build_index

  payload = build_index(run_dir, _signing_key(run_dir, key_path, key_dir))
  click.echo(
    f"wrote {Path(run_dir) / 'index'}: {payload['rows']} rows, {payload['ids']} example ids, "
    f"covering signed head {payload['head']['id'][:16]}... ({payload['head']['size']} records)"
  )


def _num(v: float) -> str:
  return "-" if v != v else f"{v:.4g}"


@lineage.command("entropy")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
  "--json", "as_json", is_flag=True, help="One JSON object per line instead of a table."
)
def entropy_cmd(run_dir: str, as_json: bool) -> None:
  """Each group's entropy measurements over the steps, beside the profile's bounds."""
  from aqgov.lineage._views import entropy

  rows = entropy(run_dir)
  if as_json:
    for r in rows:
      click.echo(json.dumps(r._asdict()))
    return
  if not rows:
    click.echo("none (the run recorded no entropy measurement)")
    return
  table = Table(title="entropy per group and metric (mean over heads, per step)")
  table.add_column("group", no_wrap=True)
  table.add_column("metric", no_wrap=True)
  for col in ("steps", "min", "mean", "max", "last"):
    table.add_column(col, justify="right")
  table.add_column("bounds (profile)")
  table.add_column("out of bounds", justify="right")
  for r in rows:
    table.add_row(
      r.group,
      r.metric,
      str(r.steps),
      *(_num(v) for v in (r.minimum, r.mean, r.maximum, r.last)),
      "\n".join(r.bounds) or "-",
      f"{r.out_of_bounds} step(s)" + (f": {', '.join(r.actions)}" if r.actions else ""),
    )
  Console().print(table)


@lineage.command("events")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
  "--json", "as_json", is_flag=True, help="One JSON object per line instead of a table."
)
def events_cmd(run_dir: str, as_json: bool) -> None:
  """Governance events with their steps: out-of-bounds measurements, host events, escalations
  (and whether an override resolved them) and overrides."""
  from aqgov.lineage._views import events

  rows = events(run_dir)
  if as_json:
    for r in rows:
      click.echo(json.dumps(r._asdict()))
    return
  if not rows:
    click.echo("none")
    return
  table = Table(title="governance events")
  for col in ("step", "record", "kind", "group", "detail", "action"):
    table.add_column(col, justify="right" if col in ("step", "record") else "left")
  for r in rows:
    action = r.action or "-"
    if r.resolved is not None:
      action += " (resolved by override)" if r.resolved else " (unresolved)"
    table.add_row(str(r.step), str(r.record), r.kind, r.group or "-", r.detail, action)
  Console().print(table)


def _step_range(value: str | None) -> tuple[int, int] | None:
  if value is None:
    return None
  a, sep, b = value.partition(":")
  try:
    lo = int(a) if a else 1
    hi = int(b) if b else 2**62
  except ValueError:
    raise click.UsageError(
      f"--steps {value!r} is not A:B (step numbers, either may be empty)"
    ) from None
  if not sep or lo > hi:
    raise click.UsageError(f"--steps {value!r} is not A:B with A <= B")
  return lo, hi


@lineage.command("attribute")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@_MORE_KEYS
@click.option(
  "--probe",
  required=True,
  type=click.Path(exists=True, dir_okay=False),
  help="The examples whose behaviour to explain (JSONL: id, content).",
)
@click.option("--group", "groups", multiple=True, help="Score only this group (repeatable).")
@click.option("--steps", default=None, help="Only steps A:B (inclusive; either end may be empty).")
@click.option("--top", type=int, default=10, show_default=True, help="Keys listed per probe.")
@click.option(
  "--by",
  type=click.Choice(["example", "source", "label"]),
  default="example",
  show_default=True,
  help="Score training examples, their credentialed source, or their route class.",
)
@click.option(
  "--data",
  type=click.Path(exists=True, dir_okay=False),
  default=None,
  help="Training examples (JSONL); needed only for a run without sketches (TracIn over checkpoints).",
)
@click.option(
  "--method",
  type=click.Choice(["sketches", "checkpoints"]),
  default=None,
  help="Default: sketches when every step in range recorded them.",
)
@_IMPORT_TRUST
@click.option(
  "--task",
  "task_ref",
  default=None,
  help="The task factory to import (module:attr); it must be the one run-start recorded.",
)
@click.option(
  "--key",
  "key_path",
  type=click.Path(exists=True, dir_okay=False),
  default=None,
  help="Sign the result with this (governance or authority) key.",
)
@click.option(
  "--out",
  type=click.Path(dir_okay=False),
  default=None,
  help="Write the signed result document here (with --key).",
)
@click.option(
  "--normalize",
  is_flag=True,
  help="Cosine TracIn: divide each step's inner product by both sketches' norms.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def attribute_cmd(
  run_dir: str,
  more_keys: tuple[str, ...],
  probe: str,
  groups: tuple[str, ...],
  steps: str | None,
  top: int,
  by: str,
  data: str | None,
  method: str | None,
  trust: tuple[str, ...],
  run_key: str | None,
  task_ref: str | None,
  key_path: str | None,
  out: str | None,
  normalize: bool,
  as_json: bool,
) -> None:
  """Which training examples shaped the probe's behaviour, per group (TracIn from the run's sketches)."""
  from aqgov.documents._document_type import sign, write
  from aqgov.lineage._attribute import ATTRIBUTION, attribute

  if out is not None and key_path is None:
    raise click.UsageError("--out writes the signed result: give the signing key with --key")
  keys = _trust(run_dir, trust + more_keys, run_key)
  with progress_bar("attributing per checkpoint") as progress:
    result = attribute(
      run_dir,
      probe,
      trust=keys,
      task=task_ref,
      group=groups or None,
      steps=_step_range(steps),
      top=top,
      by=by,
      examples=data,
      method=method,
      normalize=normalize,
      progress=progress,
    )
  signed = None
  if key_path is not None:
    signed = sign(ATTRIBUTION, result, keylib.load_signing_key(key_path))
    if out is not None:
      write(ATTRIBUTION, signed, out)
  if as_json:
    doc = result.to_payload()
    if signed is not None:
      doc = {"result": doc, "id": signed.id}
    click.echo(json.dumps(doc, indent=2))
    return
  console = Console()
  for (probe_id, _), scores in zip(result.probes, result.scores):
    table = Table(
      title=f"probe {probe_id}: {result.method}{', cosine' if result.normalized else ''}, groups {', '.join(result.groups)}, "
      f"steps {result.steps[0]}..{result.steps[1]}"
    )
    table.add_column("#", justify="right")
    table.add_column(result.by)
    table.add_column("score", justify="right")
    for g in result.run_groups:
      table.add_column(g, justify="right")
    for rank, s in enumerate(scores, 1):
      table.add_row(str(rank), s.key, f"{s.score:.4g}", *(f"{v:.3g}" for v in s.groups))
    console.print(table)
  click.echo(
    f"computed against signed head {result.head_size} / {result.head_root[:16]}... of run "
    f"{result.run_id}" + (f"; signed result written to {out}" if out else "")
  )
