"""Typed errors. Each says what was wrong and what to do about it."""

from __future__ import annotations

from typing import Any


class AqgovError(Exception):
  """Base class of every error aqgov raises on purpose."""


class KeyFileError(AqgovError):
  """A key file is missing, malformed or has unsafe permissions."""


class SignatureError(AqgovError):
  """A signature does not verify, or its key is not trusted."""


class NoteError(SignatureError):
  """A signed note, checkpoint or cosignature is malformed, or carries no valid signature by a known key."""


class TaxonomyError(AqgovError):
  """A taxonomy is malformed, or labels do not fit it."""


class CredentialError(AqgovError):
  """A credential manifest or an example's credential is missing, forged or mismatched."""


class AdmissionError(CredentialError):
  """An example cannot be admitted; `reason` says why."""

  def __init__(self, message: str, *, example_id: str | None = None, reason: str = ""):
    super().__init__(message)
    self.example_id = example_id
    self.reason = reason


class PolicyError(AqgovError):
  """A routing policy (or its expression) is malformed, unsigned or untrusted."""


class RoutingError(AqgovError):
  """Routed gradients cannot be computed with the requested strategy."""


class NonFiniteError(RoutingError):
  """The loss or a routed gradient is NaN or infinite: the step was not applied."""


class UnsupportedPrimitiveError(RoutingError):
  """The cotangent strategy met a construct it cannot transform; `primitive` names it."""

  def __init__(self, message: str, *, primitive: str | None = None):
    super().__init__(message)
    self.primitive = primitive


class BatchCouplingError(RoutingError):
  """The loss mixes examples (BatchNorm, cross-example ops): per-example routing would be wrong."""


class ProfileError(AqgovError):
  """An entropy profile is malformed, unsigned or untrusted."""


class OverrideError(AqgovError):
  """An override token is forged, expired, untrusted or does not cover what it claims."""


class GovernanceEscalation(AqgovError):
  """Training stopped at a step boundary for a human; the state to resume from is attached.

  `events` are the entropy `Event`s that escalated; `state` is the pytree to resume from (the
  optax state, or the governed `TrainState`). Both are typed loosely: errors sit below every layer.
  """

  def __init__(
    self, message: str, *, step: int | None = None, events: tuple[Any, ...] = (), state: Any = None
  ):
    super().__init__(message)
    self.step = step
    self.events = events
    self.state = state


class LineageError(AqgovError):
  """A lineage log is truncated, tampered, or inconsistent; `index` names the first bad record."""

  def __init__(self, message: str, *, index: int | None = None):
    super().__init__(message)
    self.index = index


class ReplayDivergence(LineageError):
  """Replaying recorded steps did not reproduce the record; `step`, `field` (the record field),
  `group` and `example_id` say where."""

  def __init__(
    self,
    message: str,
    *,
    index: int | None = None,
    step: int | None = None,
    group: str | None = None,
    example_id: str | None = None,
    field: str | None = None,
  ):
    super().__init__(message, index=index)
    self.step = step
    self.group = group
    self.example_id = example_id
    self.field = field


class ReplayUnavailable(LineageError):
  """A run cannot be replayed as recorded: it records no task (a loop its user owns, recorded with
  `GovernedRun.open`), so there is no step code to re-execute."""


class WitnessError(LineageError):
  """A witness refused a checkpoint, could not be reached, or did not cosign; `status` is its HTTP status."""

  def __init__(self, message: str, *, status: int | None = None, size: int | None = None):
    super().__init__(message)
    self.status = status
    self.size = size


class CheckpointError(AqgovError):
  """A checkpoint is missing, incomplete, or does not match the lineage."""


class IntegrationError(AqgovError):
  """An experiment tracker's run disagrees with the signed lineage, or an upload would carry a private file."""


class ReportError(AqgovError):
  """An audit report cannot be built from what was given."""


class GateError(AqgovError):
  """A deployment gate's input is bad: a requirement outside the grammar, a malformed rules file."""
