"""Governed runs over many processes: JAX's multi-controller runtime, one process per host.

Every process runs the same `GovernedRun` loop on the same run directory (a filesystem all hosts
share, as Orbax requires) and feeds `step` its own shard of the global batch. Per step:

- each process admits its examples against the manifests (`task.make_batch`, on its shard only);
- the shards become one global batch over the mesh (`jax.make_array_from_process_local_data`,
  rows split over every mesh axis), the state is replicated, and the jitted step routes and
  measures the global batch;
- the summary is gathered (`multihost_utils.process_allgather`) together with every process's
  example ids and content hashes, in global batch order;
- every process builds the canonical step record and the processes compare its SHA-256 (time
  left out); a disagreement (a host whose replicated parameters diverged, a loader that fed
  different ids than it admitted) raises `LineageError` on every process, naming those that
  differ from process 0, and nothing is written;
- process 0 alone holds the lineage writer and the run key, and signs; checkpoints are saved and
  restored by all processes (Orbax's multi-process `CheckpointManager`, primary host 0).

Start and resume hand what only process 0 knows (the run id, the checkpoint to restore, the log
head a checkpoint is bound to) to the others through the distributed runtime. A process that
dies stops the others at the runtime's heartbeat timeout (`jax.distributed.initialize(...,
heartbeat_timeout_seconds=)`); the lineage stays intact up to its last record, and all processes
`resume` together.

A mesh with Explicit axes is used with its devices and axis names as Auto axes: the run places
the batch and the state itself, and the routed per-example gradient (a vmap over the batch)
cannot be traced over a batch axis that is explicitly sharded.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from aqgov.documents import _canonical as canonical
from aqgov.documents._keys import TrustStore
from aqgov.errors import LineageError
from aqgov.lineage import _log as log
from aqgov.lineage import _record as rec
from aqgov.lineage import _trust as trustlib
from aqgov.lineage._checkpoint import Checkpoints
from aqgov.lineage._heads import LogHead
from aqgov.lineage._summary import StepSummary
from aqgov.lineage._task import load_task

# environment variables by which cluster launchers say how many processes they started
LAUNCHERS = {
  "SLURM_NTASKS": "SLURM",
  "OMPI_COMM_WORLD_SIZE": "Open MPI",
  "PMI_SIZE": "an MPI launcher",
}
ANNOUNCE_TIMEOUT_S = 600
_announcements = itertools.count()  # every process announces and waits in the same order


def launched_processes() -> tuple[str, int] | None:
  """(variable, count) when a cluster launcher says it started more than one process."""
  for var in LAUNCHERS:
    try:
      n = int(os.environ.get(var, "1"))
    except ValueError:
      continue
    if n > 1:
      return var, n
  return None


def require_initialized(requested: bool = False) -> None:
  """Refuse to read the process index before `jax.distributed.initialize`: before it, every
  process reports index 0 (and reading it makes a later initialize fail)."""
  if jax.distributed.is_initialized():
    return
  if requested:
    raise LineageError(
      "a multi-process governed run was requested (distributed=True) but "
      "jax.distributed.initialize() has not been called in this process; call it on every "
      "process before any JAX computation (with no arguments under SLURM, Open MPI or on a "
      "TPU pod slice, or with coordinator_address, num_processes and process_id)"
    )
  launched = launched_processes()
  if launched is not None:
    var, n = launched
    raise LineageError(
      f"this process is one of {n} started by {LAUNCHERS[var]} ({var}={n}), but "
      "jax.distributed.initialize() has not been called, so every process would act as "
      "process 0 and write its own lineage; call jax.distributed.initialize() before any JAX "
      "computation"
    )


def process_index(*, distributed: bool = False) -> int:
  """`jax.process_index()`, refusing to answer before `jax.distributed.initialize` in a
  multi-process job (see `require_initialized`)."""
  require_initialized(distributed)
  return jax.process_index()


def auto_axes(mesh: Mesh) -> Mesh:
  """`mesh` with its Explicit axes made Auto (see the module doc); Manual axes are refused."""
  types = tuple(getattr(mesh, "axis_types", ()) or ())
  if any(t == AxisType.Manual for t in types):
    raise LineageError(
      "a governed run cannot be placed on a mesh with Manual axes (inside shard_map); pass the "
      "mesh itself, built with jax.make_mesh or jax.sharding.Mesh"
    )
  if all(t == AxisType.Auto for t in types):
    return mesh
  return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def _as_bits(dtype: np.dtype) -> np.dtype:
  """The unsigned integer type with `dtype`'s bits (bool: uint8)."""
  return np.dtype(np.uint8) if dtype == np.bool_ else np.dtype(f"uint{8 * dtype.itemsize}")


