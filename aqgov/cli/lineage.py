"""`aqgov lineage`: verify, show, replay, export and summarise a run's lineage (the questions it answers are in `_lineage_answers`)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from aqgov.documents import _keys as keylib
from aqgov.documents._keys import TrustStore
from aqgov.errors import LineageError
from aqgov.lineage._progress import progress_bar


def _start_of(run_dir: str) -> dict:
  from aqgov.lineage._segments import first_record

  first = first_record(Path(run_dir) / "lineage")
  if first is None:
    raise LineageError(f"{run_dir} holds no lineage")
  return first.body


def _inside(path: str, run_dir: str) -> bool:
  p, r = Path(path).absolute().resolve(), Path(run_dir).absolute().resolve()
  return r in p.parents


def _run_key(run_dir: str, value: str) -> keylib.PublicKey:
  """--run-key: a .pub file, or the run key id (then the run's keys/*.pub holding exactly that key)."""
  if Path(value).is_file():
    return keylib.load_public_key(value)
  kid = value.strip().lower()
  if len(kid) != 64 or any(c not in "0123456789abcdef" for c in kid):
    raise click.UsageError(f"--run-key {value!r} is neither a .pub file nor a 64-hex-digit key id")
  for path in sorted((Path(run_dir) / "keys").glob("*.pub")):
    key = keylib.load_public_key(path)
    if key.key_id == kid:
      return key
  raise LineageError(
    f"no public key with id {kid[:16]}... in {run_dir}/keys; pass the run key's .pub instead"
  )


def _trust(run_dir: str, paths: tuple[str, ...], run_key: str | None) -> TrustStore:
  """The keys given on the command line, warning about any key file inside the run directory."""
  if not paths and run_key is None:
    raise click.UsageError(
      "give the keys you trust, obtained out of band: --trust AUTHORITY.pub ... and "
      "--run-key RUNKEY.pub (or the run key id printed at the end of training)"
    )
  keys = [keylib.load_public_key(p) for p in paths]
  for p in paths:
    if _inside(p, run_dir):
      click.echo(
        f"warning: trusted key file {p} lies inside {run_dir}, the directory being verified: whoever "
        "holds the directory chose it; trust keys obtained out of band",
        err=True,
      )
  if run_key is not None:
    keys.append(_run_key(run_dir, run_key))
  return TrustStore.of(keys)


def _echo_trusted(trust: TrustStore, signed_by: tuple[tuple[str, str], ...]) -> None:
  for kid, key in sorted(trust.keys.items(), key=lambda kv: kv[1].name):
    what = [w for k, w in signed_by if k == kid]
    click.echo(
      f"   trusted key {key.name} {kid}: signed {'; '.join(what) if what else 'nothing in this run'}"
    )


_RUN_KEY = click.option(
  "--run-key",
  default=None,
  help="The run's public key, obtained out of band: its .pub file, or its key id (as "
  "printed at the end of training or by `aqgov keys fingerprint`).",
)


def _IMPORT_TRUST(f):  # noqa: N802 (a decorator, named like the option constants)
  """--trust and --run-key for commands that import the run's task once its lineage verifies."""
  f = _RUN_KEY(f)
  return click.option(
    "--trust",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="The authorities' public keys (and the run key), obtained out of band; the lineage must "
    "verify against them before anything is imported.",
  )(f)


def _run_signing_key(what: str) -> Callable[[Callable], Callable]:
  """--key and --key-dir: the run's private key, given directly or found in its key directory."""

  def decorate(command: Callable) -> Callable:
    command = click.option(
      "--key-dir",
      type=click.Path(exists=True, file_okay=False),
      default=None,
      help="Directory holding the run key (default: $XDG_CONFIG_HOME/aqgov/keys/RUN_ID/).",
    )(command)
    return click.option(
      "--key",
      "key_path",
      type=click.Path(exists=True, dir_okay=False),
      default=None,
      help=f"{what} (default: the run's key in --key-dir).",
    )(command)

  return decorate


def _parent_dirs(values: tuple[str, ...]) -> dict[str, str]:
  """--parent-dir DIR (run id read from its lineage) or RUN_ID=DIR."""
  from aqgov.lineage import _log as log

  out = {}
  for v in values:
    if "=" in v:
      run_id, d = v.split("=", 1)
    else:
      d = v
      first = next(iter(log.LogReader(Path(d) / "lineage")), None)
      if first is None:
        raise LineageError(f"{d} holds no lineage")
      run_id = first.body["run_id"]
    out[run_id] = d
  return out


@click.group()
def lineage() -> None:
  """Verify, inspect, query, replay and attest a run's signed lineage."""


_MORE_KEYS = click.argument("more_keys", nargs=-1, type=click.Path(exists=True, dir_okay=False))


def verify_options(command: Callable) -> Callable:
  """The options that say which keys are trusted and how strict verification is (`lineage verify`,
  `report`): keys obtained out of band, parent runs, live runs, missing files, witnesses."""
  for option in reversed(_VERIFY_OPTIONS):
    command = option(command)
  return command


_VERIFY_OPTIONS = [
  click.option(
    "--trust",
    "trust",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="A trusted public key (.pub), obtained out of band: authorities, parent runs, the run key. "
    "Repeat it, or give several after one --trust (a shell glob works).",
  ),
  _RUN_KEY,
  click.option(
    "--parent-dir",
    multiple=True,
    help="Directory of a parent run (or RUN_ID=DIR) not where recorded.",
  ),
  click.option(
    "--allow-open",
    is_flag=True,
    help="Accept a run that is still running or crashed (no signed run-end); its records after the last "
    "signed head are reported as unsigned. Without it the run must be closed.",
  ),
  click.option(
    "--allow-missing",
    is_flag=True,
    help="List a referenced document, parent run or checkpoint that is not present as unchecked "
    "instead of failing.",
  ),
  click.option(
    "--witness",
    "witnesses",
    multiple=True,
    help="A witness that must have cosigned the final head: its verifier key (NAME+HASH+KEY) or .pub "
    "file. Repeatable; requires a closed run even with --allow-open.",
  ),
]


@lineage.command("verify")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@_MORE_KEYS
@verify_options
def verify_cmd(
  run_dir: str,
  more_keys: tuple[str, ...],
  trust: tuple[str, ...],
  run_key: str | None,
  parent_dir: tuple[str, ...],
  allow_open: bool,
  allow_missing: bool,
  witnesses: tuple[str, ...],
) -> None:
  """Audit a run: every record, the chain, Merkle roots, signed heads, run-end, references, checkpoints,
  parent runs and witnesses.

  Prints each trusted key id and what it signed; warns about trusted key files inside RUN_DIR."""
  from aqgov.lineage._verify import verify_lineage

  store = _trust(run_dir, trust + more_keys, run_key)
  with progress_bar("verifying records") as progress:
    report = verify_lineage(
      run_dir,
      store,
      parent_dirs=_parent_dirs(parent_dir),
      require_closed=not allow_open,
      require_references=not allow_missing,
      witnesses=witnesses,
      progress=progress,
    )
  if report.witnessed:
    click.echo(
      f"OK final head (size {report.size}) cosigned by witness(es) {', '.join(report.witnessed)}"
    )
  r = report
  while r is not None:
    state = "closed" if r.closed else f"open, {r.unsigned} unsigned record(s) after the last head"
    torn = f", torn tail of {r.torn_bytes} bytes ignored" if r.torn_bytes else ""
    click.echo(
      f"OK run {r.run_id}: {r.size} records, root {r.root[:16]}..., {r.heads} signed heads by "
      f"{r.signer!r} ({state}{torn})"
    )
    for c in r.checked:
      click.echo(f"   verified {c}")
    for u in r.unchecked:
      click.echo(f"   not checked: {u}")
    _echo_refused(r.run_dir)
    _echo_trusted(store, r.signed_by)
    r = r.parent


def _echo_refused(run_dir) -> None:
  """One line on the examples the verified run refused at admission, if any."""
  from aqgov.lineage._query import refusals

  refused = refusals(run_dir)
  if refused:
    reasons = Counter(f.reason for f in refused)
    click.echo(
      f"   refused at admission (left out of training): {len(refused)} example(s), "
      + ", ".join(f"{reason} {n}" for reason, n in sorted(reasons.items()))
      + f"; list them with `aqgov lineage query {run_dir} --refused`"
    )


@lineage.command("show")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def show_cmd(run_dir: str) -> None:
  """Summarise a run: configuration, records, checkpoints, and how often each group was reached."""
  from aqgov.lineage._query import describe

  d = describe(run_dir)
  console = Console()
  s = d.start
  meta = Table(title=f"run {d.run_id}", show_header=False)
  task = s["config"].get("task")
  meta.add_row(
    "task", "- (a loop its user owns; not replayable as recorded)" if task is None else task
  )
  meta.add_row("signer", s["signer"][:16] + "...")
  meta.add_row("policies", ", ".join(p["id"][:16] for p in s["policies"]) or "-")
  meta.add_row("profiles", ", ".join(p["id"][:16] for p in s["profiles"]) or "-")
  meta.add_row("manifests", ", ".join(m["id"][:16] for m in s["manifests"]) or "-")
  meta.add_row(
    "parent", f"{s['parent']['run_id']} @ {s['parent']['size']}" if s.get("parent") else "-"
  )
  meta.add_row(
    "records", f"{d.size} ({', '.join(f'{k}: {v}' for k, v in sorted(d.kinds.items()))})"
  )
  meta.add_row("signed heads", f"{d.heads} (last covers {d.signed_size})")
  if d.unsigned:
    meta.add_row(
      "unsigned tail", f"{d.unsigned} record(s) after the last signed head (not shown or counted)"
    )
  meta.add_row("status", (d.status or "closed") if d.closed else "open (not closed)")
  meta.add_row(
    "steps",
    f"{d.steps} effective, last step {d.last_step}, last loss "
    f"{'-' if d.last_loss is None else f'{d.last_loss:.6g}'}",
  )
  meta.add_row("examples", str(d.examples))
  meta.add_row(
    "refused at admission",
    ", ".join(f"{reason}: {n}" for reason, n in d.refused.items()) or "-",
  )
  meta.add_row("checkpoints", ", ".join(str(c.step) for c in d.checkpoints) or "-")
  meta.add_row("resumes", str(d.resumes))
  if d.torn_bytes:
    meta.add_row("torn tail", f"{d.torn_bytes} bytes")
  console.print(meta)
  groups = Table(title="groups")
  groups.add_column("group")
  groups.add_column("examples reached (step x example, as applied)", justify="right")
  groups.add_column("sum of applied contribution norms", justify="right")
  for g in s["groups"]:
    groups.add_row(g, str(d.group_reach[g]), f"{d.group_norm[g]:.6g}")
  console.print(groups)


@lineage.command("replay")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@_MORE_KEYS
@click.option("--step", type=int, required=True, help="Rebuild the params after this step.")
@click.option(
  "--data", required=True, type=click.Path(exists=True, dir_okay=False), help="Examples (JSONL)."
)
@click.option(
  "--from",
  "from_checkpoint",
  type=int,
  default=None,
  help="Start from the checkpoint at or before this step instead of the nearest.",
)
@_IMPORT_TRUST
@click.option(
  "--task",
  "task_ref",
  default=None,
  help="The task factory to import (module:attr); it must be the one run-start recorded. "
  "Default: an installed 'aqgov.tasks' entry point for the recorded task.",
)
def replay_cmd(
  run_dir: str,
  more_keys: tuple[str, ...],
  step: int,
  data: str,
  from_checkpoint: int | None,
  trust: tuple[str, ...],
  run_key: str | None,
  task_ref: str | None,
) -> None:
  """Re-execute the recorded steps and check every fingerprint (and full hashes where recorded)."""
  from aqgov.lineage._replay import replay

  with progress_bar("replaying steps") as progress:
    result = replay(
      run_dir,
      step=step,
      examples=data,
      trust=_trust(run_dir, trust + more_keys, run_key),
      task=task_ref,
      from_checkpoint=from_checkpoint,
      progress=progress,
    )
  if not result.steps_replayed:
    click.echo(
      f"OK step {result.step} is a recorded checkpoint and its params hash matches the record "
      "(nothing re-executed; pass --from to re-derive it from an earlier checkpoint)"
    )
    return
  checked = ", ".join(str(s) for s in result.hashes_checked)
  click.echo(
    f"OK replayed steps {result.from_checkpoint + 1}..{result.step} from the checkpoint at step "
    f"{result.from_checkpoint}: every fingerprint matches; full params hash checked at step(s) {checked}"
  )


def _signing_key(run_dir: str, key_path: str | None, key_dir: str | None) -> keylib.SigningKey:
  """--key, or the run key found in --key-dir (default: the run's default key directory)."""
  from aqgov.lineage._trust import default_key_dir, find_run_key

  if key_path is not None:
    return keylib.load_signing_key(key_path)
  start = _start_of(run_dir)
  return find_run_key(key_dir or default_key_dir(start["run_id"]), start["signer"])


@lineage.command("export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@_MORE_KEYS
@click.option(
  "--intoto",
  "out",
  default=None,
  type=click.Path(dir_okay=False),
  help="Write the signed in-toto DSSE envelope here.",
)
@click.option(
  "--spdx",
  "spdx_out",
  default=None,
  type=click.Path(dir_okay=False),
  help="Write an SPDX 3.0.1 JSON-LD document (AI and Dataset profiles) here.",
)
@click.option(
  "--cyclonedx",
  "cyclonedx_out",
  default=None,
  type=click.Path(dir_okay=False),
  help="Write a CycloneDX 1.6 ML-BOM (JSON) here.",
)
@_run_signing_key("Signing key for --intoto")
@click.option(
  "--trust",
  multiple=True,
  type=click.Path(exists=True, dir_okay=False),
  help="Keys to verify the lineage against first (default: the signing key).",
)
def export_cmd(
  run_dir: str,
  more_keys: tuple[str, ...],
  out: str | None,
  spdx_out: str | None,
  cyclonedx_out: str | None,
  key_path: str | None,
  key_dir: str | None,
  trust: tuple[str, ...],
) -> None:
  """Attest the run (in-toto Statement v1, subjects: checkpoint digests, in a signed DSSE envelope)
  and describe it for supply-chain tools (SPDX 3.0.1, CycloneDX 1.6 ML-BOM)."""
  if out is None and spdx_out is None and cyclonedx_out is None:
    raise click.UsageError("name at least one output: --intoto, --spdx or --cyclonedx")
  trust = trust + more_keys
  if spdx_out is not None or cyclonedx_out is not None:
    from aqgov.lineage._regulator import cyclonedx_bom, run_facts, spdx_document

    facts = run_facts(run_dir)
    for path, doc, what in (
      (spdx_out, spdx_document, "SPDX 3.0.1 document"),
      (cyclonedx_out, cyclonedx_bom, "CycloneDX 1.6 ML-BOM"),
    ):
      if path is not None:
        Path(path).write_text(json.dumps(doc(run_dir, facts), indent=2) + "\n")
        click.echo(f"wrote {path}: {what} of run {facts.run_id}")
  if out is None:
    return
  from aqgov.lineage._export import export_intoto

  key = _signing_key(run_dir, key_path, key_dir)
  env = export_intoto(run_dir, key, trust=TrustStore.from_paths(trust) if trust else None)
  Path(out).write_text(json.dumps(env, indent=2) + "\n")
  click.echo(f"wrote {out}: in-toto statement signed by {key.name!r} (key id {key.key_id[:16]}...)")


@lineage.command("summary")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
  "--eu-gpai",
  is_flag=True,
  required=True,
  help="Draft the EU AI Office's public summary of training content (Markdown).",
)
@click.option(
  "-o",
  "--out",
  default=None,
  type=click.Path(dir_okay=False),
  help="Write it here (default: stdout).",
)
def summary_cmd(run_dir: str, eu_gpai: bool, out: str | None) -> None:
  """Draft a regulator's summary from the lineage and manifests; what the lineage cannot know is
  left as a marked blank ("[to be completed by the provider: ...]")."""
  from aqgov.lineage._regulator import eu_gpai_summary

  text = eu_gpai_summary(run_dir)
  if out is None:
    click.echo(text)
  else:
    Path(out).write_text(text)
    click.echo(
      f"wrote {out}: EU GPAI training-content summary draft ({text.count('[to be completed')} blanks)"
    )


from aqgov.cli import _lineage_answers  # noqa: E402, F401 (registers query, index, entropy, events, attribute)
