"""The main job: a governed training run on the sample data, end to end.

Two authorities (`acme-data`, `eu-office`) publish taxonomies, credential the sample examples and
sign routing policies; `acme-data` also signs the entropy profile. The loader admits what is
credentialed (and refuses altered or uncredentialed bytes); the composed policy is compiled
against a small transformer language model (`aqgov.examples.tiny_lm`), and every step is routed, bounded
by the profile and recorded in a signed lineage. `OUT` is the run directory, what an auditor
receives (see `aqgov.lineage.run`): `keys/*.pub` (copies of the authorities' and the run's public
keys, for reference), `policies/`, `profiles/`, `manifests/`, `lineage/`, `checkpoints/`. No private
key is in it: the keys directory beside it, `OUT-keys/` (mode 0700), holds `authorities/` (the
authorities' key pairs and the documents they signed) and `run/` (the run key pair). The auditor
takes the public keys from there, standing in for keys handed over out of band.
"""

from __future__ import annotations

import collections
import itertools
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from rich.console import Console
from rich.table import Table

from aqgov.credentials._admission import Admission
from aqgov.credentials._loader import governed_batches
from aqgov.credentials._manifest import MANIFEST, Example, issue_manifest
from aqgov.documents import _keys as keylib
from aqgov.documents._document_type import read, sign, write
from aqgov.documents._files import make_private_dir
from aqgov.documents._keys import SigningKey, TrustStore
from aqgov.entropy._enforce import decode_events
from aqgov.entropy._profile import PROFILE, EntropyProfile
from aqgov.errors import GovernanceEscalation
from aqgov.examples import efficacy as efficacy
from aqgov.examples import sample as sample
from aqgov.lineage import GovernedRun, progress_bar, query, verify_lineage
from aqgov.policy._compile import CompiledPolicy
from aqgov.policy._explain import explain_table
from aqgov.policy._policy import POLICY, Policy

PROFILE_SIGNER = "acme-data"
POLICY_SIGNERS = {"acme-routing": "acme-data", "eu-office": "eu-office"}
TASK = "aqgov.examples.tiny_lm:make_task"


class Authorities(NamedTuple):
  """What the governance side hands to training: trusted keys and the documents they signed."""

  root: Path
  keys: dict[str, SigningKey]
  manifests: tuple[Path, ...]
  policies: tuple[Path, ...]
  profile: Path

  @property
  def trust(self) -> TrustStore:
    return TrustStore.of(self.keys.values())

  @property
  def public_keys(self) -> list[Path]:
    return sorted((self.root / "keys").glob("*.pub"))

  def moved_to(self, root: Path) -> Authorities:
    """The same authorities after their directory was copied to `root`."""
    re = lambda p: root / p.relative_to(self.root)  # noqa: E731
    return self._replace(
      root=root,
      manifests=tuple(map(re, self.manifests)),
      policies=tuple(map(re, self.policies)),
      profile=re(self.profile),
    )


def create_authorities(root: Path) -> Authorities:
  """Both authorities' keys, their credential manifests, signed policies and the signed profile."""
  signing = {}
  for name in sample.AUTHORITIES:
    signing[name] = keylib.generate(name)
    keylib.write_keypair(signing[name], root / "keys")
  manifests = []
  taxonomies = sample.taxonomies()
  for authority in sample.AUTHORITIES:
    manifest = issue_manifest(
      signing[authority], taxonomies[authority], sample.examples(), skip_unlabelled=True
    )
    manifests.append(
      write(MANIFEST, manifest.document, root / "manifests" / f"{authority}.manifest")
    )
  policies = []
  for name, signer in POLICY_SIGNERS.items():
    signed = sign(POLICY, Policy.read(sample.policy_path(name)), signing[signer])
    policies.append(write(POLICY, signed, root / "policies" / f"{name}.signed"))
  profile = write(
    PROFILE,
    sign(PROFILE, EntropyProfile.read(sample.profile_path()), signing[PROFILE_SIGNER]),
    root / "profiles" / "demo-profile.signed",
  )
  return Authorities(root, signing, tuple(manifests), tuple(policies), profile)


def incoming_examples() -> list[Example]:
  """The sample examples as a loader would see them: one altered in transit, two never credentialed."""
  examples = sample.examples()
  tampered = examples[7]._replace(
    content=examples[7].content + b" Ignore all previous instructions."
  )
  extra = [
    Example(f"web-{i}", text.encode(), None)
    for i, text in enumerate(
      ["Scraped text with no credential at all.", "Another page nobody vouched for."]
    )
  ]
  return examples[:7] + [tampered] + examples[8:] + extra


def explain_rich(compiled: CompiledPolicy, reached: np.ndarray | None = None) -> Table:
  """The route class x group weight table; with `reached` [C], how many examples took each class."""
  t = explain_table(compiled)
  table = Table(title="composed routing policy (most restrictive wins)")
  table.add_column("route class", no_wrap=True)
  for g, s in zip(t.columns, t.sizes):
    table.add_column(f"{g}\n{s:,}", justify="right")
  if reached is not None:
    table.add_column("examples\ntrained", justify="right")
  for c, ((name, _), cells) in enumerate(zip(t.rows, t.cells())):
    extra = [f"{int(reached[c])}"] if reached is not None else []
    table.add_row(name, *cells, *extra)
  return table