@jax.jit
def _pack(parts: list[jax.Array]) -> jax.Array:
  """[B, k] uint32: the bits of each [B, ...] array side by side, for one all-gather of all."""
  cols = []
  for x in parts:
    x = x.reshape(x.shape[0], -1)
    bits = (
      x.astype(np.uint8)
      if x.dtype == np.bool_
      else jax.lax.bitcast_convert_type(x, _as_bits(x.dtype))
    )
    if x.dtype.itemsize > 4:  # 64-bit: two uint32 words per entry
      bits = jax.lax.bitcast_convert_type(bits, np.uint32)
    cols.append(bits.reshape(x.shape[0], -1).astype(np.uint32))
  return jax.numpy.concatenate(cols, axis=1)


def _unpack(packed: np.ndarray, parts: list[jax.Array]) -> list[np.ndarray]:
  """The arrays `_pack` packed, from the host copy of its result."""
  out, col = [], 0
  for x in parts:
    words = int(np.prod(x.shape[1:], dtype=np.int64)) * max(x.dtype.itemsize // 4, 1)
    bits = np.ascontiguousarray(packed[:, col : col + words])
    col += words
    if x.dtype.itemsize < 4:
      bits = bits.astype(_as_bits(x.dtype))
    value = bits.astype(bool) if x.dtype == np.bool_ else bits.view(x.dtype)
    out.append(value.reshape(x.shape))
  return out


def _on_device(x: Any) -> bool:
  return isinstance(x, jax.Array)


def _distributed_leaf(x: Any) -> bool:
  """A leaf of the step's output that this process holds only part of."""
  return _on_device(x) and not x.sharding.is_fully_replicated


def _bytes_row(data: bytes, length: int) -> np.ndarray:
  row = np.zeros((length,), np.uint8)
  row[: len(data)] = np.frombuffer(data, np.uint8)
  return row


class DataParallel:
  """Where a governed run's steps execute: data parallel over `mesh`, across its processes.

  `writes` is true on process 0, which alone writes and signs the lineage. Built by
  `GovernedRun.start/resume(..., mesh=, distributed=)` through `placement`.
  """

  def __init__(self, mesh: Mesh, *, timeout_s: float = ANNOUNCE_TIMEOUT_S):
    self.mesh = auto_axes(mesh)
    self.process, self.processes = jax.process_index(), jax.process_count()
    self.writes = self.process == 0
    self.timeout_s = float(timeout_s)
    in_mesh = {d.process_index for d in self.mesh.devices.flat}
    if in_mesh != set(range(self.processes)):
      missing = sorted(set(range(self.processes)) - in_mesh)
      raise LineageError(
        f"the mesh has no device of process(es) {', '.join(map(str, missing))}; a governed run "
        "spans every process: build the mesh over jax.devices()"
      )
    self.rows = NamedSharding(self.mesh, P(tuple(self.mesh.axis_names)))
    self.replicated = NamedSharding(self.mesh, P())
    self.local_devices = sum(d.process_index == self.process for d in self.mesh.devices.flat)
    self.gathered_bytes = 0  # what this process received from the step gathers so far
    self.record_seconds = 0.0  # time spent gathering, building and agreeing on step records

  # ---- placing --------------------------------------------------------------------------------

  def place_state(self, state: Any) -> Any:
    """`state` (the same on every process) replicated over the mesh."""
    return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(self.replicated, np.asarray(x)), state
    )

  def check_rows(self, admitted: int, refused: int) -> None:
    """Every process admitted as many examples this step, and at least one (or all raise)."""
    counts = self._allgather(np.asarray([admitted, refused], np.int64))
    rows = counts[:, 0].tolist()
    if len(set(rows)) > 1 or rows[0] == 0:
      raise LineageError(
        f"the processes admitted {rows} examples this step (by process index; "
        f"{counts[:, 1].tolist()} refused); a distributed step needs the same number of rows, at "
        "least one, from every process, so nothing was recorded: replace refused examples in "
        "the loader (refusals are recorded with the step that leaves them out) and resume"
      )

  def place_batch(self, batch: Any, labels: Any) -> tuple[Any, Any]:
    """This process's admitted shard as its part of the global batch (rows over the mesh)."""
    leaves = jax.tree.leaves((batch, labels))
    rows = {np.shape(x)[0] for x in leaves}
    if len(rows) != 1 or next(iter(rows)) % self.local_devices:
      raise LineageError(
        f"process {self.process} fed a batch whose arrays have {sorted(rows)} rows; every "
        f"array needs the same number of rows, a multiple of this process's "
        f"{self.local_devices} device(s) (pad with example_index -1 rows if needed)"
      )
    put = lambda x: jax.make_array_from_process_local_data(self.rows, np.asarray(x))  # noqa: E731
    return jax.tree.map(put, batch), jax.tree.map(put, labels)

  # ---- gathering ------------------------------------------------------------------------------

  def _allgather(self, x: np.ndarray) -> np.ndarray:
    """[processes, ...]: `x` from every process, stacked by process index."""
    if self.processes == 1:
      return np.asarray(x)[None]
    return np.asarray(multihost_utils.process_allgather(np.asarray(x)))

  def record(
    self,
    summary: StepSummary,
    ids: Sequence[str],
    sha256: Sequence[bytes],
    rejected: Sequence[Any] = (),
  ) -> tuple[StepSummary, dict]:
    """The gathered host summary and the step record body (time 0) every process agreed on."""
    started = time.perf_counter()
    if getattr(summary, "sketch", None) is not None:  # every process has the same summary fields
      raise LineageError(
        "a distributed run does not record gradient sketches yet (the writer stores them from "
        "one process's summary); build the task without sketch= to run it over processes"
      )
    rows = int(np.shape(summary.example_index)[0]) // self.processes
    id_bytes, sha_bytes = "\x00".join(ids).encode("utf-8"), b"".join(sha256)
    refused = canonical.encode(rec.rejected_to_wire(rejected))
    start = min(
      (i[0].start or 0)
      for i in self.rows.addressable_devices_indices_map((rows * self.processes,)).values()
    )
    counts = self._allgather(np.asarray([len(ids), len(id_bytes), start, len(refused)], np.int64))
    order = np.argsort(counts[:, 2], kind="stable")  # processes in global row order
    width, most = int(counts[:, 1].max()), int(counts[:, 0].max()) * 32 * bool(sha_bytes)
    packed = self._allgather(
      np.concatenate(
        [
          _bytes_row(id_bytes, width),
          _bytes_row(sha_bytes, most),
          _bytes_row(refused, int(counts[:, 3].max())),
        ]
      )
    )
    all_ids: list[str] = []
    all_sha: list[bytes] = []
    all_refused: list[dict] = []
    offset = np.zeros((self.processes,), np.int64)
    for p in order:
      offset[p] = len(all_ids)
      n = int(counts[p, 0])
      all_ids.extend(bytes(packed[p, : counts[p, 1]]).decode("utf-8").split("\x00"))
      all_sha.extend(bytes(packed[p, width + 32 * k : width + 32 * (k + 1)]) for k in range(n))
      all_refused.extend(canonical.decode(bytes(packed[p, width + most :][: counts[p, 3]])))
    host = jax.device_get(summary) if self.processes == 1 else self._gather(summary)
    host = jax.tree.map(np.asarray, host)
    index = host.example_index.astype(np.int64)
    owner = order[np.arange(index.shape[0]) // rows]
    host = host._replace(
      example_index=np.where(index >= 0, index + offset[owner], -1).astype(np.int32)
    )
    body = rec.step_body(host, all_ids, all_sha if sha_bytes else None, time_s=0.0)
    body = rec.with_rejected(body, [(r["id"], r["reason"]) for r in all_refused])
    self.gathered_bytes += (
      counts.nbytes + packed.nbytes + self._gathered_summary_bytes(summary)
    ) * (self.processes > 1) + 32 * self.processes
    self.agree(hashlib.sha256(rec.encode_step_body(body)).digest(), f"step {body['step']}")
    self.record_seconds += time.perf_counter() - started
    return host, body

  @staticmethod
  def _gathered_summary_bytes(tree: Any) -> int:
    return sum(
      x.dtype.itemsize * int(np.prod(x.shape, dtype=np.int64))
      for x in jax.tree.leaves(tree)
      if _distributed_leaf(x)
    )

  def _gather(self, tree: Any) -> Any:
    """`tree` on the host: replicated leaves from this process's own copy (so that the record
    digest compares each process's replica), the others in one all-gather of their bits."""
    leaves, treedef = jax.tree.flatten(tree)
    split = [k for k, x in enumerate(leaves) if _distributed_leaf(x)]
    out = [
      None if k in split else np.asarray(x.addressable_data(0) if _on_device(x) else x)
      for k, x in enumerate(leaves)
    ]
    if split:
      parts = [leaves[k] for k in split]
      packed = np.asarray(multihost_utils.process_allgather(_pack(parts), tiled=True))
      for k, value in zip(split, _unpack(packed, parts), strict=True):
        out[k] = value
    return jax.tree.unflatten(treedef, out)

  def agree(self, digest: bytes, what: str) -> None:
    """Every process holds the same `digest` of `what`, or every process raises `LineageError`."""
    digests = self._allgather(np.frombuffer(digest, np.uint8))
    differ = [p for p in range(self.processes) if not np.array_equal(digests[p], digests[0])]
    if differ:
      raise LineageError(
        f"{what}: process(es) {', '.join(map(str, differ))} computed a different record than "
        f"process 0 (SHA-256 {bytes(digests[differ[0]]).hex()[:16]}... vs "
        f"{bytes(digests[0]).hex()[:16]}...), so nothing was recorded and the run stops: their "
        "replicated state or their examples differ; resume all processes from the last "
        "checkpoint"
      )

  def share_head(self, head: LogHead | None) -> LogHead:
    """Process 0's log head, on every process."""
    if self.processes == 1:
      assert head is not None
      return head
    row = np.zeros((72,), np.uint8)
    if head is not None:
      row[:8] = np.frombuffer(np.int64(head.size).tobytes(), np.uint8)
      row[8:40] = np.frombuffer(head.root, np.uint8)
      row[40:] = np.frombuffer(head.last_record, np.uint8)
    out = np.asarray(multihost_utils.broadcast_one_to_all(row))
    size = int(np.frombuffer(out[:8].tobytes(), np.int64)[0])
    return LogHead(size, bytes(out[8:40]), bytes(out[40:]))

  # ---- announcements from process 0 -----------------------------------------------------------

  def announce(self, what: str, value: Mapping[str, Any] | None = None, error: str = "") -> None:
    """Process 0 tells the others `value` (or that it failed with `error`)."""
    key = f"aqgov/announcement/{next(_announcements)}"  # an early failure answers the next wait
    if self.processes > 1 and self.writes:
      _client().key_value_set(key, json.dumps({"value": dict(value or {}), "error": error}))

  def wait(self, what: str) -> dict[str, Any]:
    """What process 0 announced as `what` (the others call this where process 0 announces)."""
    key = f"aqgov/announcement/{next(_announcements)}"
    try:
      got = json.loads(_client().blocking_key_value_get(key, int(self.timeout_s * 1000)))
    except Exception as exc:  # the runtime's timeout or a lost coordinator
      raise LineageError(
        f"process {self.process} waited {self.timeout_s:.0f} s for process 0 to {what} the run "
        f"and heard nothing ({type(exc).__name__}); see process 0's log for why it stopped"
      ) from None
    if got["error"]:
      raise LineageError(f"process 0 could not {what} the run: {got['error']}")
    return got["value"]


def announce(
  placed: DataParallel | None, what: str, value: Mapping[str, Any] | None = None, error: str = ""
) -> None:
  """`placed.announce(...)` in a distributed run; nothing in a plain one."""
  if placed is not None:
    placed.announce(what, value, error)


def _client() -> Any:
  from jax._src import distributed  # the coordination service's key-value store

  return distributed.global_state.client


def placement(mesh: Mesh | None, distributed: bool | None) -> DataParallel | None:
  """The `DataParallel` placement a run asked for, or None for a plain one-process run.

  `distributed=None` is automatic: a run is distributed when `jax.distributed` is initialized
  with more than one process (or a mesh is given); `True` requires it to be initialized."""
  require_initialized(bool(distributed))
  multi = jax.distributed.is_initialized() and jax.process_count() > 1
  if mesh is None and not multi:
    if distributed:
      return DataParallel(Mesh(np.asarray(jax.devices()), ("data",)))
    return None
  if distributed is False and multi:
    raise LineageError(
      "distributed=False, but this is one of several JAX processes; a governed run spans them "
      "all (leave distributed unset), or give each process its own run directory before "
      "jax.distributed.initialize"
    )
  return DataParallel(mesh if mesh is not None else Mesh(np.asarray(jax.devices()), ("data",)))


class SharedWriter:
  """The lineage writer of a distributed run: process 0's `LineageWriter`, none elsewhere.

  `append` gathers and checks the step on every process (see `DataParallel.record`) and writes
  it on process 0; heads are shared so that every process binds its checkpoint to the same one.
  """

  def __init__(self, placement: DataParallel, writer: Any | None):
    self.placement, self.writer = placement, writer

  @property
  def run_id(self) -> str | None:
    return None if self.writer is None else self.writer.run_id

  @property
  def last_step(self) -> int:
    return 0 if self.writer is None else self.writer.last_step

  @property
  def cpu_seconds(self) -> float:
    return 0.0 if self.writer is None else self.writer.cpu_seconds

  def append(
    self,
    summary: StepSummary,
    ids: Sequence[str],
    sha256: Sequence[bytes] | None = None,
    rejected: Sequence[Any] = (),
  ) -> StepSummary:
    host, body = self.placement.record(summary, ids, sha256 or [], rejected)
    if self.writer is not None:
      self.writer.append_step_body({**body, "time": time.time()})
    return host

  def append_record(self, kind: str, body: Mapping[str, Any]) -> None:
    if self.writer is not None:
      self.writer.append_record(kind, body)

  def flush(self, *, sign_head: bool = False) -> LogHead:
    head = None if self.writer is None else self.writer.flush(sign_head=sign_head)
    return self.placement.share_head(head)

  def close(self, *, status: str = "completed", step: int | None = None) -> LogHead:
    head = None if self.writer is None else self.writer.close(status=status, step=step)
    return self.placement.share_head(head)

  def abandon(self) -> None:
    if self.writer is not None:
      self.writer.abandon()


def join_start(
  cls: Any,
  layout: Any,
  placed: DataParallel,
  task: str,
  task_config: Mapping[str, Any] | None,
  trust: Any,
  checkpoint_every: int,
  max_to_keep: int | None,
  on_reject: str = "record",
) -> Any:
  """`GovernedRun.start` on a process other than 0: once process 0 has written run-start, build
  the same task from the run directory and checkpoint the initial state with it."""
  started = placed.wait("start")
  authorities = TrustStore.of(trustlib.as_trust_store(trust).keys.values())
  the_task = load_task(task, dict(task_config or {}), layout.root, trust=authorities)
  run = cls(
    layout,
    the_task,
    placed.place_state(the_task.init()),
    SharedWriter(placed, None),
    Checkpoints(layout.checkpoints, max_to_keep=max_to_keep),
    run_id=started["run_id"],
    checkpoint_every=checkpoint_every,
    checkpointed=(),
    trust=authorities,
    on_reject=on_reject,
    distributed=placed,
  )
  run.checkpoint()
  return run


def join_resume(
  cls: Any, layout: Any, placed: DataParallel, trust: Any, max_to_keep: int | None
) -> Any:
  """`GovernedRun.resume` on a process other than 0: process 0 checks the log and names the
  checkpoint; every process restores it (and deletes the superseded ones) together."""
  placed.wait("resume")  # process 0 checked the log, the documents and the task code
  start = next(iter(log.LogReader(layout.lineage))).body
  authorities = trustlib.recorded_trust(start, trustlib.as_trust_store(trust), exact=True)
  config = start["config"]
  task = load_task(config["task"], config.get("task_config", {}), layout.root, trust=authorities)
  checkpoints = Checkpoints(layout.checkpoints, max_to_keep=max_to_keep)
  resumed = placed.wait("resume")
  state, step = placed.place_state(task.init()), resumed["checkpoint"]
  if step is not None:
    state = checkpoints.restore(int(step), state).state
  placed.wait("resume")  # process 0 checked the restored state against the lineage
  for s in resumed["delete"]:
    checkpoints.delete(int(s))
  placed.wait("resume")
  run = cls(
    layout,
    task,
    state,
    SharedWriter(placed, None),
    checkpoints,
    run_id=start["run_id"],
    checkpoint_every=int(config.get("lineage", {}).get("checkpoint_every", 100)),
    checkpointed=() if step is None else (int(step),),
    trust=authorities,
    on_reject=config.get("lineage", {}).get("on_reject", "raise"),
    distributed=placed,
  )
  if step is None:
    run.checkpoint()
  return run
