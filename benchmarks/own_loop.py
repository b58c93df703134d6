"""What recording costs a loop its user owns (`GovernedRun.open`), per step, against the same loop unrecorded.

    python benchmarks/own_loop.py [--quick] [--batch 128] [--steps 50] [--rounds 7]

One small jitted MLP step with routed gradients and strict routing (`routed_value_and_grad(...,
with_norms=True)`, `optax.chain(optax.adamw, aqgov.strict)`), timed over whole Python loops of
`steps` steps (dispatch, recording and the final `block_until_ready` included):

- plain: the step returns params, optimizer state and loss (nothing recorded);
- summary: it also returns its `routed_summary` (fingerprint and summary arrays), not recorded;
- record: `run.record(summary, ids)` after each step (reads the step number on the host, queues
  the rest for the writer thread);
- emit: `run.emit(summary)` inside the step (an ordered host callback), `run.stage(ids)` before it.

Variants are interleaved round by round, so load drifting on a shared machine affects them alike;
ratios are of medians. The writer thread's work shows up only where cores are scarce.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import aqgov
from aqgov.documents import _keys as keys
from aqgov.documents._document_type import sign
from aqgov.lineage import GovernedRun, routed_summary
from aqgov.policy._policy import POLICY

TAXONOMY = """
[authority]
name = "bench"
[fields.source]
type = "enum"
values = ["open", "licensed", "restricted"]
"""
POLICY_TOML = """
name = "bench-own-loop"
[groups]
body = ["body/**"]
head = ["head/**"]
[[rules]]
when = "source == 'restricted'"
route = { head = 1.0 }
[default]
route = { body = 1.0, head = 1.0 }
"""


def setup(batch: int, features: int = 64, hidden: int = 256, classes: int = 10):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {
    "body": {"w": jax.random.normal(k1, (features, hidden)) / 8, "b": jnp.zeros(hidden)},
    "head": {"w": jax.random.normal(k2, (hidden, classes)) / 16, "b": jnp.zeros(classes)},
  }
  taxonomy = aqgov.Taxonomy.from_toml(TAXONOMY)
  policy = aqgov.Policy.from_toml(POLICY_TOML)
  names = ["open", "licensed", "restricted"]
  space = aqgov.credentials.LabelSpace.of(taxonomy)
  labels = space.encode([{"bench": {"source": names[i % 3]}} for i in range(batch)])
  data = {
    "x": jax.random.normal(k3, (batch, features)),
    "y": jnp.arange(batch, dtype=jnp.int32) % classes,
  }
  return params, policy, aqgov.compile_policy(policy, params, taxonomy), data, labels


def loop_steps(compiled, emit=None):
  def example_loss(p, ex):
    logits = jnp.tanh(ex["x"] @ p["body"]["w"] + p["body"]["b"]) @ p["head"]["w"] + p["head"]["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, ex["y"])

  grad_fn = aqgov.routed_value_and_grad(example_loss, compiled, with_norms=True)
  tx = optax.chain(optax.adamw(1e-3), aqgov.strict(compiled))

  def make(with_summary: bool, emitting: bool):
    @jax.jit
    def step(n, params, opt_state, batch, labels):
      loss, grads, norms = grad_fn(params, batch, labels)
      updates, opt_state = tx.update(grads, opt_state, params, labels=labels)
      params = optax.apply_updates(params, updates)
      if not with_summary:
        return params, opt_state, loss
      summary = routed_summary(
        compiled, labels, step=n, loss=loss, contribution_norms=norms, params=params
      )
      if emitting:
        emit(summary)
        return params, opt_state, loss
      return params, opt_state, summary

    return step

  return tx, make


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--steps", type=int, default=50, help="steps per timed loop")
  ap.add_argument("--rounds", type=int, default=7)
  args = ap.parse_args(argv)
  batch, steps, rounds = (16, 5, 2) if args.quick else (args.batch, args.steps, args.rounds)
  params0, policy, compiled, data, labels = setup(batch)
  ids = [f"ex-{i:06d}" for i in range(batch)]
  authority = keys.generate("bench")
  signed = sign(POLICY, policy, authority)
  with tempfile.TemporaryDirectory() as tmp:
    runs = {
      name: GovernedRun.open(
        Path(tmp) / name,
        compiled=compiled,
        policies=[signed],
        trust=[authority.public],
        key_dir=Path(tmp) / f"{name}-keys",
        fsync="never",
      )
      for name in ("record", "emit")
    }
    tx, make = loop_steps(compiled, emit=runs["emit"].emit)
    fns = {
      "plain": make(False, False),
      "summary": make(True, False),
      "record": make(True, False),
      "emit": make(True, True),
    }
    state = {name: (params0, tx.init(params0)) for name in fns}
    done = {name: 0 for name in fns}

    def one_loop(name: str) -> float:
      params, opt_state = state[name]
      start = time.perf_counter()
      for _ in range(steps):
        done[name] += 1
        if name == "emit":
          runs["emit"].stage(ids)
        params, opt_state, out = fns[name](done[name], params, opt_state, data, labels)
        if name == "record":
          runs["record"].record(out, ids)
      jax.block_until_ready((params, opt_state))
      elapsed = time.perf_counter() - start
      state[name] = (params, opt_state)
      return elapsed / steps

    for name in fns:  # compile and warm up
      one_loop(name)
    times = {name: [] for name in fns}
    for _ in range(rounds):
      for name in fns:
        times[name].append(one_loop(name))
    start = time.perf_counter()
    for run in runs.values():
      run.close()
    drain = time.perf_counter() - start
  median = {name: statistics.median(t) for name, t in times.items()}
  print(
    f"jax {jax.__version__} on {jax.devices()[0].platform}; B={batch}, {steps}-step loops, median of "
    f"{rounds} interleaved rounds"
  )
  print("| loop | per step | vs plain |")
  print("|---|---|---|")
  for name, t in median.items():
    print(f"| {name} | {t * 1e3:.3f} ms | {t / median['plain']:.3f}x |")
  print(f"| close both runs (drain, sign, run-end) | {drain * 1e3:.1f} ms | |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
