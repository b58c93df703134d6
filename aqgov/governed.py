"""One governed training step, and a `Task` that builds it from the documents in a run directory.

`governed_step(loss_fn, compiled, optimizer, profile=...)` is the pure step the design calls for:

    routed gradients  g_l = (1/B) sum_i w_i[l] grad_l L_i        (aqgov.routed_value_and_grad)
    entropy measurements of representations and routed gradients (aqgov.entropy.measure)
    enforcement of the profile around the optimizer                (aqgov.enforce)
    strict mode: unreached groups get exactly no update            (aqgov.strict)
    a StepSummary for the lineage                                  (aqgov.lineage.summarize)

`GovernedTask` is the `aqgov.lineage.Task` of a run whose policies, profile and credential
manifests were copied into its directory: it verifies them against the run's trusted keys (given
from outside the directory: `trust=`, or the `RunContext` a governed run passes; never a key file
found in the run directory), admits
each batch against the manifests (labels come from credentials, never from the loader), compiles
the policy, and raises `GovernanceEscalation` at the step boundary when the profile says so.
Replay rebuilds the same task from the same directory.

Escalations are resolved through the run directory: an override token placed in
`RUN/overrides/*.override` is checked by `aqgov.entropy.admit_override` (signed by one of the
profile's override authorities, this run's id, not expired now) when the task is built, so
`GovernedRun.resume(RUN, trust=...)` re-runs the escalated step with the violation admitted;
record it with `run.record_override(token)`. A token the lineage already records is checked as of
its record (its step, and its expiry at the time it was recorded), so replay works after it expired.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aqgov.credentials._admission import Admission
from aqgov.credentials._manifest import MANIFEST, Example
from aqgov.documents._document_type import DocumentType, read, verify
from aqgov.documents._keys import TrustStore
from aqgov.documents._signing import verify_signatures
from aqgov.entropy._enforce import (
  check_escalation,
  enforce,
  enforce_state,
  route_bounds,
  route_weights,
)
from aqgov.entropy._metrics import measure
from aqgov.entropy._overrides import OVERRIDE, Override, admit_override
from aqgov.entropy._profile import PROFILE, EntropyProfile
from aqgov.errors import (
  GovernanceEscalation,
  LineageError,
  NonFiniteError,
  OverrideError,
  PolicyError,
  RoutingError,
)
from aqgov.lineage._log import LogReader
from aqgov.lineage._summary import (
  DROP_REASONS,
  FINITE,
  NONFINITE_GRADIENT,
  NONFINITE_LOSS,
  StepSummary,
  summarize,
)
from aqgov.lineage._task import TrainState
from aqgov.policy._compile import CompiledPolicy, compile_policy
from aqgov.policy._policy import POLICY
from aqgov.routing._site_stats import norm_spec
from aqgov.routing._sketch import SketchSpec
from aqgov.routing._transforms import strict as strict_transform
from aqgov.routing._value_and_grad import gradient_sketches, routed_value_and_grad


class GovernanceState(NamedTuple):
  """Governance state a governed step carries besides the optimizer's (checkpointed with it).

  nonfinite: bool [G] — groups whose routed gradient, update or updated parameters (or the loss)
    were NaN/inf at the last step, which was therefore not applied.
  """

  nonfinite: jax.Array


StepFn = Callable[[TrainState, Any, Mapping[str, jax.Array]], tuple[TrainState, StepSummary]]


def governed_optimizer(
  optimizer: optax.GradientTransformation,
  compiled: CompiledPolicy,
  *,
  profile: EntropyProfile | None = None,
  strict: bool = False,
  overrides: Sequence[Any] = (),
) -> optax.GradientTransformationExtraArgs:
  """`optimizer`, wrapped by the profile's enforcement and followed by strict mode when asked."""
  tx = optax.with_extra_args_support(optimizer)
  if profile is not None:
    tx = enforce(profile, compiled, tx, overrides=overrides)
  if strict:
    tx = optax.chain(tx, strict_transform(compiled))
  return tx


