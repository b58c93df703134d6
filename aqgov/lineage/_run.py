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
"escalation" record, signs a head and propagates. Examples the task's admission refuses are left
out of the step and listed in its record (`on_reject="record"`, the default) or raise
`AdmissionError` (`"raise"`).

`GovernedRun.open` records a loop its user owns instead: the run holds no task and no state. The
user's jitted step builds a `StepSummary` (`aqgov.lineage.routed_summary`) and either returns it,
for `record(summary, batch)`, or sends it through an ordered host callback (`emit`, with the
batch queued by `stage`); `checkpoint(params, opt_state=...)` and `close(...)` take the state the
user holds. Such a run records no task, so `replay` needs its caller to name one.

No private key is ever written inside the run directory: the run key lives in the key directory
the operator names (`key_dir=`, default `$XDG_CONFIG_HOME/aqgov/keys/<run_id>/`). Resume takes
the authority keys from the operator (`trust=`) and checks them, the documents on disk and the
task code against the signed run-start record (see `aqgov.lineage._trust`).
"""

from __future__ import annotations

import collections
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from aqgov.credentials._admission import Admission, AdmittedBatch, Rejection
from aqgov.credentials._manifest import MANIFEST, Example, Manifest, as_example, content_hash
from aqgov.documents import _canonical as canonical
from aqgov.documents import _keys as keylib
from aqgov.documents import _signing as signing
from aqgov.documents._document_type import DocumentType, verify
from aqgov.documents._files import atomic_write, check_name, child, read_bytes
from aqgov.documents._keys import PublicKey, SigningKey, TrustStore
from aqgov.entropy._overrides import admit_override
from aqgov.entropy._profile import PROFILE
from aqgov.errors import (
  CheckpointError,
  GovernanceEscalation,
  LineageError,
  PolicyError,
  SignatureError,
)
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
from aqgov.policy._compile import CompiledPolicy, compile_policy
from aqgov.policy._policy import POLICY

Document = signing.SignedDocument | Manifest | bytes | str | os.PathLike


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


def _as_document(
  doc: Document, doc_type: DocumentType, field: str
) -> tuple[signing.SignedDocument, bytes]:
  """The signed document of `doc_type` that `doc` is or holds (a `SignedDocument`, a `Manifest`,
  its bytes or its file), and its bytes; an unsigned document object is refused: nothing vouches
  for it."""
  if isinstance(doc, Manifest):
    doc = doc.document
  if isinstance(doc, signing.SignedDocument):
    data = doc.to_bytes()
  elif isinstance(doc, (bytes, bytearray)):
    data = bytes(doc)
  elif isinstance(doc, (str, os.PathLike)):
    data = read_bytes(doc, doc_type.error, f"signed {doc_type.noun}")
  else:
    raise doc_type.error(
      f"a {type(doc).__name__} object is not a signed {doc_type.noun}, so nothing vouches for it "
      f"and a run cannot record it: pass the signed document (aqgov.documents.sign({doc_type.name.upper()}, "
      f"doc, authority_key), or `aqgov {doc_type.name} sign`) or the path of its signed file"
    )
  try:
    signed = signing.SignedDocument.from_bytes(data)
  except SignatureError as exc:
    raise doc_type.error(f"not a signed {doc_type.noun}: {exc}") from None
  if signed.kind != doc_type.kind:
    raise doc_type.error(
      f"{field}= takes signed {doc_type.noun} documents ({doc_type.kind!r}), got a "
      f"{signed.kind!r} document; pass each document in its own argument (policies=, profiles=, "
      "manifests=)"
    )
  return signed, data


def _write_public(key: PublicKey, into: Path) -> None:
  path = child(into, f"{key.name}.pub", LineageError, "trusted key name")
  if path.exists() and keylib.load_public_key(path).key_id != key.key_id:
    path = into / f"{key.name}-{key.key_id[:12]}.pub"
  atomic_write(path, keylib.public_key_json(key).encode())


def _used_tokens(scan: log.LogScan) -> set[str]:
  return {b["token_id"] for i, b in scan.bodies.items() if scan.kinds[i] == rec.OVERRIDE}


_DOCUMENT_TYPES = (("policies", POLICY), ("profiles", PROFILE), ("manifests", MANIFEST))
ON_REJECT = ("record", "raise")


class _Doc(NamedTuple):
  signed: signing.SignedDocument
  data: bytes


def _documents(
  policies: Iterable[Document], profiles: Iterable[Document], manifests: Iterable[Document]
) -> dict[str, list[_Doc]]:
  """The signed documents a run is given, by run-start field, checked before anything is written."""
  given = {"policies": policies, "profiles": profiles, "manifests": manifests}
  return {
    field: [_Doc(*_as_document(d, doc_type, field)) for d in given[field]]
    for field, doc_type in _DOCUMENT_TYPES
  }


def _write_documents(docs: Sequence[_Doc], into: Path, root: Path) -> list[bodies.DocRef]:
  """Copy signed documents into the run directory as `<id>.signed`; their docrefs."""
  refs = []
  for doc in docs:
    path = into / f"{doc.signed.id}.signed"
    atomic_write(path, doc.data)
    refs.append(
      bodies.DocRef(
        doc.signed.kind,
        doc.signed.id,
        rec.record_hash(doc.data).hex(),
        path.relative_to(root).as_posix(),
      )
    )
  return refs


def _check_policies(compiled: CompiledPolicy, policies: Sequence[_Doc]) -> None:
  """Refuse unless the (verified) signed `policies` are exactly those `compiled` was built from."""
  signed = {doc.signed.id for doc in policies}
  compiled_from = set(compiled.policy_ids)
  if signed != compiled_from:
    missing, extra = sorted(compiled_from - signed), sorted(signed - compiled_from)
    raise PolicyError(
      "the compiled policy must be compiled from exactly the signed policies the run records: "
      + "; ".join(
        [f"no signed document given for policy {i[:16]}..." for i in missing]
        + [f"signed policy {i[:16]}... is not part of the compiled policy" for i in extra]
      )
      + "; pass the signed documents of the policies given to compile_policy"
    )


def _trusted(trust: TrustStore | Iterable[PublicKey | str | os.PathLike]) -> list[PublicKey]:
  trusted = list(trustlib.as_trust_store(trust).keys.values())
  for t in trusted:
    check_name(t.name, LineageError, "trusted key name")
  return trusted


class _Begun(NamedTuple):
  """A new run directory with its keys and documents in place, before its run-start record."""

  layout: RunLayout
  run_id: str
  key: SigningKey
  trusted: list[PublicKey]
  parent: bodies.ParentRef | None
  witnesses: list[log.WitnessRef]
  refs: dict[str, list[bodies.DocRef]]
  on_reject: str

  @property
  def authorities(self) -> TrustStore:
    return TrustStore.of(self.trusted)

  def run_start(
    self,
    *,
    groups: Sequence[str],
    classes: Sequence[str],
    task: str | None,
    task_config: Mapping[str, Any],
    config: Mapping[str, Any],
    lineage: Mapping[str, Any],
    compiled: Any = None,
  ) -> dict:
    """The run-start body; `lineage` are the writer's settings (`config.lineage`). The compiled
    policy's subspace routes, if any, are recorded with their basis digests (`config.subspaces`)."""
    witnesses = [w.to_wire() for w in self.witnesses]
    subspaces = compiled.subspace_digests() if compiled is not None else []
    return bodies.run_start_body(
      run_id=self.run_id,
      signer=self.key.key_id,
      groups=tuple(groups),
      classes=tuple(classes),
      policies=self.refs["policies"],
      profiles=self.refs["profiles"],
      manifests=self.refs["manifests"],
      trust=[t.key_id for t in self.trusted],
      parent=self.parent,
      task=task,
      task_config=task_config,
      config={
        **dict(config),
        **({"subspaces": subspaces} if subspaces else {}),
        "lineage": {
          **dict(lineage),
          "on_reject": self.on_reject,
          **({"witnesses": witnesses} if witnesses else {}),
        },
      },
    )


