"""Trust from outside the run directory: the keys, documents and task code a run relies on.

Whoever holds a run directory can change anything in it, so nothing found there decides what
counts:

- the run's private key lives in a key directory the operator names (`default_key_dir(run_id)`
  unless told otherwise), never inside the run directory (`check_outside`);
- the authorities a run trusts are exactly the key ids its signed run-start record lists, taken
  from keys the operator or auditor supplies (`recorded_trust`);
- the policies, profiles and credential manifests on disk must be exactly the files run-start
  recorded, with their recorded SHA-256 (`check_documents`);
- the task code is the one the user names or an installed `aqgov.tasks` entry point, checked
  against the record (`resolve_task`), and its module's source must hash to what run-start
  recorded (`check_task_source`).
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Iterable, Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from aqgov.documents import _keys as keylib
from aqgov.documents._files import check_name
from aqgov.documents._keys import PublicKey, SigningKey, TrustStore
from aqgov.errors import LineageError

TASK_GROUP = "aqgov.tasks"
DOCUMENT_DIRS = (
  ("policies", "policy"),
  ("profiles", "profile"),
  ("manifests", "credential manifest"),
)


def default_key_dir(run_id: str) -> Path:
  """Where a run's own key pair lives unless the operator names a directory:
  `$XDG_CONFIG_HOME/aqgov/keys/<run_id>/` (default `~/.config/aqgov/keys/<run_id>/`)."""
  base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
  return Path(base) / "aqgov" / "keys" / check_name(run_id, LineageError, "run id")


def check_outside(key_dir: str | os.PathLike, run_dir: str | os.PathLike) -> Path:
  """`key_dir`, refused when it is the run directory or lies inside it (private keys never go there)."""
  k, r = Path(key_dir).absolute().resolve(), Path(run_dir).absolute().resolve()
  if k == r or r in k.parents:
    raise LineageError(
      f"key directory {key_dir} lies inside the run directory {run_dir}: whoever holds the run "
      "directory would hold the run key; choose a key directory outside it"
    )
  return Path(key_dir)


def find_run_key(key_dir: str | os.PathLike, key_id: str) -> SigningKey:
  """The private key with id `key_id` among `key_dir/*.key`."""
  d = Path(key_dir)
  for path in sorted(d.glob("*.key")):
    k = keylib.load_signing_key(path)
    if k.key_id == key_id:
      return k
  raise LineageError(
    f"the run's signing key ({key_id[:16]}...) is not in {d}; pass key= or key_dir= "
    "(--key-dir) naming the directory the run key was written to"
  )


def as_trust_store(
  trust: TrustStore | Iterable[PublicKey | SigningKey | str | os.PathLike],
) -> TrustStore:
  """A trust store from a store, keys or `.pub` paths."""
  if isinstance(trust, TrustStore):
    return trust
  keys = [t if isinstance(t, (PublicKey, SigningKey)) else keylib.load_public_key(t) for t in trust]
  return TrustStore.of(keys)


def recorded_trust(start: Mapping[str, Any], trust: TrustStore, *, exact: bool) -> TrustStore:
  """The authority keys run-start lists, taken from `trust`; never the run's own key.

  Every recorded key id must be in `trust`. With `exact`, `trust` may hold nothing else (the run
  key aside): a run's trust is fixed when it starts.
  """
  recorded = set(start.get("trust", ()))
  missing = sorted(recorded - set(trust.keys))
  if missing:
    raise LineageError(
      f"run {start['run_id']} trusts key(s) {', '.join(k[:16] + '...' for k in missing)}, which "
      "were not given; pass those authorities' public keys (obtained out of band) with trust= / "
      "--trust",
      index=0,
    )
  extra = sorted(set(trust.keys) - recorded - {start["signer"]})
  if exact and extra:
    names = ", ".join(f"{trust.keys[k].name} ({k[:16]}...)" for k in extra)
    raise LineageError(
      f"key(s) {names} are not among those run {start['run_id']} recorded trusting at start; a "
      "run's trust is fixed by its run-start record: give exactly the keys it started with",
      index=0,
    )
  return TrustStore({k: trust.keys[k] for k in sorted(recorded)})


def check_documents(run_dir: str | os.PathLike, start: Mapping[str, Any]) -> None:
  """Refuse unless `run_dir`'s policies, profiles and manifests are exactly the files run-start recorded.

  A missing, altered or added document is an error: the task is built from what the directory
  holds, so each file must be the one the signed record names.
  """
  root = Path(run_dir)
  for field, what in DOCUMENT_DIRS:
    recorded = {}
    for ref in start.get(field, ()):
      sub, _, name = str(ref["file"]).partition("/")
      if sub != field or check_name(name, LineageError, f"{what} file") != name:
        raise LineageError(f"run-start names {what} file {ref['file']!r} outside {field}/", index=0)
      recorded[name] = ref
    on_disk = {p.name for p in (root / field).glob("*.signed")}
    for name in sorted(set(recorded) - on_disk):
      raise LineageError(
        f"run-start names {what} {recorded[name]['id'][:16]}... but {root / field / name} is "
        "missing; restore it from the run's authorities before resuming or replaying",
        index=0,
      )
    for name in sorted(on_disk - set(recorded)):
      raise LineageError(
        f"{root / field / name} is not a {what} run-start recorded; remove it (a run is governed "
        "by the documents it started with)",
        index=0,
      )
    for name, ref in recorded.items():
      digest = hashlib.sha256((root / field / name).read_bytes()).hexdigest()
      if digest != ref["sha256"]:
        raise LineageError(
          f"{root / field / name} does not have the SHA-256 run-start recorded for {what} "
          f"{ref['id'][:16]}...: the file was replaced or altered",
          index=0,
        )


def registered_tasks() -> dict[str, str]:
  """Installed task factories: `module:attr` -> entry point name, from the `aqgov.tasks` group."""
  return {ep.value.replace(" ", ""): ep.name for ep in entry_points(group=TASK_GROUP)}


def resolve_task(recorded: str, named: str | None = None) -> str:
  """The task reference to import: `named` (it must be the recorded one) or an installed entry point."""
  if named is not None:
    if named != recorded:
      raise LineageError(
        f"task {named!r} is not the task run-start recorded ({recorded!r}); name the recorded "
        "task if you trust its code",
        index=0,
      )
    return named
  if recorded in registered_tasks():
    return recorded
  raise LineageError(
    f"run-start names task {recorded!r}, which is not an installed {TASK_GROUP!r} entry point; "
    f"nothing named by a run directory is imported unless you name it: if you trust that code, "
    f"pass task={recorded!r} (--task {recorded})",
    index=0,
  )


def task_source_sha256(ref: str) -> str | None:
  """SHA-256 of the source file of the module `ref` ("module:attr") names; None when it has none."""
  module = importlib.import_module(str(ref).partition(":")[0])
  path = getattr(module, "__file__", None)
  return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None


def check_task_source(start: Mapping[str, Any], ref: str) -> None:
  """Refuse when the task module's source differs from the digest run-start recorded."""
  recorded = start["config"].get("task_sha256")
  if recorded is None:
    return
  got = task_source_sha256(ref)
  if got != recorded:
    raise LineageError(
      f"the source of task module {ref.partition(':')[0]!r} hashes to {str(got)[:16]}..., but "
      f"run-start recorded {recorded[:16]}...: the task code changed since the run started; "
      "install the version the run used",
      index=0,
    )