def group_finite(grads: Any, loss: jax.Array, compiled: CompiledPolicy) -> jax.Array:
  """bool [G]: every entry of the group's leaves (or slices of leaves) in `grads` (gradients,
  updates or params, in the params' structure), and the loss, is finite."""
  finite = [jnp.all(jnp.isfinite(g)) for g in compiled.parts(grads)]
  per_group = jnp.ones((compiled.num_groups,), bool)
  for leaf_ok, g in zip(finite, compiled.part_group):
    per_group = per_group.at[g].set(per_group[g] & leaf_ok)
  return per_group & jnp.isfinite(loss)


ON_NONFINITE = ("fail", "drop_example")


def offending_rows(losses: jax.Array, norms: jax.Array) -> jax.Array:
  """int8 [B]: why each example would make the step non-finite (`FINITE`, `NONFINITE_LOSS`, or
  `NONFINITE_GRADIENT`: a non-finite per-example contribution norm in some group)."""
  bad_loss = ~jnp.isfinite(losses)
  bad_grad = ~jnp.all(jnp.isfinite(norms), axis=-1)
  return jnp.where(
    bad_loss, NONFINITE_LOSS, jnp.where(bad_grad, NONFINITE_GRADIENT, FINITE)
  ).astype(jnp.int8)


def _substitute_rows(inputs: Any, drop: jax.Array) -> Any:
  """`inputs` with each dropped row replaced by the first kept row: a dropped example then has
  finite values as well as weight 0, so no routing strategy can carry its inf/NaN anywhere."""
  donor = jnp.argmax(~drop)

  def one(x):
    mask = jnp.reshape(drop, (-1,) + (1,) * (jnp.ndim(x) - 1))
    return jnp.where(mask, x[donor], x)

  return jax.tree.map(one, inputs)


