"""`aqgov credentials`: issue and verify credential manifests."""

from __future__ import annotations

import click

from aqgov import documents
from aqgov.cli.signed import TRUST_OPTION
from aqgov.credentials import _manifest as credlib
from aqgov.credentials._manifest import MANIFEST
from aqgov.credentials._taxonomy import Taxonomy
from aqgov.documents import _keys as keylib
from aqgov.documents._keys import TrustStore


@click.group()
def credentials() -> None:
  """Issue and verify signed credential manifests."""


@credentials.command("issue")
@click.option(
  "--key",
  "key_path",
  required=True,
  type=click.Path(dir_okay=False),
  help="The authority's private .key.",
)
@click.option(
  "--taxonomy",
  "taxonomy_path",
  required=True,
  type=click.Path(dir_okay=False),
  help="The authority's taxonomy TOML.",
)
@click.option(
  "--examples",
  "examples_path",
  required=True,
  type=click.Path(dir_okay=False),
  help="Examples JSONL.",
)
@click.option(
  "--out",
  "out_path",
  required=True,
  type=click.Path(dir_okay=False),
  help="Manifest file to write.",
)
def issue(key_path: str, taxonomy_path: str, examples_path: str, out_path: str) -> None:
  """Sign a manifest crediting the examples in EXAMPLES with their labels.

  Labels may be flat (one taxonomy) or keyed by authority; examples without labels for this
  authority are skipped and counted.
  """
  key = keylib.load_signing_key(key_path)
  taxonomy = Taxonomy.read(taxonomy_path)
  examples = credlib.read_examples(examples_path)
  manifest = credlib.issue_manifest(key, taxonomy, examples, skip_unlabelled=True)
  documents.write(MANIFEST, manifest.document, out_path)
  skipped = len(examples) - manifest.size
  click.echo(
    f"issued {out_path}: {manifest.size} credential(s) by {taxonomy.authority!r}"
    + (f", skipped {skipped} example(s) without {taxonomy.authority!r} labels" if skipped else "")
  )
  click.echo(f"  merkle root {manifest.root.hex()}")
  click.echo(f"  manifest id {manifest.id}")


@credentials.command("verify")
@click.argument("manifest_path", type=click.Path(dir_okay=False))
@TRUST_OPTION
@click.option(
  "--examples",
  "examples_path",
  type=click.Path(dir_okay=False),
  help="Examples JSONL whose content hashes must match the manifest.",
)
def verify(manifest_path: str, trust_paths: tuple[str, ...], examples_path: str | None) -> None:
  """Verify MANIFEST's signature, Merkle root, labels and (optionally) example hashes."""
  signed = documents.read(MANIFEST, manifest_path)
  trust = TrustStore.from_paths(trust_paths)
  examples = credlib.read_examples(examples_path) if examples_path else None
  manifest = documents.verify(MANIFEST, signed, trust)
  if examples is not None:
    credlib.check_examples(manifest, examples)
  signers = [trust.get(s.key_id).name for s in signed.signatures if s.key_id in trust]
  click.echo(
    f"ok {manifest_path}: {manifest.size} credential(s) by {manifest.authority!r}, "
    f"signed by {', '.join(signers)}"
  )
  click.echo(f"  merkle root {manifest.root.hex()}")
  click.echo(f"  taxonomy {manifest.taxonomy_id}")
  if examples is not None:
    checked = sum(credlib.expects_credential(ex, manifest.authority) for ex in examples)
    click.echo(
      f"  {checked} example(s) checked against their content hashes"
      + (
        f", {len(examples) - checked} without {manifest.authority!r} labels not expected"
        if checked < len(examples)
        else ""
      )
    )
