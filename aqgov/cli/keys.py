"""`aqgov keys`: create Ed25519 authority keys."""

from __future__ import annotations

import click

from aqgov.documents import _keys as keylib


@click.group()
def keys() -> None:
  """Create and inspect Ed25519 keys."""


@keys.command("new")
@click.argument("name")
@click.option(
  "--out",
  "out_dir",
  required=True,
  type=click.Path(file_okay=False),
  help="Directory for NAME.key and NAME.pub.",
)
@click.option(
  "--role",
  "roles",
  multiple=True,
  type=click.Choice(keylib.ROLES),
  help="What the key may sign (repeatable; default: authority, or run for a key named 'run').",
)
def new(name: str, out_dir: str, roles: tuple[str, ...]) -> None:
  """Write OUT/NAME.key (private, mode 0600) and OUT/NAME.pub (0644); refuses existing files and symlinks."""
  key = keylib.generate(name, roles=roles)
  key_path, pub_path = keylib.write_keypair(key, out_dir)
  click.echo(f"wrote {pub_path} (key id {key.key_id}) and private key {key_path} (mode 0600)")


@keys.command("id")
@click.argument("pub", type=click.Path(dir_okay=False))
def show_id(pub: str) -> None:
  """Print the key id (SHA-256 of the public key) of PUB."""
  click.echo(keylib.load_public_key(pub).key_id)


@keys.command("fingerprint")
@click.argument("pub", type=click.Path(exists=True, dir_okay=False))
def fingerprint(pub: str) -> None:
  """Print PUB's key id, name and roles: hand the id over out of band, so others can check the key they get."""
  key = keylib.load_public_key(pub)
  click.echo(f"{key.key_id}  {key.name} ({', '.join(keylib.key_roles(key.name, key.roles))})")
