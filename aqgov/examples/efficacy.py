"""Does routing confine what sensitive data teaches? Canary memorisation under four training variants.

A small character-level transformer (`aqgov.examples._efficacy_lm`, a quarantine MLP adapter in
every block) trains on generated ordinary text mixed, in the same batches, with planted canary
secrets (`aqgov.examples._canaries`, about 7% of slots). All variants see the same data order for
the same number of steps:

- `control`: no routing; canaries train everything.
- `filtered`: the canary slots hold ordinary sentences instead (the model that never saw them).
- `routing`: sensitive examples may shape only the adapters, everything else all but the adapters
  (strict mode), without forward visibility.
- `visibility`: the same policy with the adapter group declared `visible = "routed"`: for an
  ordinary example the adapters act as zero in its forward pass.

Each trained model is measured as trained and with its adapters ablated (zeroed): canary exposure
for trained and never-seen canaries, held-out ordinary loss (nats/char), the alignment tax (relative
loss increase over `filtered`), a relearning attack on the ablated model, and the step time
relative to `control`. The `visibility-last` variant confines sensitive data to the last block's
adapter instead of every block's; a linear probe per layer reads canary membership off the
residual stream of each model.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aqgov.credentials import LabelSpace, Taxonomy
from aqgov.examples import _canaries as canaries_lib
from aqgov.examples import _efficacy_lm as lm
from aqgov.policy import Policy, compile_policy
from aqgov.routing import routed_value_and_grad, strict

TAXONOMY = """
[authority]
name = "efficacy"

[fields.source]
type = "enum"
values = ["ordinary", "sensitive"]
"""

VARIANTS = ("control", "filtered", "routing", "visibility")
RELEARN_CANARIES = 3


def policy_toml(*, visible: bool, last_only: bool = False, num_blocks: int = 2) -> str:
  """Sensitive examples shape only the (last block's, with `last_only`) adapter; others all but adapters."""

  def group(name: str, pattern: str) -> str:
    return (
      f'{name} = {{ patterns = ["{pattern}"], visible = "routed" }}'
      if visible
      else f'{name} = ["{pattern}"]'
    )

  lines = [
    'name = "efficacy-routing"',
    "",
    "[groups]",
    'embed = ["embed/**"]',
    'core = ["blocks/**"]',
    group("adapter", f"adapter/{num_blocks - 1}/**" if last_only else "adapter/**"),
  ]
  if last_only:
    lines.append(group("spare", "adapter/**"))
  lines += [
    'head = ["head/**"]',
    "",
    "[[rules]]",
    "when = \"source == 'sensitive'\"",
    "route = { adapter = 1.0 }",
    "",
    "[default]",
    "route = { embed = 1.0, core = 1.0, head = 1.0 }",
  ]
  return "\n".join(lines) + "\n"


class Setup(NamedTuple):
  """Everything a run of one seed shares across variants."""

  config: lm.Config
  trained: list
  never_seen: list
  stream: canaries_lib.Stream
  labels: dict[str, np.ndarray]
  held_out: np.ndarray
  candidates: np.ndarray
  seed: int


def make_setup(
  seed: int,
  steps: int,
  *,
  batch_size: int = 32,
  candidates: int = 10_000,
  held_out: int = 512,
  config: lm.Config = lm.Config(),
) -> Setup:
  """Canaries, the data order, encoded labels, held-out text and exposure candidates of one seed."""
  trained, never_seen = canaries_lib.make_canaries(seed)
  stream = canaries_lib.training_stream(seed, steps, batch_size, trained, config.seq_len)
  space = LabelSpace.of(Taxonomy.from_toml(TAXONOMY))
  rows = [
    {"efficacy": {"source": "sensitive" if s else "ordinary"}} for s in stream.sensitive.ravel()
  ]
  labels = {k: v.reshape(stream.sensitive.shape) for k, v in space.encode_numpy(rows).items()}
  return Setup(
    config,
    trained,
    never_seen,
    stream,
    labels,
    canaries_lib.held_out_text(seed, held_out, config.seq_len),
    canaries_lib.candidate_codes(seed, candidates),
    seed,
  )


def _optimizer(learning_rate: float) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(learning_rate, weight_decay=0.01))


def make_step(
  variant: str, params: Any, config: lm.Config, learning_rate: float
) -> tuple[Callable, Any]:
  """A jitted `step(params, opt_state, batch, labels)` for `variant`, and its initial optimizer state."""
  loss = functools.partial(lm.example_loss, config=config)
  if variant in ("control", "filtered"):
    tx = _optimizer(learning_rate)
    grad_fn = lambda p, b, _: jax.value_and_grad(
      lambda q: jnp.mean(jax.vmap(loss, (None, 0))(q, b))
    )(p)  # noqa: E731
  else:
    policy = Policy.from_toml(
      policy_toml(
        visible=variant != "routing",
        last_only=variant == "visibility-last",
        num_blocks=config.num_blocks,
      )
    )
    compiled = compile_policy(policy, params, Taxonomy.from_toml(TAXONOMY))
    tx = optax.chain(_optimizer(learning_rate), strict(compiled))
    grad_fn = routed_value_and_grad(loss, compiled)

  @jax.jit
  def step(p, opt_state, batch, labels):
    value, grads = grad_fn(p, batch, labels)
    updates, opt_state = tx.update(grads, opt_state, p, labels=labels)
    return optax.apply_updates(p, updates), opt_state, value

  return step, tx.init(params)


