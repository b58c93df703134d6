"""`aqgov witness`: run a witness, print verifier keys, cosign a run's final head after the fact."""

from __future__ import annotations

from pathlib import Path

import click

from aqgov.documents import _keys as keylib
from aqgov.documents import _note as notes
from aqgov.errors import NoteError, WitnessError

DEFAULT_NAME = "aqgov.example/witness/{name}"


def _log_entry(value: str) -> tuple[str, notes.NoteKey]:
  """ORIGIN=VERIFIERKEY or ORIGIN=RUN.pub (the run key, named by the origin as runs sign checkpoints)."""
  origin, sep, key = value.partition("=")
  if not sep or not origin:
    raise click.BadParameter(f"{value!r} is not ORIGIN=KEY (a verifier key or a .pub file)")
  if Path(key).is_file():
    return origin, notes.note_key(keylib.load_public_key(key), origin, notes.ED25519)
  k = notes.parse_verifier_key(key)
  if k.type != notes.ED25519 or k.name != origin:
    raise NoteError(
      f"log key for {origin!r} must be an Ed25519 (0x01) verifier key named {origin!r}"
    )
  return origin, k


def _listen(value: str) -> tuple[str, int]:
  host, sep, port = value.rpartition(":")
  if not sep or not port.isdigit():
    raise click.BadParameter(f"{value!r} is not HOST:PORT")
  return host or "127.0.0.1", int(port)


@click.group()
def witness() -> None:
  """Witness transparency-log checkpoints (C2SP tlog-witness): cosign only what extends what was seen."""


@witness.command("serve")
@click.option(
  "--state",
  "state_dir",
  required=True,
  type=click.Path(file_okay=False),
  help="Directory for the latest cosigned checkpoint of each log (keep it; never delete it).",
)
@click.option(
  "--key",
  "key_path",
  required=True,
  type=click.Path(exists=True, dir_okay=False),
  help="The witness's private key (from `aqgov keys new NAME --out DIR`).",
)
@click.option(
  "--log",
  "logs",
  multiple=True,
  required=True,
  help="ORIGIN=KEY: a log to witness and its key (a verifier key, or the run's .pub). Repeatable.",
)
@click.option(
  "--listen",
  default="127.0.0.1:8765",
  show_default=True,
  help="HOST:PORT to listen on (port 0: any).",
)
@click.option(
  "--name",
  default=None,
  help="The witness's note name [default: aqgov.example/witness/<key name>].",
)
@click.option("--verbose", is_flag=True, help="Log every request.")
def serve_cmd(
  state_dir: str, key_path: str, logs: tuple[str, ...], listen: str, name: str | None, verbose: bool
) -> None:
  """Serve POST /add-checkpoint until interrupted."""
  from aqgov.lineage._witness import Witness, WitnessServer, log_keys

  key = keylib.load_signing_key(key_path)
  w = Witness(
    key,
    name or DEFAULT_NAME.format(name=key.name),
    log_keys(_log_entry(v) for v in logs),
    state_dir,
  )
  host, port = _listen(listen)
  server = WitnessServer(w, host, port, verbose=verbose)
  click.echo(f"witness {w.name} listening on {server.url}")
  click.echo(f"verifier key: {w.note_key.verifier_key}")
  for origin in sorted(w.logs):
    click.echo(f"   following {origin}")
  try:
    server.serve_forever()
  except KeyboardInterrupt:  # Ctrl-C is how a foreground witness is stopped; its state is on disk
    click.echo("stopped")
  finally:
    server.server_close()


@witness.command("vkey")
@click.argument("pub", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", required=True, help="The note name (a witness's name, or a log's origin).")
@click.option(
  "--log", "as_log", is_flag=True, help="A log key (type 0x01) rather than a witness key (0x04)."
)
def vkey_cmd(pub: str, name: str, as_log: bool) -> None:
  """Print the verifier key string of PUB under NAME."""
  kind = notes.ED25519 if as_log else notes.COSIGNATURE_V1
  click.echo(notes.note_key(keylib.load_public_key(pub), name, kind).verifier_key)


@witness.command("cosign")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
  "--witness",
  "witnesses",
  multiple=True,
  required=True,
  help="URL=KEY: a witness and its key (verifier key or .pub). Repeatable.",
)
@click.option(
  "--key",
  "key_path",
  type=click.Path(exists=True, dir_okay=False),
  default=None,
  help="The run's signing key (default: the run key in $XDG_CONFIG_HOME/aqgov/keys/RUN_ID/).",
)
def cosign_cmd(run_dir: str, witnesses: tuple[str, ...], key_path: str | None) -> None:
  """Get cosignatures on RUN's last signed head (for a run that ended without them)."""
  from aqgov.lineage._cosign import cosign_final_head
  from aqgov.lineage._verify import lineage_dir

  refs = []
  for v in witnesses:
    url, sep, key = v.partition("=")
    if not sep:
      raise WitnessError(f"--witness {v!r} is not URL=KEY")
    refs.append((url, key))
  root, ldir = lineage_dir(run_dir)
  if key_path is None:
    from aqgov.lineage._segments import LogReader
    from aqgov.lineage._trust import default_key_dir, find_run_key

    start = next(iter(LogReader(ldir))).body
    key = find_run_key(default_key_dir(start["run_id"]), start["signer"])
  else:
    key = keylib.load_signing_key(key_path)
  path = cosign_final_head(ldir, key, refs)
  click.echo(f"wrote {path}")
