"""`aqgov policy`: sign, verify, explain and identify routing policies."""

from __future__ import annotations

import warnings

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from aqgov import documents
from aqgov.cli.signed import add_sign_and_verify
from aqgov.credentials._taxonomy import Taxonomy
from aqgov.policy import _compile as compiledlib
from aqgov.policy import _explain as explainlib
from aqgov.policy._policy import POLICY


@click.group()
def policy() -> None:
  """Sign, verify and explain routing policies."""


add_sign_and_verify(policy, POLICY.name)


@policy.command("explain")
@click.argument(
  "policy_paths", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False)
)
@click.option(
  "--params",
  "params_path",
  required=True,
  type=click.Path(exists=True, dir_okay=False),
  help="JSON shapes of the parameter tree: nested keys down to shape lists, e.g. "
  '{"blocks": {"0": {"kernel": [64, 256]}}}; a key may hold \'/\' for nesting.',
)
@click.option(
  "--taxonomy",
  "taxonomy_paths",
  multiple=True,
  type=click.Path(exists=True, dir_okay=False),
  help="Taxonomy TOML to type-check the rule conditions against (repeatable).",
)
def explain(
  policy_paths: tuple[str, ...], params_path: str, taxonomy_paths: tuple[str, ...]
) -> None:
  """Print the route class x group weight table of POLICY... (composed: most restrictive wins).

  Each POLICY is TOML or a signed file (signatures are not checked here: use `aqgov policy
  verify`). Warns about parameters no group covers: they get the policy's `uncovered` weight
  (0 unless the policy sets it), i.e. by default they are never trained.
  """
  policies = [documents.load(POLICY, p) for p in policy_paths]
  taxonomies = [Taxonomy.read(t) for t in taxonomy_paths] or None
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", compiledlib.UncoveredParametersWarning)
    bound = compiledlib.compile_policy(policies, explainlib.param_shapes(params_path), taxonomies)
  t = explainlib.explain_table(bound)
  name_width = max(len("route class"), *(len(name) for name, _ in t.rows))
  console = Console(width=max(100, name_width + 20 * len(t.columns) + 8))
  for p in policies:
    console.print(f"policy [bold]{p.name}[/bold] id {p.id}", highlight=False)
  table = Table(title="route class x group weights")
  table.add_column("route class", no_wrap=True, min_width=name_width)
  for g, n, s in zip(t.columns, t.leaves, t.sizes):
    table.add_column(escape(f"{g}\n{n} leaves\n{s:,} params"), justify="right")
  for (name, _), cells in zip(t.rows, t.cells()):
    table.add_row(name, *cells)
  console.print(table)
  for line in t.slices:
    console.print("slice " + escape(line), highlight=False)
  if taxonomies is None:
    console.print(
      "note: conditions were parsed but not type-checked; pass --taxonomy to check them",
      highlight=False,
    )
  for w in t.warnings:
    console.print(f"[yellow]warning:[/yellow] {w}", highlight=False)


@policy.command("id")
@click.argument("policy_path", type=click.Path(exists=True, dir_okay=False))
def show_id(policy_path: str) -> None:
  """Print POLICY's id (SHA-256 of its canonical form); the same for its TOML and signed files."""
  click.echo(documents.load(POLICY, policy_path).id)