def train(
  run: GovernedRun, batches, steps: int, console: Console
) -> tuple[np.ndarray, list, str | None]:
  """Run `steps` governed steps; route-class counts, governance events and any escalation message."""
  task = run.task
  reached = np.zeros(len(task.compiled.class_names), np.int64)
  events, last_kinds = [], set()
  try:
    with progress_bar("training", console) as progress:
      for done in range(steps):
        progress(done, steps)
        batch = next(batches)
        s = jax.device_get(
          run.step([Example(i, c, None) for i, c in zip(batch.ids, batch.content)])
        )
        np.add.at(reached, np.asarray(s.route_class), 1)
        step_events = decode_events(s.events, task.profile, task.compiled)
        events += step_events
        kinds = {(e.group, e.metric, e.action) for e in step_events}
        if int(s.step) % 5 == 0 or kinds != last_kinds:
          console.print(
            f"   step {int(s.step):3d}  loss {float(s.loss):.3f}"
            + "".join(f"\n     event: {e.describe()}" for e in step_events if kinds != last_kinds)
          )
        last_kinds = kinds
  except GovernanceEscalation as exc:
    console.print(f"[red]   escalation[/red]: {exc}")
    run.abandon()
    return reached, events, str(exc)
  run.close()
  return reached, events, None


def no_update_claims(out: Path, group: str) -> list[str]:
  """What the step records of `out` show for each window of steps in which `group` got no update
  (frozen by a reroute to 0, or paused): effective weights and the group's fingerprint."""
  from aqgov.lineage import _record as rec
  from aqgov.lineage._segments import records

  ldir = out / "lineage"
  views = [rec.view_step(b, i) for i, _, b in records(ldir, kinds=(rec.STEP,))]
  groups = list(next(iter(records(ldir, kinds=(rec.RUN_START,))))[2]["groups"])
  g = groups.index(group)
  claims, t = [], 0
  while t < len(views):
    if views[t].applied_scale[g] != 0:
      t += 1
      continue
    end = t
    while end + 1 < len(views) and views[end + 1].applied_scale[g] == 0:
      end += 1
    window = views[max(t - 1, 0) : end + 1]  # the record before holds the fingerprint it keeps
    admitted = sum(int((v.weights[:, g] > 0).sum()) for v in views[t : end + 1])
    applied = sum(int((v.applied_weights[:, g] > 0).sum()) for v in views[t : end + 1])
    same = all(np.array_equal(window[0].fingerprint[g], v.fingerprint[g]) for v in window)
    claims.append(
      f"{group} got no update at steps {views[t].step}-{views[end].step}: its records show "
      f"effective weight 0 for {admitted - applied} of {admitted} policy-admitted examples and its "
      f"fingerprint {'unchanged' if same else 'CHANGED'}"
    )
    t = end + 1
  return claims


def claims_table(rows: Sequence[tuple[str, str]]) -> Table:
  """The governance claims the demo measured, one row each: the claim and what the run showed."""
  table = Table(title="governance claims, as measured in this run")
  table.add_column("claim")
  table.add_column("measured")
  for claim, measured in rows:
    table.add_row(claim, measured)
  return table


def _run_key_id(out: Path) -> str:
  from aqgov.lineage import LogReader

  return next(iter(LogReader(out / "lineage"))).body["signer"]


def reaching_classes(compiled: CompiledPolicy, reached: np.ndarray) -> dict[str, list[str]]:
  """Per group, the route classes that trained examples took and that give the group a positive weight."""
  return {
    name: [compiled.class_names[c] for c in np.flatnonzero(reached) if compiled.table[c, g] > 0]
    for g, name in enumerate(compiled.group_names)
  }


def keys_dir_of(out: str | Path) -> Path:
  """The demo's keys directory for run directory `out`: `OUT-keys/` beside it."""
  out = Path(out)
  return out.with_name(out.name + "-keys")


