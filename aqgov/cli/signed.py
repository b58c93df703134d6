"""`sign` and `verify` subcommands shared by every kind of signed governance document."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import click

from aqgov.documents import _keys as keylib
from aqgov.errors import SignatureError
from aqgov.documents._keys import TrustStore
from aqgov.documents._signing import SignedDocument


class DocumentKind(NamedTuple):
  """How one kind of signed document is read, parsed, signed, verified and written."""

  noun: str                                              # "policy", "entropy profile"
  from_toml: Callable[[str], Any]                        # TOML path -> document object
  read_signed: Callable[[str], SignedDocument]
  write_signed: Callable[[SignedDocument, str], Any]
  sign: Callable[[Any, keylib.SigningKey], SignedDocument]
  verify: Callable[..., Any]                             # (signed, trust, min_signers=) -> document object


def _read_signable(kind: DocumentKind, path: str) -> Any:
  """A signed file as it is (to add a signature), or the document from TOML."""
  try:
    return kind.read_signed(path)
  except SignatureError:
    return kind.from_toml(path)


def add_sign_and_verify(group: click.Group, kind: DocumentKind) -> None:
  """Register `group sign DOC --key K --out F` and `group verify F --trust P [...]`."""

  @group.command("sign")
  @click.argument("doc_path", type=click.Path(exists=True, dir_okay=False))
  @click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False), help="The signer's private .key.")
  @click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Signed file to write.")
  def sign(doc_path: str, key_path: str, out_path: str) -> None:
    """Sign DOC (TOML, or an already signed file, which gains another signer) into OUT."""
    signed = kind.sign(_read_signable(kind, doc_path), keylib.load_signing_key(key_path))
    kind.write_signed(signed, out_path)
    click.echo(f"signed {out_path}: {kind.noun} {signed.payload.get('name')!r} id {signed.id}")
    click.echo(f"  signers: {', '.join(s.signer for s in signed.signatures)}")

  @group.command("verify")
  @click.argument("signed_path", type=click.Path(exists=True, dir_okay=False))
  @click.option("--trust", "trust_paths", multiple=True, required=True, type=click.Path(dir_okay=False),
                help="A trusted signer's .pub (repeatable).")
  @click.option("--min-signers", default=1, show_default=True, type=click.IntRange(min=1),
                help="How many trusted signatures are required.")
  def verify(signed_path: str, trust_paths: tuple[str, ...], min_signers: int) -> None:
    """Verify SIGNED's signatures against the trusted keys; exit 1 unless enough verify."""
    signed = kind.read_signed(signed_path)
    trust = TrustStore.from_paths(trust_paths)
    doc = kind.verify(signed, trust, min_signers=min_signers)
    names = [trust.get(s.key_id).name for s in signed.signatures if s.key_id in trust]
    click.echo(f"ok {signed_path}: {kind.noun} {doc.name!r} id {doc.id}")
    click.echo(f"  signed by {', '.join(names)} ({len(names)} trusted, {min_signers} required)")
