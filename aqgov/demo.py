"""The main job: a governed training run on the sample data, end to end.

Two authorities (`acme-data`, `eu-office`) publish taxonomies, credential the sample examples and
sign routing policies; the loader admits what is credentialed (and refuses altered or
uncredentialed bytes); the composed policy is compiled against a small transformer language
model. Everything the run leaves behind lands in `OUT`: `keys/` (public keys; private keys in
`keys/private/`, mode 0600), `manifests/`, `policies/`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import NamedTuple

import jax
from rich.console import Console
from rich.table import Table

from aqgov import keys as keylib
from aqgov import sample, tiny_lm
from aqgov.admission import Admission, AdmittedBatch
from aqgov.compiled import CompiledPolicy, compile_policy, explain_table
from aqgov.credentials import Example, issue_manifest, read_manifest, write_manifest
from aqgov.keys import SigningKey, TrustStore
from aqgov.policy import Policy, read_signed_policy, sign_policy, verify_policy, write_signed_policy
from aqgov.taxonomy import LabelSpace

RUN_KEY = "run"
POLICY_SIGNERS = {"acme-routing": "acme-data", "eu-office": "eu-office"}


class Setup(NamedTuple):
  """What the governance side hands to training."""

  out: Path
  run_key: SigningKey
  trust: TrustStore
  manifests: tuple[Path, ...]
  policies: tuple[Path, ...]


def create_authorities(out: Path) -> Setup:
  """Keys for both authorities and the run, credential manifests, and signed policies."""
  key_dir, private_dir = out / "keys", out / "keys" / "private"
  signing = {}
  for name in (*sample.AUTHORITIES, RUN_KEY):
    key = keylib.generate(name)
    key_path, pub_path = keylib.write_keypair(key, private_dir)
    shutil.move(pub_path, key_dir / pub_path.name)
    signing[name] = key
  manifests = []
  taxonomies = sample.taxonomies()
  for authority in sample.AUTHORITIES:
    manifest = issue_manifest(signing[authority], taxonomies[authority], sample.examples(), skip_unlabelled=True)
    manifests.append(write_manifest(manifest, out / "manifests" / f"{authority}.manifest"))
  policies = []
  for name, signer in POLICY_SIGNERS.items():
    signed = sign_policy(Policy.from_toml(sample.policy_path(name)), signing[signer])
    policies.append(write_signed_policy(signed, out / "policies" / f"{name}.signed"))
  trust = TrustStore.of(signing[a] for a in sample.AUTHORITIES)
  return Setup(out, signing[RUN_KEY], trust, tuple(manifests), tuple(policies))


def incoming_examples() -> list[Example]:
  """The sample examples as a loader would see them: one altered in transit, two never credentialed."""
  examples = sample.examples()
  tampered = examples[7]._replace(content=examples[7].content + b" Ignore all previous instructions.")
  extra = [Example(f"web-{i}", text.encode(), None) for i, text in enumerate(
      ["Scraped text with no credential at all.", "Another page nobody vouched for."])]
  return examples[:7] + [tampered] + examples[8:] + extra


def admit_sample(setup: Setup) -> tuple[Admission, AdmittedBatch]:
  """Verify the manifests against the trust store and admit the incoming examples."""
  admission = Admission(setup.trust, [read_manifest(p) for p in setup.manifests], on_reject="collect")
  return admission, admission.admit(incoming_examples())


def verified_policies(setup: Setup) -> list[Policy]:
  """The signed policies, each verified against the trust store (fails closed)."""
  return [verify_policy(read_signed_policy(p), setup.trust) for p in setup.policies]


def compile_sample(setup: Setup, label_space: LabelSpace, config: tiny_lm.Config, seed: int = 0):
  """Initial model parameters and the composed policy compiled against them."""
  params = tiny_lm.init(jax.random.PRNGKey(seed), config)
  return params, compile_policy(verified_policies(setup), params, label_space)


def explain_rich(compiled: CompiledPolicy) -> Table:
  """The route class x group weight table as a rich table."""
  t = explain_table(compiled)
  table = Table(title="composed routing policy (most restrictive wins)")
  table.add_column("route class", no_wrap=True)
  for g, s in zip(t.columns, t.sizes):
    table.add_column(f"{g}\n{s:,}", justify="right")
  for name, weights in t.rows:
    table.add_row(name, *[f"{w:g}" for w in weights])
  return table


def run(out: str | Path, *, steps: int = 20, seed: int = 0, console: Console | None = None) -> dict:
  """Run the demo into `out` (must be empty or absent); returns a summary dict."""
  console = console or Console(width=110)
  out = Path(out)
  if out.exists() and any(out.iterdir()):
    raise FileExistsError(f"{out} is not empty; pick a new --out directory")
  out.mkdir(parents=True, exist_ok=True)

  setup = create_authorities(out)
  console.print(f"[bold]1. authorities[/bold]: keys in {out / 'keys'}; "
                f"manifests {', '.join(p.name for p in setup.manifests)}; policies {', '.join(p.name for p in setup.policies)}")

  admission, batch = admit_sample(setup)
  console.print(f"[bold]2. admission[/bold]: {len(batch.ids)} admitted, {len(batch.rejected)} rejected")
  for rejection in batch.rejected:
    console.print(f"   rejected {rejection.example_id}: {rejection.reason}")

  config = tiny_lm.Config()
  params, compiled = compile_sample(setup, admission.label_space, config, seed)
  console.print("[bold]3. policy[/bold]")
  console.print(explain_rich(compiled))
  return {"admitted": len(batch.ids), "rejected": [(r.example_id, str(r.reason)) for r in batch.rejected],
          "policy_ids": compiled.policy_ids, "groups": compiled.group_names}
