"""`aqgov profile` (sign, verify, identify entropy profiles) and `aqgov override` (signed overrides)."""

from __future__ import annotations

import click

from aqgov import documents
from aqgov.cli.signed import TRUST_OPTION, add_sign_and_verify
from aqgov.documents import _keys as keylib
from aqgov.documents._keys import TrustStore
from aqgov.entropy._overrides import OVERRIDE, Override, admit_override
from aqgov.entropy._profile import PROFILE


@click.group()
def profile() -> None:
  """Sign, verify and identify entropy profiles."""


add_sign_and_verify(profile, PROFILE.name)


@profile.command("id")
@click.argument("profile_path", type=click.Path(exists=True, dir_okay=False))
def show_id(profile_path: str) -> None:
  """Print PROFILE's id (SHA-256 of its canonical form); the same for its TOML and signed files."""
  click.echo(documents.load(PROFILE, profile_path).id)


@click.group()
def override() -> None:
  """Issue and verify signed overrides that admit named entropy-bound violations."""


@override.command("issue")
@click.option(
  "--key",
  "key_path",
  required=True,
  type=click.Path(dir_okay=False),
  help="The authority's private .key.",
)
@click.option("--run", "run_id", required=True, help="Id of the run the override applies to.")
@click.option(
  "--steps", required=True, help="Steps admitted, inclusive: '10-20', '37' or '3,7,9-12'."
)
@click.option("--groups", required=True, help="Parameter groups admitted, comma-separated.")
@click.option(
  "--metrics", required=True, help="Metrics admitted, comma-separated (e.g. attention_entropy)."
)
@click.option(
  "--reason", required=True, help="Why the violation is acceptable (kept in the lineage)."
)
@click.option(
  "--expires", required=True, help="Expiry, ISO 8601 with timezone, e.g. 2026-01-31T18:00:00Z."
)
@click.option(
  "--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Token file to write."
)
def issue(
  key_path: str,
  run_id: str,
  steps: str,
  groups: str,
  metrics: str,
  reason: str,
  expires: str,
  out_path: str,
) -> None:
  """Sign an override token admitting METRICS in GROUPS at STEPS of RUN."""
  key = keylib.load_signing_key(key_path)
  token = documents.sign(
    OVERRIDE,
    Override.create(
      run=run_id, steps=steps, groups=groups, metrics=metrics, reason=reason, expires=expires
    ),
    key,
  )
  documents.write(OVERRIDE, token, out_path)
  spans = ", ".join(f"{a}-{b - 1}" if b - a > 1 else str(a) for a, b in token.payload["steps"])
  click.echo(
    f"wrote {out_path}: override {token.id[:16]}... for run {run_id!r}, steps {spans}, "
    f"groups {', '.join(token.payload['groups'])}, metrics {', '.join(token.payload['metrics'])}, "
    f"expires {token.payload['expires']} (signed by {key.name})"
  )


@override.command("verify")
@click.argument("token_path", type=click.Path(exists=True, dir_okay=False))
@TRUST_OPTION
@click.option("--run", "run_id", required=True, help="Id of the run the override must name.")
def verify_token(token_path: str, trust_paths: tuple[str, ...], run_id: str) -> None:
  """Verify TOKEN (signature, trust, run, expiry); exit 1 if it is refused."""
  o = admit_override(
    documents.read(OVERRIDE, token_path), TrustStore.from_paths(trust_paths), run_id
  )
  click.echo(
    f"ok {token_path}: override {o.id[:16]}... by {', '.join(o.signers)} for run {o.run!r}, "
    f"groups {', '.join(o.groups)}, metrics {', '.join(o.metrics)}, expires {o.expires}: {o.reason}"
  )
