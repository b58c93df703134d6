"""Enforcement of entropy profiles inside the step: pause, reroute, escalate, overrides, events."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aqgov
from aqgov.documents import _keys as keys
from aqgov.documents._document_type import sign
from aqgov.entropy import _metrics as entropy
from aqgov.entropy._enforce import check_escalation, decode_events, enforce, enforce_state
from aqgov.entropy._overrides import OVERRIDE, Override, admit_override, host_mask
from aqgov.entropy._profile import Bound, EntropyProfile, Representation
from aqgov.errors import GovernanceEscalation, OverrideError, ProfileError
from aqgov.routing._value_and_grad import routed_value_and_grad

import attention_models as am

RUN = "run-7"
NOW = "2026-03-01T12:00:00Z"
LATER = "2026-03-02T12:00:00Z"
GROUPS = ("embed", "core", "head")


def _params():
  return {
    "embed": {"w": jnp.arange(4.0)},
    "core": {"w": jnp.arange(3.0) - 1.0},
    "head": {"w": jnp.ones(2)},
  }


def _grads(value=0.5):
  return jax.tree.map(lambda p: jnp.full_like(p, value), _params())


@functools.cache
def _compiled():
  return aqgov.compile_policy(am.policy(), _params(), am.taxonomy())


def _profile(*bounds: Bound, optimizer_state: str = "hold") -> EntropyProfile:
  return EntropyProfile(
    name="synthetic",
    representations=[Representation(path="attention", group="core", kind="attention", heads=2)],
    bounds=bounds,
    optimizer_state=optimizer_state,
  )


def _meas(attn=(0.9, 0.9), core=0.8, embed=0.8, head=0.8):
  return {
    "attention_entropy/core": jnp.asarray(attn, jnp.float32),
    "gradient_entropy/core": jnp.float32(core),
    "gradient_entropy/embed": jnp.float32(embed),
    "gradient_entropy/head": jnp.float32(head),
  }


def _same_bits(a, b) -> bool:
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(
    np.asarray(x).dtype == np.asarray(y).dtype
    and np.asarray(x).tobytes() == np.asarray(y).tobytes()
    for x, y in zip(la, lb)
  )


def _run(tx, measurements, grads=None, params=None, **kwargs):
  """Apply `tx` over a list of measurement dicts; returns [(params, state)] after each step."""
  params = _params() if params is None else params
  grads = _grads() if grads is None else grads
  state = tx.init(params)
  update = jax.jit(lambda g, s, p, m: tx.update(g, s, p, measurements=m, **kwargs))
  out = []
  for m in measurements:
    updates, state = update(grads, state, params, m)
    params = optax.apply_updates(params, updates)
    out.append((params, state))
  return out


# --- in bounds, pause ---------------------------------------------------------------------------


def test_in_bounds_steps_are_exactly_the_inner_optimizer():
  tx = enforce(
    _profile(Bound(group="core", metric="gradient_entropy", low=0.5, action="pause")),
    _compiled(),
    optax.adam(0.1),
  )
  got = _run(tx, [_meas()] * 3)
  inner, p, s = optax.adam(0.1), _params(), optax.adam(0.1).init(_params())
  inner_update = jax.jit(inner.update)
  for _ in range(3):
    u, s = inner_update(_grads(), s, p)
    p = optax.apply_updates(p, u)
  assert _same_bits(got[-1][0], p)
  assert _same_bits(got[-1][1].inner, s)


def test_pause_leaves_params_and_inner_state_bitwise_unchanged():
  tx = enforce(
    _profile(Bound(group="core", metric="gradient_entropy", low=0.5, action="pause")),
    _compiled(),
    optax.adam(0.1),
  )
  params = jax.tree.map(lambda x: x.at[0].set(-0.0), _params())  # signed zeros survive a pause too
  got = _run(tx, [_meas(), _meas(core=0.2)], params=params)
  (p1, s1), (p2, s2) = got
  assert _same_bits(p2, p1) and _same_bits(s2.inner, s1.inner)
  assert int(s2.counters.paused) == 1 and int(s2.step) == 2


def test_nan_measurements_are_not_judged():
  tx = enforce(
    _profile(Bound(group="core", metric="gradient_entropy", low=0.5, high=0.9, action="pause")),
    _compiled(),
    optax.sgd(1.0),
  )
  ((_, state),) = _run(tx, [_meas(core=float("nan"))])
  assert int(state.counters.paused) == 0 and not bool(state.events.out_of_bounds.any())


def test_missing_bounded_measurement_is_a_profile_error():
  tx = enforce(
    _profile(Bound(group="core", metric="gradient_entropy", low=0.5, action="pause")),
    _compiled(),
    optax.sgd(1.0),
  )
  m = _meas()
  del m["gradient_entropy/core"]
  with pytest.raises(ProfileError, match="gradient_entropy/core"):
    _run(tx, [m])


# --- reroute ------------------------------------------------------------------------------------


def _sgd_update(params_before, params_after):
  return jax.tree.map(lambda a, b: b - a, params_before, params_after)


def test_reroute_scales_the_group_gradient_for_duration_steps():
  bound = Bound(
    group="core", metric="gradient_entropy", low=0.5, action="reroute", fallback=0.25, duration=3
  )
  tx = enforce(_profile(bound), _compiled(), optax.sgd(1.0))
  steps = [_meas(), _meas(core=0.1), _meas(), _meas(), _meas()]
  got = _run(tx, steps)
  before = [_params()] + [p for p, _ in got[:-1]]
  core = [float(_sgd_update(b, p)["core"]["w"][0]) for b, (p, _) in zip(before, got)]
  head = [float(_sgd_update(b, p)["head"]["w"][0]) for b, (p, _) in zip(before, got)]
  assert core == [-0.5, -0.125, -0.125, -0.125, -0.5]
  assert head == [-0.5] * 5
  assert [int(s.counters.rerouted[GROUPS.index("core")]) for _, s in got] == [0, 1, 2, 3, 3]


def test_reroute_with_default_duration_holds_only_while_out_of_bounds():
  bound = Bound(group="core", metric="gradient_entropy", low=0.5, action="reroute")
  tx = enforce(_profile(bound), _compiled(), optax.sgd(1.0))
  got = _run(tx, [_meas(core=0.1), _meas(core=0.1), _meas()])
  before = [_params()] + [p for p, _ in got[:-1]]
  core = [float(_sgd_update(b, p)["core"]["w"][0]) for b, (p, _) in zip(before, got)]
  assert core == [0.0, 0.0, -0.5]


def test_with_an_advancing_optimizer_state_only_strict_stops_momentum_of_a_frozen_group():
  bound = Bound(group="core", metric="gradient_entropy", low=0.5, action="reroute", duration=2)
  profile = _profile(bound, optimizer_state="advance")
  loose = _run(
    enforce(profile, _compiled(), optax.sgd(0.1, momentum=0.9)), [_meas(), _meas(core=0.1)]
  )
  strict = _run(
    enforce(profile, _compiled(), optax.sgd(0.1, momentum=0.9), strict=True),
    [_meas(), _meas(core=0.1)],
  )
  held = _run(
    enforce(_profile(bound), _compiled(), optax.sgd(0.1, momentum=0.9)), [_meas(), _meas(core=0.1)]
  )
  moved = lambda run: not _same_bits(run[1][0]["core"], run[0][0]["core"])
  assert moved(loose) and not moved(strict) and not moved(held)
  assert not _same_bits(strict[1][0]["head"], strict[0][0]["head"])


# --- escalate -----------------------------------------------------------------------------------


def test_escalate_stops_without_taking_the_step_and_the_host_raises():
  profile = _profile(Bound(group="core", metric="attention_entropy", low=0.3, action="escalate"))
  tx = enforce(profile, _compiled(), optax.adam(0.1))
  (p1, s1), (p2, s2) = _run(tx, [_meas(), _meas(attn=(0.9, 0.1))])
  assert _same_bits(p2, p1) and _same_bits(s2.inner, s1.inner)
  assert bool(s2.escalated) and int(s2.step) == int(s1.step) == 1
  check_escalation(s1, profile, _compiled())
  with pytest.raises(GovernanceEscalation) as info:
    check_escalation(s2, profile, _compiled(), run_id=RUN)
  exc = info.value
  assert exc.step == 2 and exc.state is s2  # numbered like lineage steps: the first step is 1
  assert [(e.step, e.group, e.metric, e.head, e.bound, e.action) for e in exc.events] == [
    (2, "core", "attention_entropy", 1, "low", "escalate")
  ]
  assert "before applying step 2" in str(exc)
  assert "--steps 2 --groups core --metrics attention_entropy" in str(exc)


def test_escalation_priority_over_pause_over_reroute():
  profile = _profile(
    Bound(group="core", metric="gradient_entropy", low=0.5, action="escalate"),
    Bound(group="embed", metric="gradient_entropy", low=0.5, action="pause"),
    Bound(group="head", metric="gradient_entropy", low=0.5, action="reroute"),
  )
  tx = enforce(profile, _compiled(), optax.sgd(1.0))
  ((_, s_all),) = _run(tx, [_meas(core=0.1, embed=0.1, head=0.1)])
  ((_, s_two),) = _run(tx, [_meas(embed=0.1, head=0.1)])
  assert bool(s_all.escalated) and int(s_all.counters.paused) == 0
  assert not bool(s_two.escalated) and int(s_two.counters.paused) == 1
  assert {e.action for e in decode_events(s_all, profile, _compiled())} == {
    "escalate",
    "pause",
    "reroute",
  }


# --- windows, heads, events ---------------------------------------------------------------------


def test_step_windows_apply_looser_bounds_during_warm_up():
  profile = _profile(
    Bound(group="core", metric="gradient_entropy", low=0.5, action="pause"),
    Bound(group="core", metric="gradient_entropy", low=0.1, steps=(1, 3), action="pause"),
  )
  got = _run(enforce(profile, _compiled(), optax.sgd(1.0)), [_meas(core=0.3)] * 4)
  assert [int(s.counters.paused) for _, s in got] == [0, 0, 1, 2]


def test_per_head_bounds_judge_only_their_heads():
  profile = _profile(
    Bound(group="core", metric="attention_entropy", low=0.5, heads=[1], action="pause")
  )
  ((_, state),) = _run(enforce(profile, _compiled(), optax.sgd(1.0)), [_meas(attn=(0.1, 0.9))])
  assert int(state.counters.paused) == 0
  ((_, state),) = _run(enforce(profile, _compiled(), optax.sgd(1.0)), [_meas(attn=(0.9, 0.1))])
  assert int(state.counters.paused) == 1


def test_events_record_every_out_of_bounds_measurement():
  profile = _profile(
    Bound(group="core", metric="attention_entropy", low=0.5, action="pause"),
    Bound(group="head", metric="gradient_entropy", high=0.7, action="reroute", fallback=0.5),
  )
  got = _run(
    enforce(profile, _compiled(), optax.sgd(1.0)),
    [_meas(head=0.6), _meas(attn=(0.2, 0.3), head=0.75)],
  )
  events = decode_events(got[1][1], profile, _compiled())
  assert sorted((e.step, e.group, e.metric, e.head, e.bound, e.action) for e in events) == [
    (2, "core", "attention_entropy", 0, "low", "pause"),
    (2, "core", "attention_entropy", 1, "low", "pause"),
    (2, "head", "gradient_entropy", None, "high", "reroute"),
  ]
  head = next(e for e in events if e.group == "head")
  assert head.value == pytest.approx(0.75) and head.limit == pytest.approx(0.7)
  assert decode_events(got[0][1], profile, _compiled()) == []
  events_leaf = got[1][1].events
  assert events_leaf.out_of_bounds.shape == (3, len(entropy.METRICS), 2)


def test_enforce_state_is_found_inside_a_chain():
  profile = _profile(Bound(group="core", metric="gradient_entropy", low=0.5, action="pause"))
  tx = optax.chain(optax.clip_by_global_norm(1.0), enforce(profile, _compiled(), optax.sgd(1.0)))
  state = tx.init(_params())
  _, state = jax.jit(functools.partial(tx.update, measurements=_meas(core=0.1)))(
    _grads(), state, _params()
  )
  assert int(enforce_state(state).counters.paused) == 1


# --- overrides ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def authority():
  return keys.generate("safety-officer")


def _token(key, **changes):
  fields = dict(
    run=RUN,
    steps="1-2",
    groups=["core"],
    metrics=["attention_entropy"],
    reason="known warm-up dip",
    expires=LATER,
    issued=NOW,
  )
  fields.update(changes)
  return sign(OVERRIDE, Override.create(**fields), key)


def test_verified_override_names_run_steps_groups_metrics(authority):
  o = admit_override(_token(authority), keys.TrustStore.of([authority]), RUN, now=NOW)
  assert (o.run, o.steps, o.groups, o.metrics, o.signers) == (
    RUN,
    ((1, 3),),
    ("core",),
    ("attention_entropy",),
    ("safety-officer",),
  )
  assert o.covers(2, "core", "attention_entropy") and not o.covers(3, "core", "attention_entropy")


def test_forged_override_is_refused(authority):
  token = _token(authority)
  forged = token._replace(payload=dict(token.payload, groups=["core", "head"]))
  with pytest.raises(OverrideError, match="does not verify"):
    admit_override(forged, keys.TrustStore.of([authority]), RUN, now=NOW)


def test_untrusted_override_is_refused(authority):
  with pytest.raises(OverrideError, match="trusted"):
    admit_override(_token(keys.generate("intern")), keys.TrustStore.of([authority]), RUN, now=NOW)


def test_expired_override_is_refused(authority):
  with pytest.raises(OverrideError, match="expired"):
    admit_override(
      _token(authority), keys.TrustStore.of([authority]), RUN, now="2026-03-03T00:00:00Z"
    )


def test_override_for_another_run_is_refused(authority):
  with pytest.raises(OverrideError, match="run-7"):
    admit_override(_token(authority), keys.TrustStore.of([authority]), "run-8", now=NOW)


def test_enforce_verifies_raw_tokens_and_refuses_without_trust(authority):
  profile = _profile(Bound(group="core", metric="attention_entropy", low=0.3, action="pause"))
  with pytest.raises(OverrideError, match="trust="):
    enforce(profile, _compiled(), optax.sgd(1.0), overrides=[_token(authority)])
  with pytest.raises(OverrideError, match="trusted"):
    enforce(
      profile,
      _compiled(),
      optax.sgd(1.0),
      overrides=[_token(keys.generate("intern"))],
      trust=keys.TrustStore.of([authority]),
      run_id=RUN,
      now=NOW,
    )


def test_override_admits_only_the_steps_groups_and_metrics_it_names(authority):
  profile = _profile(
    Bound(group="core", metric="attention_entropy", low=0.3, action="pause"),
    Bound(group="head", metric="gradient_entropy", low=0.5, action="pause"),
  )
  tx = enforce(
    profile,
    _compiled(),
    optax.sgd(1.0),
    overrides=[_token(authority, steps="2-3")],
    trust=keys.TrustStore.of([authority]),
    run_id=RUN,
    now=NOW,
  )
  low_attn, low_both = _meas(attn=(0.1, 0.9)), _meas(attn=(0.1, 0.9), head=0.1)
  got = _run(tx, [low_attn, low_attn, low_both, low_attn])
  assert [int(s.counters.paused) for _, s in got] == [
    1,
    1,
    2,
    3,
  ]  # steps 1 and 4 not named; step 3: head acts
  assert [e.action for e in decode_events(got[1][1], profile, _compiled())] == ["admitted"]
  assert sorted((e.group, e.action) for e in decode_events(got[2][1], profile, _compiled())) == [
    ("core", "admitted"),
    ("head", "pause"),
  ]
  assert int(got[-1][1].counters.admitted[GROUPS.index("core"), 0]) == 2


def test_a_per_step_host_mask_admits_like_a_built_in_override(authority):
  override = admit_override(_token(authority), keys.TrustStore.of([authority]), RUN, now=NOW)
  profile = _profile(Bound(group="core", metric="attention_entropy", low=0.3, action="pause"))
  tx = enforce(profile, _compiled(), optax.sgd(1.0))
  state = tx.init(_params())
  update = jax.jit(
    lambda s, mask: tx.update(
      _grads(), s, _params(), measurements=_meas(attn=(0.1, 0.9)), override_mask=mask
    )
  )
  paused = []
  for step in range(1, 5):
    _, state = update(state, host_mask([override], _compiled().group_names, step))
    paused.append(int(state.counters.paused))
  assert paused == [0, 0, 1, 2]


# --- end to end: a run that collapses attention, via each representation source ----------------


def _collapse_run(
  source: str,
  profile: EntropyProfile,
  *,
  steps: int,
  inner=None,
  overrides=(),
  state=None,
  params=None,
  stop_on_escalation=True,
):
  """Train the attention model; returns (compiled, per-step [(params, opt_state, measurements)])."""
  src = am.source(source)
  compiled = aqgov.compile_policy(am.policy(), src.params, am.taxonomy())
  tokens, labels = am.batch()
  tx = enforce(profile, compiled, inner or optax.adam(0.05), overrides=overrides)
  vg = routed_value_and_grad(src.loss, compiled, "per_example", has_aux=True)

  @jax.jit
  def step(params, opt_state):
    (_, aux), grads = vg(params, tokens, labels)
    measurements = entropy.measure(profile, compiled, grads=grads, representations=aux)
    updates, opt_state = tx.update(grads, opt_state, params, measurements=measurements)
    return optax.apply_updates(params, updates), opt_state, measurements

  params = src.params if params is None else params
  opt_state = tx.init(params) if state is None else state
  trace = []
  for _ in range(steps):
    params, opt_state, m = step(params, opt_state)
    trace.append((params, opt_state, m))
    if stop_on_escalation and bool(opt_state.escalated):
      break  # the host loop stops at the step boundary
  return compiled, trace


def _collapse_profile(
  src: am.Source, low: float, action: str, optimizer_state: str = "hold", **kw
) -> EntropyProfile:
  return EntropyProfile(
    name="collapse",
    optimizer_state=optimizer_state,
    representations=[
      Representation(
        path=src.attention_path, group="core", kind="attention", heads=am.HEADS, causal=True
      )
    ],
    bounds=[Bound(group="core", metric="attention_entropy", low=low, action=action, **kw)],
  )


def _collapse_step(trace, low: float) -> int:
  """First step whose measured attention entropy (some head) is below `low`.

  Steps before it had no violation, so they are exactly the unenforced run's steps.
  """
  values = [np.asarray(m["attention_entropy/core"]) for _, _, m in trace]
  k = next(i for i, v in enumerate(values) if (v < low).any())
  assert k >= 2, "the bound should break after some training, not at initialisation"
  return k


def test_pause_takes_effect_at_the_collapse_step_aux_dict():
  low = 0.45
  src = am.source("aux")
  profile = _collapse_profile(src, low, "pause")
  compiled, trace = _collapse_run("aux", profile, steps=7)
  k = _collapse_step(trace, low)
  assert k <= 5
  assert [int(s.counters.paused) for _, s, _ in trace] == [0] * k + list(range(1, 8 - k))
  assert [decode_events(s, profile, compiled) != [] for _, s, _ in trace] == [False] * k + [
    True
  ] * (7 - k)
  assert decode_events(trace[k][1], profile, compiled)[0].step == k + 1  # trace[i] is step i + 1
  for i in range(k, 7):
    assert _same_bits(trace[i][0], trace[k - 1][0])
    assert _same_bits(trace[i][1].inner, trace[k - 1][1].inner)


def _record() -> optax.GradientTransformation:
  """Keeps the last gradient it saw in its state (to observe what reaches the optimizer)."""
  return optax.GradientTransformation(
    lambda p: jax.tree.map(jnp.zeros_like, p), lambda u, s, p=None: (u, u)
  )


def test_reroute_zeroes_the_group_gradient_for_the_next_steps_nnx():
  low = 0.95
  src = am.source("nnx")
  # `advance`: the recording transform's state is params-shaped, and would be held for a frozen group
  profile = _collapse_profile(
    src, low, "reroute", fallback=0.0, duration=3, optimizer_state="advance"
  )
  compiled, trace = _collapse_run(
    "nnx", profile, steps=8, inner=optax.chain(_record(), optax.adam(0.05))
  )
  k = _collapse_step(trace, low)
  assert k <= 5
  core = compiled.group_names.index("core")
  seen = [jax.tree_util.tree_leaves(s.inner[0]) for _, s, _ in trace]
  core_norms = [
    sum(float(jnp.abs(x).sum()) for x, g in zip(leaves, compiled.leaf_group) if g == core)
    for leaves in seen
  ]
  other_norms = [
    sum(float(jnp.abs(x).sum()) for x, g in zip(leaves, compiled.leaf_group) if g != core)
    for leaves in seen
  ]
  assert all(n > 0 for n in core_norms[:k]) and core_norms[k : k + 3] == [0.0, 0.0, 0.0]
  assert all(n > 0 for n in other_norms)
  assert decode_events(trace[k][1], profile, compiled)[0].action == "reroute"


def test_escalate_stops_then_resumes_under_an_override_linen(authority):
  low = 0.95
  src = am.source("linen")
  profile = _collapse_profile(src, low, "escalate")
  compiled, trace = _collapse_run("linen", profile, steps=9)
  k = _collapse_step(trace, low)
  assert len(trace) == k + 1  # the host loop stopped at the step that escalated
  params_before, stopped, _ = trace[-1]
  assert _same_bits(params_before, trace[-2][0])
  with pytest.raises(GovernanceEscalation) as info:
    check_escalation(stopped, profile, compiled, run_id=RUN)
  exc = info.value
  step = k + 1  # trace[i] is step i + 1
  assert exc.step == step and exc.events[0].metric == "attention_entropy" and exc.state is stopped
  assert int(stopped.step) == k and bool(stopped.escalated)

  # Resume: the same state, the same step, now admitted by a signed override for step k only.
  token = _token(authority, steps=str(step), expires="2999-01-01T00:00:00Z")
  override = admit_override(token, keys.TrustStore.of([authority]), RUN)
  compiled, trace = _collapse_run(
    "linen",
    profile,
    steps=2,
    overrides=[override],
    state=exc.state,
    params=params_before,
    stop_on_escalation=False,
  )
  resumed, after = trace[0][1], trace[1][1]
  events = decode_events(resumed, profile, compiled)
  assert events and all(e.action == "admitted" and e.step == step for e in events)
  assert not bool(resumed.escalated) and int(resumed.step) == k + 1
  assert not _same_bits(trace[0][0], params_before)
  with pytest.raises(GovernanceEscalation) as again:
    check_escalation(after, profile, compiled)
  assert again.value.step == step + 1
