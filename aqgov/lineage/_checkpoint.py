"""Orbax checkpoints of a governed run, bound to its lineage.

Each checkpoint directory `checkpoints/<step>/` holds two Orbax items: `state` (the `TrainState`:
params, optimizer state, governance state) and `lineage` (JSON: run id, step, the log head — size,
Merkle root, last record hash — at the moment the checkpoint was taken, and `digests`, the SHA-256
of each state item computed like `params_sha256`).

Orbax writes a checkpoint into a temporary directory and renames it into place only when every
item is complete, so an interrupted write never shows up among `steps()`. On top of that, a
checkpoint counts for a governed run only when the lineage holds a "checkpoint" record for it,
written after the save returned, with the item digests and the SHA-256 of the finished files
(`aqgov.lineage.checkpoint_files`); `restore` recomputes the item digests so that the run (see
`aqgov.lineage.run` for the resume rule), replay and export refuse a checkpoint that differs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

from aqgov.errors import CheckpointError
from aqgov.lineage._checkpoint_files import files_sha256
from aqgov.lineage._heads import LogHead
from aqgov.lineage._summary import params_sha256
from aqgov.lineage._task import TrainState


def state_digests(state: TrainState) -> dict[str, str]:
  """Hex SHA-256 of each checkpointed item of `state` (`params_sha256` of params, optimizer state,
  governance state)."""
  return {
    "params": params_sha256(state.params),
    "opt_state": params_sha256(state.opt_state),
    "governance": params_sha256(state.governance),
  }


class Saved(NamedTuple):
  """A finished checkpoint: where it is, its item digests and the digest of its files."""

  path: Path
  digests: dict[str, str]
  files_sha256: str


class Restored(NamedTuple):
  """A restored checkpoint: the state, the log head it was taken at, and the digests of what was
  restored (`digests`) and of what the checkpoint's lineage item says was saved (`recorded`)."""

  state: TrainState
  head: LogHead
  run_id: str
  params_sha256: str
  digests: dict[str, str]
  recorded: dict[str, Any]


class Checkpoints:
  """Save and restore `TrainState` checkpoints (synchronously: a checkpoint record may only be
  written once the checkpoint is complete)."""

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = None):
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=True,
      enable_async_checkpointing=False,
      cleanup_tmp_directories=True,
    )
    self._manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=("state", "lineage")
    )

  def steps(self) -> tuple[int, ...]:
    """Steps of the complete checkpoints on disk, ascending."""
    self._manager.reload()
    return tuple(sorted(self._manager.all_steps()))

  def path(self, step: int) -> Path:
    return self.directory / str(int(step))

  def save(self, state: TrainState, head: LogHead, run_id: str) -> Saved:
    """Write a checkpoint of `state` at `state.step`, recording the log `head` and the item digests."""
    step = int(jax.device_get(state.step))
    if step in self.steps():
      raise CheckpointError(
        f"a checkpoint for step {step} already exists in {self.directory}; a resumed run "
        "deletes checkpoints it supersedes before saving again"
      )
    digests = state_digests(state)
    lineage = {"run_id": run_id, "step": step, **head.to_wire(), "digests": digests}
    try:
      self._manager.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), lineage=ocp.args.JsonSave(lineage)
        ),
      )
      self._manager.wait_until_finished()
    except Exception as exc:
      raise CheckpointError(
        f"saving the checkpoint for step {step} in {self.directory} failed ({exc}); "
        "no checkpoint record was written, so it will not be trusted"
      ) from exc
    return Saved(self.path(step), digests, files_sha256(self.path(step)))

  def restore(self, step: int, template: TrainState) -> Restored:
    """The checkpoint at `step`, restored into the structure (and shardings) of `template`."""
    if step not in self.steps():
      raise CheckpointError(
        f"no complete checkpoint for step {step} in {self.directory} (have {list(self.steps())})"
      )
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    try:
      out = self._manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), lineage=ocp.args.JsonRestore()
        ),
      )
    except Exception as exc:
      raise CheckpointError(
        f"checkpoint {self.path(step)} cannot be restored ({type(exc).__name__}: {exc}); "
        "it is damaged or was written for a different model"
      ) from None
    state = out.state if isinstance(out.state, TrainState) else TrainState(*out.state)
    lineage = out.lineage
    head = LogHead.from_wire(
      lineage, CheckpointError, f"the lineage item of checkpoint {self.path(step)}"
    )
    if not isinstance(lineage.get("run_id"), str):
      raise CheckpointError(
        f"the lineage item of checkpoint {self.path(step)} names no run id; it is damaged"
      )
    recorded = lineage.get("digests") or {}
    if not isinstance(recorded, dict):
      raise CheckpointError(
        f"the lineage item of checkpoint {self.path(step)} has malformed digests; it is damaged"
      )
    digests = state_digests(state)
    return Restored(state, head, lineage["run_id"], digests["params"], digests, dict(recorded))

  def delete(self, step: int) -> None:
    self._manager.delete(int(step))

  def close(self) -> None:
    self._manager.close()