def _begin(
  run_dir: str | os.PathLike,
  run_id: str | None,
  key: SigningKey | None,
  key_dir: str | os.PathLike | None,
  trusted: list[PublicKey],
  parent: str | os.PathLike | None,
  witnesses: Sequence[tuple[str, Any]],
  docs: Mapping[str, Sequence[_Doc]],
  on_reject: str,
) -> _Begun:
  """Create the run directory: public keys, the run key (outside it), the parent's head, documents."""
  layout = RunLayout(run_dir)
  if layout.root.exists() and any(layout.root.iterdir()):
    raise LineageError(
      f"{layout.root} is not empty; start a run in a new directory or resume this one"
    )
  if on_reject not in ON_REJECT:
    raise LineageError(f"on_reject must be one of {', '.join(ON_REJECT)}, got {on_reject!r}")
  run_id = run_id or uuid.uuid4().hex
  if key is None:
    key_dir = trustlib.check_outside(key_dir or trustlib.default_key_dir(run_id), layout.root)
  witness_refs = [log.as_witness(w) for w in witnesses]
  layout.make()
  for t in trusted:
    _write_public(t, layout.keys)
  # the run key, in the run role, may sign lineage heads and nothing else; its private half stays outside
  if key is None:
    key = keylib.generate(keylib.RUN, roles=(keylib.RUN,))
    keylib.write_keypair(key, key_dir)
  _write_public(key.public._replace(name=keylib.RUN, roles=(keylib.RUN,)), layout.keys)
  parent_ref = _parent_ref(Path(parent), layout, trusted) if parent is not None else None
  refs = {
    field: _write_documents(docs[field], getattr(layout, field), layout.root)
    for field, _ in _DOCUMENT_TYPES
  }
  return _Begun(layout, run_id, key, trusted, parent_ref, witness_refs, refs, on_reject)


