"""`aqgov gate`: check deployment requirements against a verified lineage, and attest the outcome."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from aqgov.cli.lineage import _MORE_KEYS, _RUN_KEY, _parent_dirs, _trust
from aqgov.documents import _keys as keylib
from aqgov.errors import GateError, PolicyError, TaxonomyError


@click.command("gate")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@_MORE_KEYS
@click.option(
  "--trust",
  multiple=True,
  type=click.Path(exists=True, dir_okay=False),
  help="A trusted public key (.pub), obtained out of band: the run's authorities.",
)
@_RUN_KEY
@click.option(
  "--require",
  "requires",
  multiple=True,
  help='A requirement (repeatable), e.g. "no example where sensitivity_tier >= 2 reached core"; '
  "the grammar is in docs/lineage.md.",
)
@click.option(
  "--rules",
  type=click.Path(exists=True, dir_okay=False),
  default=None,
  help='A TOML rules file: require = ["...", ...] and an optional name.',
)
@click.option("--witness", "witnesses", multiple=True, help="A witness that must have cosigned.")
@click.option("--parent-dir", multiple=True, help="Directory of a parent run (or RUN_ID=DIR).")
@click.option(
  "--attest",
  "attest_out",
  type=click.Path(dir_okay=False),
  default=None,
  help="Write a signed Verification Summary Attestation (DSSE envelope) here.",
)
@click.option(
  "--key",
  "key_path",
  type=click.Path(exists=True, dir_okay=False),
  default=None,
  help="The key that signs the attestation (the run key or the gate operator's key).",
)
def gate(
  run_dir: str,
  more_keys: tuple[str, ...],
  trust: tuple[str, ...],
  run_key: str | None,
  requires: tuple[str, ...],
  rules: str | None,
  witnesses: tuple[str, ...],
  parent_dir: tuple[str, ...],
  attest_out: str | None,
  key_path: str | None,
) -> None:
  """Pass (exit 0) or fail (exit 1) a run against deployment requirements; exit 2 on bad input.

  The lineage is verified against the keys given first; every requirement rests on it."""
  from aqgov.lineage._gate import attest, evaluate, read_rules

  if attest_out is not None and key_path is None:
    raise click.UsageError("--attest needs --key, the key that signs the attestation")
  try:
    name, texts = ("aqgov-gate", []) if rules is None else read_rules(rules)
    texts = texts + list(requires)
    result = evaluate(
      run_dir,
      texts,
      _trust(run_dir, trust + more_keys, run_key),
      witnesses=witnesses,
      parent_dirs=_parent_dirs(parent_dir),
    )
  except (GateError, PolicyError, TaxonomyError) as exc:
    click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
    sys.exit(2)
  table = Table(title=f"gate {name} on {run_dir}")
  for col in ("requirement", "result", "detail"):
    table.add_column(col)
  for r in result.results:
    table.add_row(r.requirement, "[green]pass[/green]" if r.passed else "[red]FAIL[/red]", r.detail)
  Console().print(table)
  if result.error:
    click.echo(f"error: {result.error}", err=True)
  if attest_out is not None:
    if result.report is None:
      click.echo("no attestation written: the lineage did not verify", err=True)
    else:
      env = attest(run_dir, result, texts, keylib.load_signing_key(key_path), policy_name=name)
      Path(attest_out).write_text(json.dumps(env, indent=2) + "\n")
      click.echo(
        f"wrote {attest_out}: verification summary ({'PASSED' if result.passed else 'FAILED'})"
      )
  click.echo("PASS" if result.passed else "FAIL")
  sys.exit(0 if result.passed else 1)
