"""`sign` and `verify` subcommands shared by every registered type of signed governance document."""

from __future__ import annotations

import click

from aqgov import documents
from aqgov.documents import _keys as keylib
from aqgov.documents._keys import TrustStore

# The keys a document is checked against, obtained out of band (never read from a directory).
TRUST_OPTION = click.option(
  "--trust",
  "trust_paths",
  multiple=True,
  required=True,
  type=click.Path(dir_okay=False),
  help="A trusted signer's .pub, obtained out of band (repeatable).",
)


def add_sign_and_verify(group: click.Group, type_name: str) -> None:
  """Register `group sign DOC --key K --out F` and `group verify F --trust P [...]` for a document type."""
  doc_type = documents.document_type(type_name)

  @group.command("sign")
  @click.argument("doc_path", type=click.Path(exists=True, dir_okay=False))
  @click.option(
    "--key",
    "key_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="The signer's private .key.",
  )
  @click.option(
    "--out",
    "out_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="Signed file to write.",
  )
  def sign(doc_path: str, key_path: str, out_path: str) -> None:
    """Sign DOC (TOML, or an already signed file, which gains another signer) into OUT."""
    signed = documents.sign(
      doc_type, documents.read_any(doc_type, doc_path), keylib.load_signing_key(key_path)
    )
    documents.write(doc_type, signed, out_path)
    click.echo(f"signed {out_path}: {doc_type.noun} {signed.payload.get('name')!r} id {signed.id}")
    click.echo(f"  signers: {', '.join(signed.signers)}")

  @group.command("verify")
  @click.argument("signed_path", type=click.Path(exists=True, dir_okay=False))
  @TRUST_OPTION
  @click.option(
    "--min-signers",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="How many trusted signatures are required.",
  )
  def verify(signed_path: str, trust_paths: tuple[str, ...], min_signers: int) -> None:
    """Verify SIGNED's signatures against the trusted keys; exit 1 unless enough verify."""
    signed = documents.read(doc_type, signed_path)
    trust = TrustStore.from_paths(trust_paths)
    doc = documents.verify(doc_type, signed, trust, min_signers=min_signers)
    names = [trust.get(s.key_id).name for s in signed.signatures if s.key_id in trust]
    click.echo(f"ok {signed_path}: {doc_type.noun} {doc.name!r} id {doc.id}")
    click.echo(f"  signed by {', '.join(names)} ({len(names)} trusted, {min_signers} required)")