class GovernedRun:
  """A signed lineage being written: of a `Task` it runs step by step (`start`), or of a loop its
  user owns and records step by step (`open`); see the module doc."""

  def __init__(
    self,
    layout: RunLayout,
    task: Task | None,
    state: TrainState | None,
    writer: log.LineageWriter,
    checkpoints: Checkpoints,
    *,
    run_id: str,
    checkpoint_every: int,
    checkpointed: Iterable[int],
    trust: TrustStore = TrustStore({}),
    used_tokens: Iterable[str] = (),
    on_reject: str = "record",
    admission: Admission | None = None,
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
    self.on_reject = on_reject
    # who admits examples: the run's own (an own loop) or the task's (`GovernedTask.admission`)
    self.admission = admission if task is None else getattr(task, "admission", None)
    self._step = 0 if state is None else int(jax.device_get(state.step))
    self._checkpointed = set(int(s) for s in checkpointed)
    self._closed = False
    self._staged: collections.deque = collections.deque()  # ids for summaries `emit` sends
    self._emitted_any = False
    self._emit_error: BaseException | None = None
    self.compiled: CompiledPolicy | None = getattr(task, "compiled", None)

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
    on_reject: str = "record",
    mesh: Any = None,
    distributed: bool | None = None,
  ) -> GovernedRun:
    """Create `run_dir` (empty or absent), record run-start and checkpoint the initial state.

    `task` is "module:attr" (see `aqgov.lineage.task`); `policies`, `profiles` and `manifests`
    are signed documents (`SignedDocument`, `Manifest`) or their files, copied into the run
    directory (an unsigned `Policy` or `EntropyProfile` object is refused: nothing vouches for
    it); `trust` are the public keys of the authorities whose documents the run relies on (copied
    into keys/); `parent` is the directory of the run this one continues (its last signed head is
    recorded). Without `key` a run key is generated into `key_dir` (default
    `$XDG_CONFIG_HOME/aqgov/keys/<run_id>/`, never inside `run_dir`); only its public half, in the
    run role, goes to keys/run.pub, so it never verifies as the signer of a policy, profile,
    override or manifest. `witnesses` are (url, witness key) pairs: each signed head is submitted
    to them for a cosignature, and `close` fails unless all cosign the final one. `on_reject`
    says what `step` does with examples the task's admission refuses: "record" leaves them out of
    the step and lists them, with the reason, in its record; "raise" raises `AdmissionError`.

    `mesh` and `distributed` spread the run over processes (`aqgov.lineage.distributed`): with
    `jax.distributed` initialized for several processes every process calls `start` alike and
    `step`s with its shard of each batch; only process 0 needs `key`/`key_dir`, and only it
    writes and signs the lineage.
    """
    placed = dist.placement(mesh, distributed)
    if placed is not None and not placed.writes:
      return dist.join_start(
        cls,
        RunLayout(run_dir),
        placed,
        task,
        task_config,
        trust,
        checkpoint_every,
        max_to_keep,
        on_reject,
      )
    if checkpoint_every < 1:
      raise LineageError(f"checkpoint_every must be at least 1, got {checkpoint_every}")
    task_config = dict(task_config or {})
    canonical.encode([task_config, dict(config or {})])  # fail here, not on the writer thread
    trusted = _trusted(trust)
    docs = _documents(policies, profiles, manifests)
    begun = _begin(run_dir, run_id, key, key_dir, trusted, parent, witnesses, docs, on_reject)
    # the task is built from what the run directory now holds
    the_task = load_task(task, task_config, begun.layout.root, trust=begun.authorities)
    task_sha256 = trustlib.task_source_sha256(task)
    body = begun.run_start(
      groups=tuple(the_task.group_names),
      classes=tuple(getattr(the_task, "class_names", ())),
      task=task,
      task_config=task_config,
      config={
        **dict(config or {}),
        **({"task_sha256": task_sha256} if task_sha256 else {}),
        **({"norms": the_task.norms_config} if hasattr(the_task, "norms_config") else {}),
      },
      lineage={"checkpoint_every": checkpoint_every, "head_every": head_every, "fsync": fsync},
      compiled=getattr(the_task, "compiled", None),
    )
    writer = log.LineageWriter.create(
      begun.layout.lineage,
      begun.key,
      body,
      fsync=fsync,
      head_every=head_every,
      witnesses=begun.witnesses,
    )
    if placed is not None:
      writer = dist.SharedWriter(placed, writer)
    dist.announce(placed, "start", {"run_id": begun.run_id})
    run = cls(
      begun.layout,
      the_task,
      the_task.init() if placed is None else placed.place_state(the_task.init()),
      writer,
      Checkpoints(begun.layout.checkpoints, max_to_keep=max_to_keep),
      run_id=begun.run_id,
      checkpoint_every=checkpoint_every,
      checkpointed=(),
      trust=begun.authorities,
      on_reject=on_reject,
      distributed=placed,
    )
    run.checkpoint()
    return run

  @classmethod
  def open(
    cls,
    run_dir: str | os.PathLike,
    *,
    policies: Iterable[Document],
    trust: TrustStore | Iterable[PublicKey | str | os.PathLike],
    compiled: CompiledPolicy | None = None,
    params: Any = None,
    manifests: Iterable[Document] = (),
    profiles: Iterable[Document] = (),
    key: SigningKey | None = None,
    key_dir: str | os.PathLike | None = None,
    run_id: str | None = None,
    parent: str | os.PathLike | None = None,
    config: Mapping[str, Any] | None = None,
    head_every: int = 1024,
    fsync: str = "tree-head",
    max_to_keep: int | None = None,
    witnesses: Sequence[tuple[str, Any]] = (),
    on_reject: str = "record",
  ) -> GovernedRun:
    """Create `run_dir` for a training loop its user owns, and record run-start.

    The run owns nothing of the training code: the user's jitted step returns (or `emit`s) a
    `StepSummary` (`aqgov.lineage.routed_summary`), `record(summary, batch)` appends it to the
    signed lineage, `checkpoint(params, opt_state=...)` saves the state the user holds, and
    `close(...)` ends the run. Run-start records the documents' digests, the group and route class
    names of `compiled` and no task (`config.task` nil), so such a run verifies, is queried and
    exported like any other, but `replay` needs a task named by its caller (`ReplayUnavailable`).

    The policies, profiles and credential manifests (`SignedDocument`s, `Manifest`s or their
    files) are verified against `trust` before anything is written, and copied in. Give either
    `compiled`, which must be compiled from exactly the signed `policies` (their ids are
    checked), or `params` (the parameter pytree, or its shapes), and the run compiles the
    verified policies against it and the manifests' label space (`run.compiled`). With `manifests`,
    `admit(examples)` admits batches against them, and `on_reject` says what happens to the
    examples it refuses: "record" (left out of the batch, listed in the step's record with the
    reason) or "raise" (`AdmissionError`). The other arguments are those of `start`.
    """
    trusted = _trusted(trust)
    authorities = TrustStore.of(trusted)
    docs = _documents(policies, profiles, manifests)
    for doc in docs["profiles"]:
      verify(PROFILE, doc.signed, authorities)
    held = [Manifest(doc.signed) for doc in docs["manifests"]]
    for m in held:
      verify(MANIFEST, m.document, authorities)
    mode = "collect" if on_reject == "record" else "raise"
    admission = Admission(authorities, held, on_reject=mode) if held else None
    verified = [verify(POLICY, doc.signed, authorities) for doc in docs["policies"]]
    if (compiled is None) == (params is None):
      raise PolicyError(
        "GovernedRun.open needs exactly one of compiled= (a CompiledPolicy compiled from the "
        "signed policies given) or params= (the parameter pytree the run compiles them for)"
      )
    if compiled is None:
      space = None if admission is None else admission.label_space
      compiled = compile_policy(verified, params, space)
    _check_policies(compiled, docs["policies"])
    if config is not None:
      canonical.encode(dict(config))  # fail here, not on the writer thread
    begun = _begin(run_dir, run_id, key, key_dir, trusted, parent, witnesses, docs, on_reject)
    body = begun.run_start(
      groups=compiled.group_names,
      classes=compiled.class_names,
      task=None,
      task_config={},
      config=dict(config or {}),
      lineage={"head_every": head_every, "fsync": fsync},
      compiled=compiled,
    )
    writer = log.LineageWriter.create(
      begun.layout.lineage,
      begun.key,
      body,
      fsync=fsync,
      head_every=head_every,
      witnesses=begun.witnesses,
    )
    run = cls(
      begun.layout,
      None,
      None,
      writer,
      Checkpoints(begun.layout.checkpoints, max_to_keep=max_to_keep),
      run_id=begun.run_id,
      checkpoint_every=1,
      checkpointed=(),
      trust=authorities,
      on_reject=on_reject,
      admission=admission,
    )
    run.compiled = compiled
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
    if start["config"].get("task") is None:
      raise LineageError(
        f"run {start['run_id']} records a loop its user owns (GovernedRun.open, no task), which "
        "resume cannot re-run; continue it as a child run: GovernedRun.open(NEW_DIR, ..., "
        f"parent={str(run_dir)!r})",
        index=0,
      )
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
      on_reject=settings.get("on_reject", "raise"),
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

  def step(self, examples: Sequence[Example | Mapping[str, Any]]) -> StepSummary | None:
    """Run one step of the task on `examples` (in loader order), record it, and checkpoint when due.

    Examples the task's admission refuses are left out of the step and listed in its record
    (`on_reject="record"`); when it refuses every one, no update is taken, an "event" record
    lists them and `None` is returned (the step number does not advance)."""
    self._check_open()
    if self.task is None:
      raise LineageError(
        "this run records a loop you own (GovernedRun.open): call run.record(summary, batch) "
        "after each of your steps"
      )
    exs = [as_example(e) for e in examples]
    if not exs:
      raise LineageError(
        f"step {self._step + 1} was given no examples; a recorded step trains on at least one, "
        "so skip empty batches in the data loader"
      )
    exs, rejected = self._screen(exs)
    if self.distributed is not None:
      self.distributed.check_rows(len(exs), len(rejected))
    if not exs:
      self.record_refused(rejected)
      return None
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
      summary,
      [e.id for e in exs],
      [bytes.fromhex(content_hash(e.content)) for e in exs],
      rejected,
    )
    if self._step % self.checkpoint_every == 0:
      self.checkpoint()
    return summary if gathered is None else gathered  # distributed: the global batch's, on host

  def _screen(self, exs: list[Example]) -> tuple[list[Example], list[Rejection]]:
    """(admitted examples, refusals) under "record"; everything (admission raises later) else."""
    if self.on_reject != "record" or self.admission is None:
      return exs, []
    verdicts = [self.admission.decide(e) for e in exs]
    return (
      [v.example for v in verdicts if v.admitted],
      [v.rejection for v in verdicts if not v.admitted],
    )

  # ---- a loop its user owns ---------------------------------------------------------------------

  def admit(
    self, examples: Iterable[Example | Mapping[str, Any]], *, transform=None
  ) -> AdmittedBatch:
    """Admit a batch against the run's verified manifests (labels come only from credentials).

    `transform(example) -> model inputs` is stacked on a leading batch axis (`batch.inputs`).
    Under `on_reject="record"` refused examples ride in `batch.rejected` and `record(summary,
    batch)` lists them in the step's record; under "raise" the first raises `AdmissionError`. A
    batch refused whole has no ids: skip the step and `record_refused(batch.rejected)`."""
    self._check_open()
    if self.admission is None:
      raise LineageError(
        "this run admits nothing: open it with the credential manifests (manifests=) to admit "
        "examples against them"
      )
    return self.admission.admit(examples, transform=transform)

  def record(
    self,
    summary: StepSummary,
    examples: AdmittedBatch | Sequence[str],
    *,
    example_sha256: Sequence[bytes | str] | None = None,
    rejected: Iterable[Rejection | tuple[str, str]] = (),
  ) -> int:
    """Append the step `summary` describes to the signed lineage; the step number recorded.

    `examples` is the `AdmittedBatch` the step trained on (ids, content hashes and refusals come
    from it), or the host-side id list (`summary.example_index` points into it) with optional
    `example_sha256` and `rejected`. The summary's step must be the next one: one more than the
    last recorded (a step number that goes back or skips one is refused). Only that scalar is
    read here; the writer thread fetches the rest of the summary."""
    self._check_own_loop("record")
    self._raise_emitted(wait=False)
    ids, sha, refused = _batch_ids(examples, example_sha256, rejected)
    return self._record(summary, ids, sha, refused)

  def emit(self, summary: StepSummary) -> None:
    """Inside the user's jitted step: send `summary` to this run through an ordered host callback
    (`jax.experimental.io_callback(..., ordered=True)`), which records it as `record` would.

    Ids never enter jit: `stage(batch)` before each call of the step queues the batch the next
    emitted summary describes (first in, first out). A failure on the callback (no batch staged,
    a step number out of order) is raised by every later call on the run: `checkpoint`, `head`
    and `close` wait for the summaries emitted so far, `stage` and `record` do not."""
    self._emitted_any = True
    io_callback(self._emitted, None, summary, ordered=True)

  def stage(
    self,
    examples: AdmittedBatch | Sequence[str],
    *,
    example_sha256: Sequence[bytes | str] | None = None,
    rejected: Iterable[Rejection | tuple[str, str]] = (),
  ) -> None:
    """Queue the batch (as for `record`) that the next summary `emit` sends describes."""
    self._check_own_loop("stage")
    self._raise_emitted(wait=False)
    self._staged.append(_batch_ids(examples, example_sha256, rejected))

  def record_refused(self, rejected: Iterable[Rejection | tuple[str, str]]) -> None:
    """Record examples refused at admission that no step was given (a batch refused whole, or
    refusals at the loader): an "event" record after the last step lists them with their reasons."""
    self._check_open()
    self.writer.append_record(
      rec.EVENT,
      bodies.event_body(
        step=self._step,
        events={"refused": "refused at admission; no step trained on them"},
        rejected=list(rejected),
      ),
    )

  def _emitted(self, summary: StepSummary) -> None:
    """The host side of `emit`; never raises into XLA (the next call on the run does, and every
    one after it: once a summary is lost the staged batches no longer line up, so the run must be
    abandoned and resumed or restarted)."""
    if self._emit_error is not None:
      return
    try:
      if not self._staged:
        raise LineageError(
          "a step emitted its summary but no batch was staged for it: call run.stage(batch) "
          "before each call of the jitted step"
        )
      self._record(summary, *self._staged.popleft())
    except BaseException as exc:
      if self._emit_error is None:
        self._emit_error = exc

  def _record(self, summary: StepSummary, ids, sha, rejected) -> int:
    step = int(np.asarray(summary.step))
    if step != self._step + 1:
      raise LineageError(
        f"the summary is of step {step}, but the last recorded step is {self._step}, so step "
        f"{self._step + 1} comes next: "
        + (
          "a step number never goes back; record each step once, in order"
          if step <= self._step
          else f"step(s) {self._step + 1}..{step - 1} were not recorded; record every step "
          "(summary.step counts the updates applied including this one, from 1)"
        )
      )
    self.writer.append(summary, ids, sha, rejected)
    self._step = step
    return step

  def _raise_emitted(self, *, wait: bool = True) -> None:
    """Raise a failure of `_emitted`; with `wait`, first let every summary emitted so far arrive
    (`stage` and `record` do not wait, so the host keeps dispatching steps ahead)."""
    if wait and self._emitted_any:
      jax.effects_barrier()
    exc = self._emit_error
    if exc is not None:
      if isinstance(exc, LineageError):
        raise exc
      raise LineageError(f"recording an emitted step summary failed: {exc}") from exc

  def _check_own_loop(self, what: str) -> None:
    self._check_open()
    if self.task is not None:
      raise LineageError(
        f"run.{what} is for a loop you own (GovernedRun.open); this run runs its task: call "
        "run.step(examples)"
      )

  # ---- checkpoints, events, the end -------------------------------------------------------------

  def _state_to_save(self, state: Any, opt_state: Any, governance: Any) -> TrainState:
    if self.task is not None:
      if state is not None:
        raise LineageError("this run checkpoints its task's state; call run.checkpoint()")
      return self.state
    if state is None:
      raise LineageError(
        "this run records a loop you own: pass the state you hold, "
        "run.checkpoint(params, opt_state=opt_state)"
      )
    if not isinstance(state, TrainState):
      return TrainState(jnp.int32(self._step), state, opt_state, governance)
    if int(jax.device_get(state.step)) != self._step:
      raise LineageError(
        f"the state is of step {int(jax.device_get(state.step))}, but the last recorded step is "
        f"{self._step}; checkpoint the state the recorded steps produced"
      )
    return state

  def checkpoint(self, state: Any = None, *, opt_state: Any = (), governance: Any = ()) -> int:
    """Checkpoint the state now (once it is complete, a "checkpoint" record names it).

    A task's run saves its own state; a loop its user owns passes what it holds: a `TrainState`
    of the last recorded step, or the params (any pytree) with `opt_state` and `governance`,
    saved as the state after the last recorded step."""
    self._check_open()
    self._raise_emitted()
    to_save = self._state_to_save(state, opt_state, governance)
    step = int(jax.device_get(to_save.step))
    if step in self._checkpointed:
      return step
    head = self.writer.flush(sign_head=True)
    saved = self.checkpoints.save(to_save, head, self.run_id)
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
    if isinstance(exc.state, TrainState) and self.task is not None:
      self.state = exc.state
      self._step = int(jax.device_get(exc.state.step))
    own = self.task is None
    ck = None if own and exc.state is None else self.checkpoint(exc.state if own else None)
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
    self._raise_emitted()
    return self.writer.flush(sign_head=sign)

  def close(
    self,
    state: Any = None,
    *,
    status: str = "completed",
    checkpoint: bool = True,
    opt_state: Any = (),
    governance: Any = (),
  ) -> log.LogHead:
    """Checkpoint the final state (unless told not to), write run-end and sign the final head.

    A loop its user owns passes its final state as for `checkpoint`; without one nothing is saved."""
    if self._closed:
      raise LineageError("this run is already closed")
    self._raise_emitted()
    if checkpoint and (self.task is not None or state is not None):
      self.checkpoint(state, opt_state=opt_state, governance=governance)
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


def _batch_ids(
  examples: AdmittedBatch | Sequence[str],
  example_sha256: Sequence[bytes | str] | None,
  rejected: Iterable[Rejection | tuple[str, str]],
) -> tuple[list[str], list[bytes | str] | None, list[dict]]:
  """(ids, content hashes, refusals in wire form) of the batch a step trained on."""
  if isinstance(examples, AdmittedBatch):
    if example_sha256 is not None:
      raise LineageError("an AdmittedBatch carries its content hashes; pass no example_sha256")
    return (
      list(examples.ids),
      [bytes.fromhex(content_hash(c)) for c in examples.content],
      rec.rejected_to_wire([*examples.rejected, *rejected]),
    )
  if isinstance(examples, str):
    raise LineageError("pass the list of example ids the batch was built from, not one string")
  sha = None if example_sha256 is None else list(example_sha256)
  return list(examples), sha, rec.rejected_to_wire(rejected)


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