def applied_weights(
  weights: jax.Array, routing: jax.Array, scale: jax.Array, applied: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """(float32 [B, G] effective weights, float32 [G] applied scale) of one step: the policy
  `weights` times the `routing` factor the gradient was taken with (fallback routes, dropped
  examples), times the per-group `scale` enforcement applied (pause, reroute, freeze), all 0
  where the step was not `applied`."""
  scale = jnp.where(applied, scale, 0.0).astype(jnp.float32)
  effective = jnp.where((routing == 0) | (scale == 0)[None, :], 0.0, weights * routing * scale)
  return effective.astype(jnp.float32), scale


def governed_step(
  loss_fn: Callable,
  compiled: CompiledPolicy,
  optimizer: optax.GradientTransformation,
  *,
  profile: EntropyProfile | None = None,
  has_aux: bool = False,
  strategy: str = "auto",
  strict: bool = False,
  overrides: Sequence[Any] = (),
  fingerprint_seed: int = 0,
  microbatch: int | None = None,
  norms: str = "exact",
  norms_sketch_dim: int = 64,
  norms_sketch_seed: int = 0,
  on_nonfinite: str = "fail",
  sketch: SketchSpec | None = None,
) -> tuple[optax.GradientTransformationExtraArgs, StepFn]:
  """The optimizer to `init` the state with, and the pure step `(state, batch, labels) -> (state, summary)`.

  `loss_fn(params, example)` is the per-example loss; with `has_aux` it returns `(loss, aux)` where
  `aux` holds the representations the profile names. `batch` is `{"inputs": pytree with a leading
  batch axis, "index": int32 [B]}` (row -> position in the host-side id list). With `sketch`
  (opt-in) the summary also carries [B, G, dim] sketches of each example's routed gradient, which
  a governed run writes to its sketch store for attribution (`aqgov.lineage.attribute`).

  `on_nonfinite`: `"fail"` (default) applies nothing when anything is NaN/inf and the summary's
  `dropped` names the offending rows; `"drop_example"` gives the offending examples (non-finite
  loss or contribution norm) weight 0 in every group and recomputes the step without them (only
  when there is one: a `lax.cond`), recording them in `dropped`; the loss is then the mean over
  the kept examples and the gradient keeps its 1/B (as for any example routed away). A step still
  non-finite after that (e.g. a NaN learning rate) fails closed as with `"fail"`.

  `norms` says which per-example contribution norms the summary records: `"exact"`, or
  `"sketch"` (unbiased estimates from `norms_sketch_dim` projections seeded by
  `norms_sketch_seed`, see `routed_value_and_grad`); `norms_config` gives the run-start record's
  account of it.
  """
  norms_config(
    norms, norms_sketch_dim, norms_sketch_seed
  )  # refuses what routing would refuse, here
  if on_nonfinite not in ON_NONFINITE:
    raise RoutingError(f"on_nonfinite = {on_nonfinite!r}; use one of {list(ON_NONFINITE)}")
  tx = governed_optimizer(optimizer, compiled, profile=profile, strict=strict, overrides=overrides)
  governed = profile is not None
  routes = governed and bool(route_bounds(profile))
  drop_examples = on_nonfinite == "drop_example"

  def with_losses(params, example):  # per-example losses ride in aux to find offending examples
    out = loss_fn(params, example)
    loss, aux = out if has_aux else (out, None)
    return loss, (aux, loss)

  grad_fn = routed_value_and_grad(
    with_losses,
    compiled,
    strategy,
    has_aux=True,
    with_norms=norms,
    sketch_dim=norms_sketch_dim,
    sketch_seed=norms_sketch_seed,
    microbatch=microbatch,
    sketch=sketch,
  )

  def step(state: TrainState, batch: Mapping[str, Any], labels: Mapping[str, jax.Array]):
    weights = compiled.group_weights(labels)
    routing = route_weights(state.opt_state, compiled, labels) if routes else jnp.ones_like(weights)
    scale_arg = routing if routes else None
    out = grad_fn(state.params, batch["inputs"], labels, scale_arg)
    (_, (_, losses)), _, norms, *_ = out
    offending = offending_rows(losses, norms)
    if drop_examples:
      drop = offending != FINITE

      def without_offenders(_):
        inputs = _substitute_rows(batch["inputs"], drop)
        return grad_fn(state.params, inputs, labels, routing * ~drop[:, None])

      out = jax.lax.cond(jnp.any(drop), without_offenders, lambda _: out, None)
      routing = jnp.where(drop[:, None], 0.0, routing)
    (mean_loss, (aux, losses)), grads, norms, *sketched = out
    if drop_examples:
      kept = offending == FINITE
      kept_mean = jnp.sum(jnp.where(kept, losses, 0.0)) / jnp.maximum(jnp.sum(kept), 1)
      loss = jnp.where(jnp.all(kept), mean_loss, kept_mean.astype(mean_loss.dtype))
    else:
      loss = mean_loss
    aux = aux if has_aux else None
    measurements = measure(profile, compiled, grads=grads, representations=aux) if governed else {}
    # enforcement numbers steps like the lineage: the step being taken is state.step + 1
    extra = {"measurements": measurements, "step": state.step + 1} if governed else {}
    updates, opt_state = tx.update(grads, state.opt_state, state.params, labels=labels, **extra)
    # fail closed: a NaN/inf gradient, loss, update (a NaN learning rate) or resulting parameter is
    # never applied, not even to the finite groups
    stepped = optax.apply_updates(state.params, updates)
    finite = (
      group_finite(grads, loss, compiled)
      & group_finite(updates, loss, compiled)
      & group_finite(stepped, loss, compiled)
    )
    ok = jnp.all(finite)
    params = jax.tree.map(lambda new, old: jnp.where(ok, new, old), stepped, state.params)
    opt_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), opt_state, state.opt_state)
    escalated = enforce_state(opt_state).escalated if governed else jnp.zeros((), bool)
    number = jnp.where(escalated | ~ok, state.step, state.step + 1).astype(jnp.int32)
    group_scale = (
      enforce_state(opt_state).applied_scale if governed else jnp.ones((compiled.num_groups,))
    )
    effective, applied_scale = applied_weights(weights, routing, group_scale, ok)
    summary = summarize(
      step=number,
      example_index=batch["index"],
      route_class=compiled.route_class(labels),
      weights=weights,
      contribution_norms=norms,
      loss=loss,
      params=compiled.parts(params),  # a sliced leaf fingerprints each slice into its group
      leaf_group=compiled.part_group,
      key=fingerprint_seed,
      measurements=measurements,
      events=enforce_state(opt_state).events if governed else (),
      seen=compiled.group_visibility(labels) if compiled.has_visibility else None,
      applied_weights=effective,
      applied_scale=applied_scale,
      dropped=offending,
      sketch=sketched[0] if sketched else None,
    )
    return TrainState(number, params, opt_state, GovernanceState(~finite)), summary

  return tx, step


