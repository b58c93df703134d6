"""The Task protocol: the training step a governed run records and replay re-executes.

A run-start record stores `config.task = "module:attr"` and `config.task_config` (a canonical map).
`attr` is a factory called as `factory(task_config, run_dir)` returning a `Task`; the run directory
lets the task find what was copied into it (policies/, manifests/, profiles/), so replay works
wherever the run directory has been moved. It is passed as a `RunContext`: path-like (so
`Path(run_dir)` works) and carrying `trust`, the authority keys the run trusts (exactly those its
run-start record lists, supplied from outside the run directory), which a task that verifies
documents must use instead of any key file it finds. Training and replay call the task the same way:

    state = task.init()                                   # deterministic: the same every call
    batch, labels = task.make_batch(examples)             # host: examples -> device-ready arrays
    state, summary = task.step(state, batch, labels)      # usually jitted; pure

`examples` is a sequence of `aqgov.credentials.Example` (id, content bytes, labels) in the order the
loader produced them; `summary.example_index` maps batch rows back to positions in that sequence.
`step` must be a pure function of its inputs (no host randomness, no wall clock): replay checks
that it reproduces the recorded fingerprints bit for bit. Keep PRNG keys inside the state (as raw
uint32 key data, which checkpoints store as plain arrays). `aqgov.examples.task` is a small
complete Task to copy from.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

from aqgov.credentials._manifest import Example
from aqgov.documents._keys import TrustStore
from aqgov.errors import LineageError
from aqgov.lineage._summary import Array, PyTree, StepSummary


class TrainState(NamedTuple):
  """Everything a governed step carries from one step to the next; what checkpoints hold.

  step: int32 [] — number of updates applied so far (0 before the first step).
  params: the model parameters (any pytree).
  opt_state: the optax state.
  governance: any pytree of arrays — enforcement state, reroute tables, PRNG key data, ...
  """

  step: Array
  params: PyTree
  opt_state: PyTree
  governance: PyTree = ()


class RunContext(NamedTuple):
  """The run directory a task factory gets: path-like, with the authority keys the run trusts."""

  root: Path
  trust: TrustStore

  def __fspath__(self) -> str:
    return os.fspath(self.root)


@runtime_checkable
class Task(Protocol):
  """A training job that a governed run records and replay re-executes (see the module doc)."""

  group_names: Sequence[str]

  def init(self) -> TrainState: ...

  def make_batch(self, examples: Sequence[Example]) -> tuple[PyTree, Mapping[str, Array]]: ...

  def step(
    self, state: TrainState, batch: PyTree, labels: Mapping[str, Array]
  ) -> tuple[TrainState, StepSummary]: ...


def load_task(
  ref: str, config: Mapping[str, Any], run_dir: str | os.PathLike, trust: TrustStore | None = None
) -> Task:
  """Import `module:attr` and build the task: `attr(config, run_dir)`.

  Only call it with a reference the caller trusts (see `aqgov.lineage._trust.resolve_task`); with
  `trust`, `run_dir` is passed as a `RunContext` carrying it.
  """
  module_name, sep, attr = str(ref).partition(":")
  if not sep or not module_name or not attr:
    raise LineageError(
      f"task reference {ref!r} is not 'module:attr' (e.g. 'aqgov.examples.task:make_task')"
    )
  try:
    module = importlib.import_module(module_name)
  except ImportError as exc:
    raise LineageError(
      f"cannot import task module {module_name!r} ({exc}); install it or put it on PYTHONPATH "
      "before replaying"
    ) from None
  factory = getattr(module, attr, None)
  if not callable(factory):
    raise LineageError(
      f"{module_name} has no callable {attr!r}; the run-start task reference is {ref!r}"
    )
  task = factory(dict(config), Path(run_dir) if trust is None else RunContext(Path(run_dir), trust))
  if not isinstance(task, Task):
    raise LineageError(
      f"{ref} returned {type(task).__name__}, which lacks group_names/init/make_batch/step"
    )
  return task
