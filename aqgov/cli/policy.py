"""`aqgov policy`: sign, verify, explain and identify routing policies."""

from __future__ import annotations

import warnings

import click
from rich.console import Console
from rich.table import Table

from aqgov import compiled as compiledlib
from aqgov import keys as keylib
from aqgov import policy as policylib
from aqgov.errors import SignatureError
from aqgov.keys import TrustStore
from aqgov.signing import SignedDocument
from aqgov.taxonomy import Taxonomy


@click.group()
def policy() -> None:
  """Sign, verify and explain routing policies."""


def _read_signable(path: str) -> policylib.Policy | SignedDocument:
  """A signed policy as it is (to add a signature), or a policy from TOML."""
  try:
    return policylib.read_signed_policy(path)
  except SignatureError:
    return policylib.Policy.from_toml(path)


@policy.command("sign")
@click.argument("policy_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False), help="The signer's private .key.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Signed policy file to write.")
def sign(policy_path: str, key_path: str, out_path: str) -> None:
  """Sign POLICY (TOML, or an already signed file, which gains another signer) into OUT."""
  key = keylib.load_signing_key(key_path)
  signed = policylib.sign_policy(_read_signable(policy_path), key)
  policylib.write_signed_policy(signed, out_path)
  pol = policylib.Policy.from_dict(signed.payload)
  click.echo(f"signed {out_path}: policy {pol.name!r} id {signed.id}")
  click.echo(f"  signers: {', '.join(policylib.signers(signed))}")


@policy.command("verify")
@click.argument("signed_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--trust", "trust_paths", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="A trusted signer's .pub (repeatable).")
@click.option("--min-signers", default=1, show_default=True, type=click.IntRange(min=1),
              help="How many trusted signatures are required.")
def verify(signed_path: str, trust_paths: tuple[str, ...], min_signers: int) -> None:
  """Verify SIGNED's signatures against the trusted keys; exit 1 unless enough verify."""
  signed = policylib.read_signed_policy(signed_path)
  trust = TrustStore.from_paths(trust_paths)
  pol = policylib.verify_policy(signed, trust, min_signers=min_signers)
  names = [trust.get(s.key_id).name for s in signed.signatures if s.key_id in trust]
  click.echo(f"ok {signed_path}: policy {pol.name!r} id {pol.id}")
  click.echo(f"  signed by {', '.join(names)} ({len(names)} trusted, {min_signers} required)")


@policy.command("explain")
@click.argument("policy_paths", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--params", "params_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="JSON shapes of the parameter tree: nested keys down to shape lists, e.g. "
                   "{\"blocks\": {\"0\": {\"kernel\": [64, 256]}}}; a key may hold '/' for nesting.")
@click.option("--taxonomy", "taxonomy_paths", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Taxonomy TOML to type-check the rule conditions against (repeatable).")
def explain(policy_paths: tuple[str, ...], params_path: str, taxonomy_paths: tuple[str, ...]) -> None:
  """Print the route class x group weight table of POLICY... (composed: most restrictive wins).

  Each POLICY is TOML or a signed file (signatures are not checked here: use `aqgov policy
  verify`). Warns about parameters no group covers: they get the policy's `uncovered` weight
  (0 unless the policy sets it), i.e. by default they are never trained.
  """
  policies = [policylib.read_policy(p) for p in policy_paths]
  taxonomies = [Taxonomy.from_toml(t) for t in taxonomy_paths] or None
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", compiledlib.UncoveredParametersWarning)
    bound = compiledlib.compile_policy(policies, compiledlib.param_shapes(params_path), taxonomies)
  t = compiledlib.explain_table(bound)
  name_width = max(len("route class"), *(len(name) for name, _ in t.rows))
  console = Console(width=max(100, name_width + 20 * len(t.columns) + 8))
  for p in policies:
    console.print(f"policy [bold]{p.name}[/bold] id {p.id}", highlight=False)
  table = Table(title="route class x group weights")
  table.add_column("route class", no_wrap=True, min_width=name_width)
  for g, n, s in zip(t.columns, t.leaves, t.sizes):
    table.add_column(f"{g}\n{n} leaves\n{s:,} params", justify="right")
  for name, ws in t.rows:
    table.add_row(name, *[f"{w:g}" for w in ws])
  console.print(table)
  if taxonomies is None:
    console.print("note: conditions were parsed but not type-checked; pass --taxonomy to check them", highlight=False)
  for w in t.warnings:
    console.print(f"[yellow]warning:[/yellow] {w}", highlight=False)


@policy.command("id")
@click.argument("policy_path", type=click.Path(exists=True, dir_okay=False))
def show_id(policy_path: str) -> None:
  """Print POLICY's id (SHA-256 of its canonical form); the same for its TOML and signed files."""
  click.echo(policylib.read_policy(policy_path).id)