class Trained(NamedTuple):
  """A trained model, its jitted step and final optimizer state (for timing), and its data."""

  params: Any
  step: Callable
  opt_state: Any
  data: np.ndarray


def train(variant: str, setup: Setup, *, learning_rate: float = 3e-3) -> Trained:
  """Train `variant` from the seed's initial parameters over the seed's data order."""
  params = lm.init(jax.random.PRNGKey(setup.seed), setup.config)
  step, opt_state = make_step(variant, params, setup.config, learning_rate)
  data = setup.stream.filtered if variant == "filtered" else setup.stream.tokens
  for s in range(data.shape[0]):
    params, opt_state, _ = step(
      params, opt_state, data[s], {k: v[s] for k, v in setup.labels.items()}
    )
  return Trained(jax.block_until_ready(params), step, opt_state, data)


def step_seconds(
  models: dict[str, Trained], setup: Setup, *, rounds: int = 7, calls: int = 3
) -> dict[str, float]:
  """Median wall-clock seconds of one step per model, rounds interleaved across models so that load
  drifting on a shared machine affects every model alike."""
  times: dict[str, list[float]] = {name: [] for name in models}
  labels = {k: v[0] for k, v in setup.labels.items()}
  for _ in range(rounds):
    for name, m in models.items():
      for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(m.step(m.params, m.opt_state, m.data[0], labels))
        times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


@functools.partial(jax.jit, static_argnames="config")
def _nll_sums(params, tokens, config):
  nll, mask = jax.vmap(lm.token_nll, (None, 0, None))(params, tokens, config)
  return (nll * mask).sum(), mask.sum()


def held_out_loss(params: Any, setup: Setup) -> float:
  """Mean next-character loss (nats/char) on ordinary sentences no run trains on."""
  total, count = _nll_sums(params, setup.held_out, setup.config)
  return float(total / count)


_score = jax.jit(lm.score_codes, static_argnames="config")


def canary_exposures(params: Any, canaries: list, setup: Setup) -> tuple[np.ndarray, np.ndarray]:
  """Per canary: exposure by rank among the candidates, and the skew-normal extrapolation."""
  ranked, fitted = [], []
  for c in canaries:
    prefix = canaries_lib.encode([c.prefix], len(c.prefix) - 1)[0]
    secret = np.frombuffer(c.code.encode(), np.uint8).astype(np.int32)[None]
    nll = np.asarray(
      _score(params, prefix, np.concatenate([secret, setup.candidates]), setup.config)
    )
    ranked.append(canaries_lib.exposure(nll[0], nll[1:]))
    fitted.append(canaries_lib.extrapolated_exposure(nll[0], nll[1:]))
  return np.asarray(ranked), np.asarray(fitted)


def relearn(params: Any, setup: Setup, *, steps: int = 30, learning_rate: float = 1e-3) -> Any:
  """An attacker fine-tunes every parameter on the first `RELEARN_CANARIES` trained canaries."""
  batch = canaries_lib.encode(
    [c.text for c in setup.trained[:RELEARN_CANARIES]], setup.config.seq_len
  )
  loss = lambda p: jnp.mean(jax.vmap(lm.example_loss, (None, 0, None))(p, batch, setup.config))  # noqa: E731
  tx = optax.adam(learning_rate)

  @jax.jit
  def step(p, s):
    grads = jax.grad(loss)(p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  opt_state = tx.init(params)
  for _ in range(steps):
    params, opt_state = step(params, opt_state)
  return params


def probe_accuracy(params: Any, setup: Setup, *, folds: int = 5, ridge: float = 10.0) -> np.ndarray:
  """Per layer (embedding, then each block), cross-validated accuracy of a linear probe telling
  trained canaries from never-seen ones by the residual stream where the code is predicted."""
  texts = setup.trained + setup.never_seen
  rows = canaries_lib.encode([c.text for c in texts], setup.config.seq_len)
  stream = np.asarray(
    jax.jit(jax.vmap(lm.residual_stream, (None, 0, None)), static_argnums=2)(
      params, rows, setup.config
    )
  )  # [N, L, T, d]
  feats = np.stack(
    [
      stream[i, :, len(c.prefix) - 1 : len(c.prefix) - 1 + canaries_lib.CODE_DIGITS].mean(1)
      for i, c in enumerate(texts)
    ]
  )  # [N, L, d]
  y = np.where(np.arange(len(texts)) < len(setup.trained), 1.0, -1.0)
  order = np.random.default_rng([setup.seed, 5]).permutation(len(texts))
  accuracy = []
  for layer in range(feats.shape[1]):
    x, hits = feats[:, layer], 0
    for fold in np.array_split(order, folds):
      train_idx = np.setdiff1d(order, fold)
      mean, std = x[train_idx].mean(0), x[train_idx].std(0) + 1e-6
      a = np.c_[(x[train_idx] - mean) / std, np.ones(len(train_idx))]
      w = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ y[train_idx])
      pred = np.c_[(x[fold] - mean) / std, np.ones(len(fold))] @ w
      hits += int(np.sum(np.sign(pred) == y[fold]))
    accuracy.append(hits / len(texts))
  return np.asarray(accuracy)


