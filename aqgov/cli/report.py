"""`aqgov report`: the audit report of a run as one self-contained HTML file."""

from __future__ import annotations

import click

from aqgov.cli.lineage import _MORE_KEYS, _parent_dirs, _trust, verify_options
from aqgov.errors import LineageError
from aqgov.lineage._progress import progress_bar


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@_MORE_KEYS
@click.option(
  "-o",
  "--out",
  "out",
  default="report.html",
  show_default=True,
  type=click.Path(dir_okay=False),
  help="Write the HTML report here.",
)
@verify_options
@click.option(
  "--attestation",
  type=click.Path(exists=True, dir_okay=False),
  default=None,
  help="The run's attestation (`aqgov lineage export --intoto`): its digest and subjects are shown.",
)
def report(
  run_dir: str,
  more_keys: tuple[str, ...],
  out: str,
  trust: tuple[str, ...],
  run_key: str | None,
  parent_dir: tuple[str, ...],
  allow_open: bool,
  allow_missing: bool,
  witnesses: tuple[str, ...],
  attestation: str | None,
) -> None:
  """Write the audit report of RUN_DIR: verification (with the same trust options as `aqgov lineage
  verify`), routing, reach, entropy and events, admission refusals, checkpoints and the attestation."""
  from aqgov.report import write_report

  with progress_bar("verifying records") as progress:
    data = write_report(
      run_dir,
      out,
      _trust(run_dir, trust + more_keys, run_key),
      attestation=attestation,
      parent_dirs=_parent_dirs(parent_dir),
      require_closed=not allow_open,
      require_references=not allow_missing,
      witnesses=witnesses,
      progress=progress,
    )
  if data.verification.error:
    raise LineageError(
      f"wrote {out}, which shows that the run does NOT verify: {data.verification.error}"
    )
  click.echo(
    f"wrote {out}: run {data.description.run_id} verified ({data.verification.report.size} records)"
  )