def norms_config(norms: str = "exact", sketch_dim: int = 64, sketch_seed: int = 0) -> dict:
  """What a run's contribution norms are, as its run-start record states it (`config.norms`):
  `{"kind": "exact"}` or `{"kind": "sketch", "sketch_dim": k, "sketch_seed": s}`."""
  if norms not in ("exact", "sketch"):
    raise RoutingError(f"norms must be 'exact' or 'sketch', got {norms!r}")
  spec = norm_spec(norms, sketch_dim, sketch_seed)
  if spec.kind == "exact":
    return {"kind": "exact"}
  return {"kind": "sketch", "sketch_dim": spec.sketch_dim, "sketch_seed": spec.seed}


def _verified(doc_type: DocumentType, paths: Sequence[Path], trust: TrustStore) -> list:
  return [verify(doc_type, read(doc_type, p), trust) for p in paths]


def run_overrides(
  run_dir: Path, trust: TrustStore, authorities: Sequence[str] | None = None
) -> list[Override]:
  """The override tokens of a run, each checked once by `admit_override` (see the module doc):
  those its lineage records (as of their records) and those waiting in `run_dir/overrides/`."""
  paths = sorted((run_dir / "overrides").glob("*.override"))
  lineage = run_dir / "lineage"
  records = (
    list(LogReader(lineage, bodies=("run-start", "override")))
    if (lineage / "segments").is_dir()
    else []
  )
  if paths and not records:
    raise OverrideError(
      f"{run_dir} has override tokens but no lineage; start the run before admitting overrides"
    )
  if not records:
    return []
  run_id = records[0].body["run_id"]
  out, used = {}, set()
  for r in records:
    if r.kind == "override":
      at = dt.datetime.fromtimestamp(float(r.body["time"]), dt.UTC)
      o = admit_override(
        bytes(r.body["token"]),
        trust,
        run_id,
        now=at,
        step=int(r.body["step"]),
        used=used,
        authorities=authorities,
      )
      used.add(o.id)
      out[o.id] = o
  for path in paths:
    token = read(OVERRIDE, path)
    if token.id not in out:
      out[token.id] = admit_override(token, trust, run_id, authorities=authorities)
  return list(out.values())


def _signer_names(doc_type: DocumentType, signed: Any, trust: TrustStore) -> tuple[str, ...]:
  return verify_signatures(signed, trust, roles=doc_type.signer_roles)


