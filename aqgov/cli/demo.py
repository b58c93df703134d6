"""`aqgov demo`: the main job on the embedded sample data."""

from __future__ import annotations

import click


@click.command()
@click.option(
  "--out",
  "out_dir",
  default="demo-out",
  show_default=True,
  type=click.Path(file_okay=False),
  help="Empty (or new) directory for keys, manifests, policies, lineage and checkpoints.",
)
@click.option(
  "--steps", default=20, show_default=True, type=click.IntRange(1), help="Training steps."
)
@click.option("--seed", default=0, show_default=True, type=int)
def demo(out_dir: str, steps: int, seed: int) -> None:
  """Governed training on the sample data: credentials -> admission -> routed, bounded, recorded steps."""
  from aqgov.examples import demo as demo_lib

  try:
    demo_lib.run(out_dir, steps=steps, seed=seed)
  except FileExistsError as exc:
    raise click.UsageError(str(exc)) from None