def measure(
  params: Any, setup: Setup, *, attack: bool, probe: bool = False, never_seen: int = 10
) -> dict[str, Any]:
  """Exposure of the trained and of `never_seen` never-seen canaries, held-out loss, with `attack`
  the exposure of the canaries left out of the relearning attack, with `probe` the probe accuracies."""
  ranked, fitted = canary_exposures(params, setup.trained, setup)
  seen, _ = canary_exposures(params, setup.never_seen[:never_seen], setup)
  out = {
    "exposure": float(ranked.mean()),
    "exposure_fit": float(fitted.mean()),
    "never_seen": float(seen.mean()),
    "loss": held_out_loss(params, setup),
  }
  if attack:
    attacked = relearn(params, setup)
    out["relearned"] = float(
      canary_exposures(attacked, setup.trained[RELEARN_CANARIES:], setup)[0].mean()
    )
  if probe:
    out["probe"] = probe_accuracy(params, setup).tolist()
  return out


def run_seed(
  seed: int,
  steps: int,
  *,
  candidates: int = 10_000,
  variants=VARIANTS,
  depth: bool = True,
  attack: bool = True,
  batch_size: int = 32,
  config: lm.Config = lm.Config(),
) -> dict[str, dict[str, Any]]:
  """Rows `variant` and, except for `filtered`, `variant, ablated` (plus `visibility-last` with
  `depth`) of one seed. The relearning attack (with `attack`) runs on `filtered` and on the ablated
  governed models; `tax` is relative to `filtered`; `step_ratio` to the first variant."""
  setup = make_setup(seed, steps, batch_size=batch_size, candidates=candidates, config=config)
  names = list(variants) + (["visibility-last"] if depth else [])
  models = {name: train(name, setup) for name in names}
  seconds = step_seconds(models, setup)
  rows: dict[str, dict[str, Any]] = {}
  for name, model in models.items():
    for ablated in (False, True) if name != "filtered" else (False,):
      params = lm.ablate(model.params) if ablated else model.params
      governed = name not in ("control", "filtered")
      row = measure(
        params, setup, attack=attack and (name == "filtered" or (ablated and governed)), probe=depth
      )
      row["step_ratio"] = seconds[name] / seconds[names[0]]
      rows[f"{name}, ablated" if ablated else name] = row
  if "filtered" in rows:
    for row in rows.values():
      row["tax"] = row["loss"] / rows["filtered"]["loss"] - 1.0
  return rows


def claims(rows: dict[str, dict[str, Any]]) -> list[str]:
  """The measured claims of one run, as sentences (what the demo prints)."""
  c, ca = rows["control"], rows["control, ablated"]
  v, va, f = rows["visibility"], rows["visibility, ablated"], rows["filtered"]
  out = [
    f"control memorises the canaries: exposure {c['exposure']:.1f} bits, {ca['exposure']:.1f} with its adapter "
    f"ablated (never-seen canaries: {c['never_seen']:.1f})",
    f"filtered (canaries dropped): exposure {f['exposure']:.1f}, held-out loss {f['loss']:.3f} nats/char",
    f"visibility, adapter on: exposure {v['exposure']:.1f}; adapter ablated: exposure {va['exposure']:.1f}, "
    f"held-out loss {va['loss']:.3f} (tax {100 * va['tax']:+.1f}% vs filtered)",
  ]
  if "routing, ablated" in rows:
    r = rows["routing, ablated"]
    out.append(
      f"gradient routing alone, ablated: exposure {r['exposure']:.1f}, held-out loss {r['loss']:.3f} "
      f"(tax {100 * r['tax']:+.1f}%)"
    )
  return out


def demo_claims(*, steps: int = 200, candidates: int = 500, seed: int = 0) -> list[str]:
  """A short efficacy run (control, filtered, visibility) for the demo: its claims as sentences."""
  rows = run_seed(
    seed,
    steps,
    candidates=candidates,
    variants=("control", "filtered", "visibility"),
    depth=False,
    attack=False,
  )
  return claims(rows)