class GovernedTask:
  """A `Task` governed by the signed documents in `run_dir` (policies/, profiles/, manifests/, keys/).

  Args:
    run_dir: the run directory (`aqgov.lineage.GovernedRun` copies the documents in).
    loss_fn: per-example loss `(params, inputs) -> (loss, aux)`, `aux` holding the representations
      an entropy profile may name (an empty dict when there are none).
    init_params: `() -> params`, deterministic (replay calls it again).
    make_inputs: `Example -> model inputs` for one example (stacked by admission).
    optimizer: the Optax optimizer.
    strategy, strict, microbatch: as for `routed_value_and_grad` / `governed_optimizer`.
    norms, norms_sketch_dim, norms_sketch_seed: which contribution norms the lineage records (as
      for `governed_step`); `GovernedRun.start` records `norms_config` in the run-start `config`.
    on_nonfinite: `"fail"` (default) or `"drop_example"`, as for `governed_step`.
    seed: fingerprint projection seed.
    sketch: a `SketchSpec` to record per-example gradient sketches (opt-in; see `governed_step`).
    overrides: verified override tokens admitted for this run, besides those in `run_dir/overrides/`.
    trust: the authority keys to verify the documents with; defaults to the `trust` of the
      `RunContext` a governed run passes as `run_dir`. Key files in the run directory never count.

  `override_authorities` names who may sign override tokens: the profile's `override_authorities`,
  else its `authority`, else the authorities that signed it (none without a profile).
  """

  def __init__(
    self,
    run_dir: str | Path,
    *,
    loss_fn: Callable,
    init_params: Callable[[], Any],
    make_inputs: Callable[[Example], Any],
    optimizer: optax.GradientTransformation,
    strategy: str = "auto",
    strict: bool = False,
    microbatch: int | None = None,
    seed: int = 0,
    overrides: Sequence[Any] = (),
    trust: TrustStore | None = None,
    norms: str = "exact",
    norms_sketch_dim: int = 64,
    norms_sketch_seed: int = 0,
    on_nonfinite: str = "fail",
    sketch: SketchSpec | None = None,
  ):
    trust = getattr(run_dir, "trust", None) if trust is None else trust
    if not isinstance(trust, TrustStore):
      raise LineageError(
        "GovernedTask needs the trusted authority keys: pass trust= (a TrustStore of keys obtained "
        "out of band), or build it through GovernedRun, which passes those run-start records"
      )
    run_dir = Path(run_dir)
    self.trust = trust
    self.norms_config = norms_config(norms, norms_sketch_dim, norms_sketch_seed)
    self.on_nonfinite = on_nonfinite
    # composed in name order, so route class names do not depend on document ids
    policies = sorted(
      _verified(POLICY, sorted((run_dir / "policies").glob("*.signed")), self.trust),
      key=lambda p: p.name,
    )
    if not policies:
      raise PolicyError(
        f"{run_dir / 'policies'} holds no signed policy; a governed run needs at least one"
      )
    profile_files = [read(PROFILE, p) for p in sorted((run_dir / "profiles").glob("*.signed"))]
    if len(profile_files) > 1:
      raise PolicyError(
        f"{run_dir / 'profiles'} holds {len(profile_files)} profiles; a run is bounded by one"
      )
    self.profile = verify(PROFILE, profile_files[0], self.trust) if profile_files else None
    self.override_authorities: tuple[str, ...] = ()
    if self.profile is not None:
      self.override_authorities = self.profile.override_authorities or (
        (self.profile.authority,)
        if self.profile.authority
        else _signer_names(PROFILE, profile_files[0], self.trust)
      )
    manifests = [read(MANIFEST, p) for p in sorted((run_dir / "manifests").glob("*.signed"))]
    self.admission = Admission(self.trust, manifests, on_reject="raise")
    self._init_params, self._make_inputs = init_params, make_inputs
    self.compiled = compile_policy(
      policies, jax.eval_shape(init_params), self.admission.label_space
    )
    self.group_names = self.compiled.group_names
    self.class_names = self.compiled.class_names
    self.optimizer, step = governed_step(
      loss_fn,
      self.compiled,
      optimizer,
      profile=self.profile,
      has_aux=True,
      strategy=strategy,
      strict=strict,
      overrides=[*overrides, *run_overrides(run_dir, self.trust, self.override_authorities)],
      fingerprint_seed=seed,
      microbatch=microbatch,
      norms=norms,
      norms_sketch_dim=norms_sketch_dim,
      norms_sketch_seed=norms_sketch_seed,
      on_nonfinite=on_nonfinite,
      sketch=sketch,
    )
    self.step_without_checks = jax.jit(step)
    self.sketch_spec = sketch
    self._loss_fn, self._strategy = loss_fn, strategy
    self._sketcher: Callable | None = None
    self._batch_ids: tuple[Any, tuple[str, ...]] = (
      None,
      (),
    )  # (index array, ids) of the last batch

  def _offenders(self, batch: Any, summary: StepSummary) -> str:
    """A sentence naming the examples that made a step non-finite, and what to do."""
    why = np.asarray(jax.device_get(summary.dropped))
    rows = np.flatnonzero(why)
    if not rows.size:
      return "No single example is non-finite: check the learning rate and the optimizer. "
    names = self._row_names(batch, rows)
    listed = "; ".join(f"{n} ({DROP_REASONS[int(why[r])]})" for n, r in zip(names, rows))
    if self.on_nonfinite == "drop_example":
      return (
        f"Dropping example(s) {listed} did not make it finite: check the learning rate and the "
        "optimizer. "
      )
    return (
      f"Non-finite example(s): {listed}. Remove them from the batch, or train with "
      "on_nonfinite='drop_example' to drop such examples from their step (recorded). "
    )

  def sketch_examples(
    self, params: Any, examples: Sequence[Example], group_weights: Any = None
  ) -> np.ndarray:
    """[N, G, dim] sketches of `examples`' gradients at `params`, projected as the run's steps
    project theirs (weights [N, G], default 1: a probe shapes every group). The examples are not
    admitted: a probe is the auditor's question, not training data."""
    if self.sketch_spec is None:
      raise LineageError("this task records no sketches; build it with sketch=SketchSpec(...)")
    if self._sketcher is None:
      self._sketcher = jax.jit(
        gradient_sketches(
          self._loss_fn,
          self.sketch_spec,
          self.compiled.leaf_group,
          self.compiled.num_groups,
          has_aux=True,
          strategy=self._strategy,
        )
      )
    inputs = jax.tree.map(lambda *xs: np.stack(xs), *[self._make_inputs(e) for e in examples])
    return np.asarray(self._sketcher(params, inputs, group_weights))

  def init(self) -> TrainState:
    params = self._init_params()
    governance = GovernanceState(jnp.zeros((self.compiled.num_groups,), bool))
    return TrainState(jnp.zeros((), jnp.int32), params, self.optimizer.init(params), governance)

  def make_batch(self, examples: Sequence[Example]) -> tuple[dict, dict]:
    """Admit `examples` against the run's manifests: labels come only from verified credentials."""
    admitted = self.admission.admit(examples, transform=self._make_inputs)
    index = np.arange(len(admitted.ids), dtype=np.int32)
    self._batch_ids = (index, tuple(admitted.ids))
    return {"inputs": admitted.inputs, "index": index}, admitted.labels

  def _row_names(self, batch: Any, rows: np.ndarray) -> list[str]:
    """Example ids of batch `rows` when the batch is the one `make_batch` built last, else rows."""
    index, ids = self._batch_ids
    positions = np.asarray(jax.device_get(batch["index"]))[rows]
    if batch.get("index") is index:
      return [ids[int(p)] for p in positions]
    return [f"row {int(r)}" for r in rows]

  def step(self, state: TrainState, batch: Any, labels: Any) -> tuple[TrainState, StepSummary]:
    """`step_without_checks`, then raise for a non-finite step or an escalation (host side)."""
    new_state, summary = self.step_without_checks(state, batch, labels)
    nonfinite = np.asarray(jax.device_get(new_state.governance.nonfinite))
    if nonfinite.any():
      groups = ", ".join(g for g, bad in zip(self.group_names, nonfinite) if bad)
      raise NonFiniteError(
        f"step {int(jax.device_get(state.step)) + 1}: the loss, or the routed gradient, update or updated "
        f"parameters of group(s) {groups} is NaN/inf, so the step was not applied (parameters and optimizer "
        f"state are unchanged). {self._offenders(batch, summary)}The run stays resumable from its last "
        "checkpoint."
      )
    if self.profile is not None:
      try:
        check_escalation(new_state.opt_state, self.profile, self.compiled)
      except GovernanceEscalation as exc:
        raise GovernanceEscalation(
          f"{exc}\nIn a governed run: write the token to RUN/overrides/, then GovernedRun.resume(RUN) and "
          "run.record_override(token) before stepping again.",
          step=exc.step,
          events=exc.events,
          state=new_state,
        ) from None
    return new_state, summary
