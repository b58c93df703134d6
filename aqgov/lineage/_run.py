"""A governed run: one directory holding everything an auditor needs, and the loop that fills it.

    RUN/keys/         public keys only: run.pub and the trusted keys the run relied on (authorities,
                      the parent run's key), for reference; nothing trusts them for being there
    RUN/policies/     signed routing policies, as `<id>.signed` (SignedDocument bytes)
    RUN/profiles/     signed entropy profiles
    RUN/manifests/    signed credential manifests
    RUN/lineage/      the log (segments/ and heads.seg, see `aqgov.lineage.log`)
    RUN/checkpoints/  Orbax checkpoints `<step>/` (see `aqgov.lineage.checkpoint`)

`GovernedRun.start` copies the documents in, writes the run-start record and checkpoints the
initial state (step 0), so replay can rebuild any step. `step(examples)` runs one step of the
`Task` and hands its summary to the asynchronous writer; every `checkpoint_every` steps the
state is checkpointed and then recorded. `resume` continues after a crash or a stop from the
latest recorded checkpoint (the rule is in `aqgov.lineage.history`). A `GovernanceEscalation`
raised by the task (or passed to `escalate`) checkpoints the resumable state, records an
"escalation" record, signs a head and propagates.

No private key is ever written inside the run directory: the run key lives in the key directory
the operator names (`key_dir=`, default `$XDG_CONFIG_HOME/aqgov/keys/<run_id>/`). Resume takes
the authority keys from the operator (`trust=`) and checks them, the documents on disk and the
task code against the signed run-start record (see `aqgov.lineage._trust`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from aqgov.credentials._manifest import Example, as_example, content_hash
from aqgov.documents import _canonical as canonical
from aqgov.documents import _keys as keylib
from aqgov.documents import _signing as signing
from aqgov.documents._files import atomic_write, check_name, child
from aqgov.documents._keys import PublicKey, SigningKey, TrustStore
from aqgov.entropy._overrides import admit_override
from aqgov.errors import CheckpointError, GovernanceEscalation, LineageError
from aqgov.lineage import _bodies as bodies
from aqgov.lineage import _distributed as dist
from aqgov.lineage import _history as hist
from aqgov.lineage import _log as log
from aqgov.lineage import _record as rec
from aqgov.lineage import _trust as trustlib
from aqgov.lineage._checkpoint import Checkpoints
from aqgov.lineage._summary import StepSummary
from aqgov.lineage._task import Task, TrainState, load_task
from aqgov.lineage._verify import verify_lineage

Document = signing.SignedDocument | bytes | str | os.PathLike


class RunLayout:
  """Paths of a run directory."""

  def __init__(self, root: str | os.PathLike):
    self.root = Path(root)
    self.keys = self.root / "keys"
    self.policies = self.root / "policies"
    self.profiles = self.root / "profiles"
    self.manifests = self.root / "manifests"
    self.lineage = self.root / "lineage"
    self.checkpoints = self.root / "checkpoints"

  def make(self) -> None:
    for d in (
      self.keys,
      self.policies,
      self.profiles,
      self.manifests,
      self.lineage,
      self.checkpoints,
    ):
      d.mkdir(parents=True, exist_ok=True)


def _as_document(doc: Document) -> tuple[signing.SignedDocument, bytes]:
  if isinstance(doc, signing.SignedDocument):
    return doc, doc.to_bytes()
  data = bytes(doc) if isinstance(doc, (bytes, bytearray)) else Path(doc).read_bytes()
  return signing.SignedDocument.from_bytes(data), data


def _copy_documents(docs: Iterable[Document], into: Path, root: Path) -> list[bodies.DocRef]:
  refs = []
  for d in docs:
    doc, data = _as_document(d)
    path = into / f"{doc.id}.signed"
    atomic_write(path, data)
    refs.append(
      bodies.DocRef(
        doc.kind, doc.id, rec.record_hash(data).hex(), path.relative_to(root).as_posix()
      )
    )
  return refs


def _write_public(key: PublicKey, into: Path) -> None:
  path = child(into, f"{key.name}.pub", LineageError, "trusted key name")
  if path.exists() and keylib.load_public_key(path).key_id != key.key_id:
    path = into / f"{key.name}-{key.key_id[:12]}.pub"
  atomic_write(path, keylib.public_key_json(key).encode())


def _used_tokens(scan: log.LogScan) -> set[str]:
  return {b["token_id"] for i, b in scan.bodies.items() if scan.kinds[i] == rec.OVERRIDE}


class GovernedRun:
  """Runs a `Task` step by step, recording every step in a signed lineage (see the module doc)."""

  def __init__(
    self,
    layout: RunLayout,
    task: Task,
    state: TrainState,
    writer: log.LineageWriter,
    checkpoints: Checkpoints,
    *,
    run_id: str,
    checkpoint_every: int,
    checkpointed: Iterable[int],
    trust: TrustStore = TrustStore({}),
    used_tokens: Iterable[str] = (),
    distributed: dist.DataParallel | None = None,
  ):
    self.distributed = distributed  # None: this process runs alone
    self.layout, self.task, self.state, self.writer = layout, task, state, writer
    self.trust, self._used_tokens = trust, set(used_tokens)
    self.checkpoints, self.run_id, self.checkpoint_every = (
      checkpoints,
      run_id,
      int(checkpoint_every),
    )
    self._step = int(jax.device_get(state.step))
    self._checkpointed = set(int(s) for s in checkpointed)
    self._closed = False

  # ---- starting and resuming ------------------------------------------------------------------

  @classmethod
  def start(
    cls,
    run_dir: str | os.PathLike,
    *,
    task: str,
    task_config: Mapping[str, Any] | None = None,
    key: SigningKey | None = None,
    policies: Iterable[Document] = (),
    profiles: Iterable[Document] = (),
    manifests: Iterable[Document] = (),
    trust: TrustStore | Iterable[PublicKey | str | os.PathLike] = (),
    parent: str | os.PathLike | None = None,
    config: Mapping[str, Any] | None = None,
    checkpoint_every: int = 100,
    head_every: int = 1024,
    fsync: str = "tree-head",
    run_id: str | None = None,
    max_to_keep: int | None = None,
    witnesses: Sequence[tuple[str, Any]] = (),
    key_dir: str | os.PathLike | None = None,
    mesh: Any = None,
    distributed: bool | None = None,
  ) -> GovernedRun:
    """Create `run_dir` (empty or absent), record run-start and checkpoint the initial state.

    `task` is "module:attr" (see `aqgov.lineage.task`); `trust` are the public keys of the
    authorities whose documents the run relies on (copied into keys/); `parent` is the directory
    of the run this one continues (its last signed head is recorded). Without `key` a run key is
    generated into `key_dir` (default `$XDG_CONFIG_HOME/aqgov/keys/<run_id>/`, never inside
    `run_dir`); only its public half, in the run role, goes to keys/run.pub, so it never verifies
    as the signer of a policy, profile, override or manifest. `witnesses` are (url,
    witness key) pairs: each signed head is submitted to them for a cosignature, and `close` fails
    unless all cosign the final one.

    `mesh` and `distributed` spread the run over processes (`aqgov.lineage.distributed`): with
    `jax.distributed` initialized for several processes every process calls `start` alike and
    `step`s with its shard of each batch; only process 0 needs `key`/`key_dir`, and only it
    writes and signs the lineage.
    """
    placed = dist.placement(mesh, distributed)
    if placed is not None and not placed.writes:
      return dist.join_start(
        cls, RunLayout(run_dir), placed, task, task_config, trust, checkpoint_every, max_to_keep
      )
    layout = RunLayout(run_dir)
    if layout.root.exists() and any(layout.root.iterdir()):
      raise LineageError(
        f"{layout.root} is not empty; start a run in a new directory or resume this one"
      )
    if checkpoint_every < 1:
      raise LineageError(f"checkpoint_every must be at least 1, got {checkpoint_every}")
    run_id = run_id or uuid.uuid4().hex
    if key is None:
      key_dir = trustlib.check_outside(key_dir or trustlib.default_key_dir(run_id), layout.root)
    trusted = list(trustlib.as_trust_store(trust).keys.values())
    for t in trusted:
      check_name(t.name, LineageError, "trusted key name")
    layout.make()
    for t in trusted:
      _write_public(t, layout.keys)
    # the run key, in the run role, may sign lineage heads and nothing else; its private half stays outside
    if key is None:
      key = keylib.generate(keylib.RUN, roles=(keylib.RUN,))
      keylib.write_keypair(key, key_dir)
    _write_public(key.public._replace(name=keylib.RUN, roles=(keylib.RUN,)), layout.keys)
    parent_ref = _parent_ref(Path(parent), layout, trusted) if parent is not None else None
    witness_refs = [log.as_witness(w) for w in witnesses]
    task_config = dict(task_config or {})
    canonical.encode([task_config, dict(config or {})])  # fail here, not on the writer thread
    # documents first: the task is built from what the run directory holds
    policy_refs = _copy_documents(policies, layout.policies, layout.root)
    profile_refs = _copy_documents(profiles, layout.profiles, layout.root)
    manifest_refs = _copy_documents(manifests, layout.manifests, layout.root)
    authorities = TrustStore.of(trusted)
    the_task = load_task(task, task_config, layout.root, trust=authorities)
    task_sha256 = trustlib.task_source_sha256(task)
    body = bodies.run_start_body(
      run_id=run_id,
      signer=key.key_id,
      groups=tuple(the_task.group_names),
      classes=tuple(getattr(the_task, "class_names", ())),
      policies=policy_refs,
      profiles=profile_refs,
      manifests=manifest_refs,
      trust=[t.key_id for t in trusted],
      parent=parent_ref,
      task=task,
      task_config=task_config,
      config={
        **dict(config or {}),
        **({"task_sha256": task_sha256} if task_sha256 else {}),
        "lineage": {
          "checkpoint_every": checkpoint_every,
          "head_every": head_every,
          "fsync": fsync,
          **({"witnesses": [w.to_wire() for w in witness_refs]} if witness_refs else {}),
        },
      },
    )
    writer = log.LineageWriter.create(
      layout.lineage, key, body, fsync=fsync, head_every=head_every, witnesses=witness_refs
    )
    if placed is not None:
      writer = dist.SharedWriter(placed, writer)
    dist.announce(placed, "start", {"run_id": run_id})
    run = cls(
      layout,
      the_task,
      the_task.init() if placed is None else placed.place_state(the_task.init()),
      writer,
      Checkpoints(layout.checkpoints, max_to_keep=max_to_keep),
      run_id=run_id,
      checkpoint_every=checkpoint_every,
      checkpointed=(),
      trust=authorities,
      distributed=placed,
    )
    run.checkpoint()
    return run

  @classmethod
  def resume(
    cls,
    run_dir: str | os.PathLike,
    *,
    trust: TrustStore | Iterable[PublicKey | str | os.PathLike] = (),
    key: SigningKey | None = None,
    key_dir: str | os.PathLike | None = None,
    max_to_keep: int | None = None,
    witnesses: Sequence[tuple[str, Any]] | None = None,
    mesh: Any = None,
    distributed: bool | None = None,
  ) -> GovernedRun:
    """Continue a run after a crash, an escalation or `abandon` (see the resume rule). A closed run
    (signed run-end) is final: continue it as a child run (`start(..., parent=)`).

    Takes the run's writer lock first (`LineageError` while another process writes it).
    `trust` are the authority keys the run started with (given by the operator, never read from
    the run directory): exactly the key ids run-start recorded. The run key is `key`, or is read
    from `key_dir` (default: where `start` put it). The log must verify under the run key, and the
    documents and task code must be those run-start recorded. `witnesses` default to those
    run-start recorded. `mesh` and `distributed` as for `start`: all processes resume together."""
    placed = dist.placement(mesh, distributed)
    if placed is not None and not placed.writes:
      return dist.join_resume(cls, RunLayout(run_dir), placed, trust, max_to_keep)
    layout = RunLayout(run_dir)
    first = next(iter(log.LogReader(layout.lineage)), None)
    if first is None:
      raise LineageError(f"{layout.lineage} holds no run-start record; start a new run instead")
    start = first.body
    key = key or trustlib.find_run_key(
      key_dir or trustlib.default_key_dir(start["run_id"]), start["signer"]
    )
    if key.key_id != start["signer"]:
      raise LineageError(f"key {key.name!r} did not sign run {start['run_id']}; pass the run's key")
    if not log.read_heads(layout.lineage)[0]:
      raise LineageError(
        f"no signed tree head of run {start['run_id']} covers its run-start record, so nothing "
        "vouches for it; start a new run instead"
      )
    authorities = trustlib.recorded_trust(start, trustlib.as_trust_store(trust), exact=True)
    settings = start["config"].get("lineage", {})
    writer, scan = log.open_for_resume(
      layout.lineage,
      key,
      fsync=settings.get("fsync", "tree-head"),
      head_every=int(settings.get("head_every", 1024)),
      bodies=(rec.CHECKPOINT, rec.RUN_RESUME, rec.OVERRIDE),
      witnesses=[log.WitnessRef.from_wire(w) for w in settings.get("witnesses", ())]
      if witnesses is None
      else witnesses,
    )
    try:
      if scan.bodies[0] != start:
        raise LineageError("the run-start record changed while resuming; try again", index=0)
      history = hist.history(scan)
      trustlib.check_documents(layout.root, start)
      trustlib.check_task_source(start, start["config"]["task"])
      task = load_task(
        start["config"]["task"],
        start["config"].get("task_config", {}),
        layout.root,
        trust=authorities,
      )
      dist.announce(placed, "open")  # the others open the checkpoints with process 0
      checkpoints = Checkpoints(layout.checkpoints, max_to_keep=max_to_keep)
      on_disk = set(checkpoints.steps())
      ref = next((c for c in reversed(history.checkpoints) if c.step in on_disk), None)
      superseded = [s for s in sorted(on_disk) if s > (ref.step if ref else 0) or ref is None]
      dist.announce(placed, "resume", {"checkpoint": ref and ref.step, "delete": superseded})
      template = task.init() if placed is None else placed.place_state(task.init())
      if ref is None:
        state, ck_step, ck_index = template, 0, None
      else:
        restored = checkpoints.restore(ref.step, template)
        _check_restored(restored, ref, scan)
        state, ck_step, ck_index = restored.state, ref.step, ref.index
      dist.announce(placed, "restore")
      for s in superseded:
        checkpoints.delete(s)  # superseded or never recorded: the resumed run writes its own
      writer.append_record(
        rec.RUN_RESUME,
        bodies.resume_body(
          checkpoint_step=ck_step,
          checkpoint_record=ck_index,
          superseded=((ck_index + 1) if ck_index is not None else 1, scan.size),
        ),
      )
    except BaseException as exc:
      writer.abandon()
      dist.announce(placed, "resume", error=f"{type(exc).__name__}: {exc}")
      raise
    if placed is not None:
      writer = dist.SharedWriter(placed, writer)
    dist.announce(placed, "resume")
    run = cls(
      layout,
      task,
      state,
      writer,
      checkpoints,
      run_id=start["run_id"],
      checkpoint_every=int(settings.get("checkpoint_every", 100)),
      checkpointed=() if ref is None else (ck_step,),
      trust=authorities,
      used_tokens=_used_tokens(scan),
      distributed=placed,
    )
    if ref is None:
      run.checkpoint()
    return run

  # ---- the loop -------------------------------------------------------------------------------

  @property
  def next_step(self) -> int:
    """The number the next step will get (steps are numbered from 1)."""
    return self._step + 1

  def step(self, examples: Sequence[Example | Mapping[str, Any]]) -> StepSummary:
    """Run one step on `examples` (in loader order), record it, and checkpoint when due."""
    self._check_open()
    exs = [as_example(e) for e in examples]
    if not exs:
      raise LineageError(
        f"step {self._step + 1} was given no examples; a recorded step trains on at least one, "
        "so skip empty batches in the data loader"
      )
    batch, labels = self.task.make_batch(exs)
    if self.distributed is not None:
      batch, labels = self.distributed.place_batch(batch, labels)
    try:
      state, summary = self.task.step(self.state, batch, labels)
    except GovernanceEscalation as exc:
      self.escalate(exc)
      raise
    self.state = state
    self._step += 1
    gathered = self.writer.append(
      summary, [e.id for e in exs], [bytes.fromhex(content_hash(e.content)) for e in exs]
    )
    if self._step % self.checkpoint_every == 0:
      self.checkpoint()
    return summary if gathered is None else gathered  # distributed: the global batch's, on host

  def checkpoint(self) -> int:
    """Checkpoint the current state now (once it is complete, a "checkpoint" record names it)."""
    self._check_open()
    step = int(jax.device_get(self.state.step))
    if step in self._checkpointed:
      return step
    head = self.writer.flush(sign_head=True)
    saved = self.checkpoints.save(self.state, head, self.run_id)
    self.writer.append_record(
      rec.CHECKPOINT,
      bodies.checkpoint_body(
        step=step,
        params_sha256=saved.digests["params"],
        path=Path(os.path.relpath(saved.path, self.layout.root.absolute())).as_posix(),
        lineage_size=head.size,
        lineage_root=head.root.hex(),
        digests=saved.digests,
        files_sha256=saved.files_sha256,
      ),
    )
    self._checkpointed.add(step)
    return step

  def escalate(self, exc: GovernanceEscalation) -> None:
    """Record an escalation: checkpoint the resumable state, write the record, sign a head."""
    self._check_open()
    if isinstance(exc.state, TrainState):
      self.state = exc.state
      self._step = int(jax.device_get(exc.state.step))
    ck = self.checkpoint()
    self.writer.append_record(
      rec.ESCALATION,
      bodies.escalation_body(
        step=self._step if exc.step is None else int(exc.step),
        message=str(exc),
        events=exc.events,
        checkpoint_step=ck,
      ),
    )
    self.writer.flush(sign_head=True)

  def record_event(self, events: Mapping[str, Any], *, step: int | None = None) -> None:
    """Record governance events noticed on the host (they also ride in each step's summary)."""
    self._check_open()
    self.writer.append_record(
      rec.EVENT, bodies.event_body(step=self._step if step is None else step, events=events)
    )

  def record_override(self, token: signing.SignedDocument, *, step: int | None = None) -> None:
    """Record a signed override token used at `step` (default: the next step), kept verbatim.

    The token is checked first (`aqgov.entropy.admit_override`): signed by one of the task's
    override authorities (`task.override_authorities` when it has them; never the run key), for
    this run, covering `step`, unexpired now, and not used before in this run."""
    self._check_open()
    step = self.next_step if step is None else int(step)
    admit_override(
      token,
      self.trust,
      self.run_id,
      step=step,
      used=self._used_tokens,
      authorities=getattr(self.task, "override_authorities", None),
    )
    self.writer.append_record(
      rec.OVERRIDE,
      bodies.override_body(
        step=step, token_kind=token.kind, token_id=token.id, token=token.to_bytes()
      ),
    )
    self._used_tokens.add(token.id)

  def head(self, *, sign: bool = False) -> log.LogHead:
    """The log head once everything queued is written."""
    return self.writer.flush(sign_head=sign)

  def close(self, *, status: str = "completed", checkpoint: bool = True) -> log.LogHead:
    """Checkpoint the final state (unless told not to), write run-end and sign the final head."""
    if self._closed:
      raise LineageError("this run is already closed")
    if checkpoint:
      self.checkpoint()
    self._closed = True
    try:
      return self.writer.close(status=status, step=self._step)
    finally:
      self.checkpoints.close()

  def abandon(self) -> None:
    """Stop without run-end (as a crash would, but cleanly): the run stays resumable."""
    if not self._closed:
      self._closed = True
      try:
        self.writer.flush(sign_head=True)
      finally:
        self.writer.abandon()
        self.checkpoints.close()

  def __enter__(self) -> GovernedRun:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if self._closed:
      return
    if exc_type is None:
      self.close()
    else:
      self.abandon()

  def _check_open(self) -> None:
    if self._closed:
      raise LineageError("this run is closed; resume it with GovernedRun.resume to continue")


def _parent_ref(parent: Path, layout: RunLayout, trusted: Sequence[PublicKey]) -> bodies.ParentRef:
  """The parent's last signed head, once the parent verifies under the keys given (and its own run
  key from the operator's key directory); never under keys found in the parent's directory."""
  start = next(iter(log.LogReader(parent / "lineage")), None)
  if start is None:
    raise LineageError(f"parent run {parent} holds no lineage")
  keys = list(trusted)
  own = trustlib.default_key_dir(start.body["run_id"]) / f"{keylib.RUN}.pub"
  if own.is_file():
    keys.append(keylib.load_public_key(own))
  trust = TrustStore.of(keys)
  if start.body["signer"] not in trust:
    raise LineageError(
      f"parent run {start.body['run_id']} is signed by key {start.body['signer'][:16]}..., which "
      "is not among the keys given; pass the parent run's public key (obtained out of band) in "
      "trust="
    )
  report = verify_lineage(parent, trust)
  heads, _ = log.read_heads(parent / "lineage")
  if not heads:
    raise LineageError(f"parent run {parent} has no signed tree head to continue from")
  last = heads[-1]
  _write_public(trust.get(start.body["signer"]), layout.keys)
  return bodies.ParentRef(
    report.run_id,
    last.id,
    int(last.payload["size"]),
    str(last.payload["root"]),
    os.path.relpath(parent.absolute(), layout.root.absolute()),
  )


def _check_restored(restored, ref: hist.CheckpointRef, scan: log.LogScan) -> None:
  for item, recorded in (ref.digests or {"params": ref.params_sha256}).items():
    if restored.digests.get(item) != recorded:
      raise CheckpointError(
        f"checkpoint at step {ref.step} ({ref.path}) holds {item} hashing to "
        f"{str(restored.digests.get(item))[:16]}..., but lineage record {ref.index} recorded "
        f"{recorded[:16]}...: the checkpoint was altered; restore it from a backup"
      )
  if restored.head.size != ref.index or restored.head.root != scan.roots_before[ref.index]:
    raise CheckpointError(
      f"checkpoint at step {ref.step} was taken at a different log position than record "
      f"{ref.index} says; it belongs to another run or log"
    )