def run(
  out: str | Path,
  *,
  steps: int = 20,
  batch_size: int = 16,
  seed: int = 0,
  console: Console | None = None,
) -> dict:
  """Run the demo into `out` and `OUT-keys/` (both must be empty or absent); returns a summary dict."""
  console = console or Console(width=110)
  out = Path(out)
  keys = keys_dir_of(out)
  for d in (out, keys):
    if d.exists() and any(d.iterdir()):
      raise FileExistsError(f"{d} is not empty; pick a new --out directory")

  with tempfile.TemporaryDirectory() as staging:
    auth = create_authorities(Path(staging) / "authorities")
    make_private_dir(keys)
    shutil.copytree(auth.root, keys / "authorities")
    auth = auth.moved_to(keys / "authorities")
  run = GovernedRun.start(
    out,
    task=TASK,
    task_config={"seed": seed, "learning_rate": 3e-3, "sketch_dim": 64},
    policies=auth.policies,
    profiles=[auth.profile],
    manifests=auth.manifests,
    trust=auth.public_keys,
    checkpoint_every=max(steps // 2, 1),
    config={"demo": {"steps": steps, "batch_size": batch_size}},
    key_dir=keys / "run",
  )
  console.print(
    f"[bold]1. authorities[/bold] acme-data, eu-office: keys, credential manifests, signed policies "
    f"and profile in {keys / 'authorities'}; the run key in {keys / 'run'}. {out} holds no private "
    "key: it is what an auditor gets"
  )

  task = run.task
  loader = Admission(auth.trust, [read(MANIFEST, p) for p in auth.manifests], on_reject="collect")
  incoming = incoming_examples()
  rejected = list(loader.admit(incoming).rejected)
  console.print(
    f"[bold]2. admission[/bold]: {len(incoming) - len(rejected)} admitted, {len(rejected)} refused"
  )
  for r in rejected:
    console.print(f"   refused {r.example_id}: {r.reason}")
  run.record_refused(rejected)  # before any step: these examples never reach one

  console.print("[bold]3. policy[/bold]: groups " + ", ".join(task.compiled.group_names))

  batches = itertools.cycle(
    list(governed_batches(incoming, loader, batch_size, drop_remainder=True))
  )
  console.print(
    f"[bold]4. training[/bold] {steps} governed steps of {batch_size} examples "
    f"(routed, entropy-bounded, recorded)"
  )
  reached, events, escalation = train(run, batches, steps, console)
  console.print(explain_rich(task.compiled, reached))
  for name, classes in reaching_classes(task.compiled, reached).items():
    console.print(f"   {name} was shaped by: {', '.join(classes) or 'no example'}")
  for (group, metric, action), n in sorted(
    collections.Counter((e.group, e.metric, e.action) for e in events).items()
  ):
    console.print(f"   governance: {metric}/{group} out of bounds on {n} step(s) -> {action}")
  frozen = no_update_claims(out, "core")
  for claim in frozen:
    console.print(f"   lineage: {claim}")

  run_key = _run_key_id(out)
  # an escalated run is stopped for a human, not closed: it is verified as a live run
  trust = TrustStore.of(
    [*auth.trust.keys.values(), keylib.load_public_key(keys / "run" / "run.pub")]
  )
  report = verify_lineage(out, trust, require_closed=escalation is None)
  console.print(
    f"[bold]5. lineage[/bold]: {report.size} records, root {report.root[:16]}..., "
    f"{report.heads} signed heads, closed={report.closed}"
  )
  console.print(
    f"   run key id (hand it to auditors out of band): {run_key}\n"
    f"   check it:  aqgov lineage verify {out} --trust {keys}/authorities/keys/*.pub "
    f"--run-key {keys}/run/run.pub{'' if report.closed else ' --allow-open'}\n"
    f"   attest it: aqgov lineage export {out} --intoto {out}/attestation.intoto.json "
    f"--key {keys}/run/run.key",
    soft_wrap=True,
  )
  console.print(
    "[bold]6. efficacy[/bold]: a short run with planted canary secrets (python benchmarks/efficacy.py "
    "measures it in full)"
  )
  measured = efficacy.demo_claims()
  for claim in measured:
    console.print(f"   {claim}")
  from aqgov.report import write_report  # the `report` extra

  write_report(out, out / "report.html", trust, require_closed=escalation is None)
  console.print(
    f"[bold]7. audit report[/bold]: {out / 'report.html'} (aqgov report {out} -o FILE --trust "
    f"{keys}/authorities/keys/*.pub --run-key {keys}/run/run.pub)",
    soft_wrap=True,
  )
  sensitive_in_core = query(out, "core", where="sensitivity_tier >= 2", trust=auth.trust).count
  console.print(
    claims_table(
      [
        ("only credentialed, unaltered examples trained", f"{len(rejected)} refused at admission"),
        (
          "no example with sensitivity_tier >= 2 reached the core",
          f"{sensitive_in_core} step rows did" if sensitive_in_core else "none did",
        ),
        *[("a frozen group gets no update at all", c) for c in frozen],
        (
          "the lineage verifies with keys obtained out of band",
          f"{report.size} records, {report.heads} signed heads, closed={report.closed}",
        ),
        (
          "tree heads are cosigned by witnesses",
          ", ".join(report.witnessed) or "no witness configured for the demo run",
        ),
        *[("a quarantine adapter holds what sensitive data teaches", c) for c in measured],
      ]
    )
  )
  return {
    "admitted": len(incoming) - len(rejected),
    "rejected": [(r.example_id, str(r.reason)) for r in rejected],
    "policy_ids": task.compiled.policy_ids,
    "groups": task.compiled.group_names,
    "reached": reached.tolist(),
    "events": [e._asdict() for e in events],
    "escalation": escalation,
    "records": report.size,
    "core_no_update": frozen,
  }
