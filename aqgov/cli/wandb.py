"""`aqgov wandb`: check what a Weights & Biases run logged against the signed lineage."""

from __future__ import annotations

import click


@click.group()
def wandb() -> None:
  """Weights & Biases runs of governed training."""


@wandb.command("check")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
  "--wandb-dir",
  required=True,
  type=click.Path(exists=True),
  help="The offline W&B run directory (wandb/offline-run-...), its .wandb file, or a WANDB_DIR (its "
  "latest run is checked).",
)
def check_cmd(run_dir: str, wandb_dir: str) -> None:
  """Check every lineage root, record hash and signed head id the W&B run logged, and its policy ids,
  against RUN_DIR's lineage (verify the lineage itself with `aqgov lineage verify`)."""
  from aqgov.integrations.wandb import check_logged

  counts = check_logged(run_dir, wandb_dir)
  click.echo(
    f"OK {counts['rows']} logged step(s) match the lineage of {run_dir} ({counts['heads']} signed head "
    f"id(s) checked, {counts['records']} records)"
  )
