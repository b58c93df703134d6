"""Cost of entropy measurement and enforcement against a plain Optax step.

    python benchmarks/entropy.py            # LM 4 blocks, d=128, T=128, B=32 (aqgov.examples.tiny_lm)
    python benchmarks/entropy.py --quick    # tiny shapes, a smoke run

Every step is jitted. The plain step is `value_and_grad` of the mean per-example loss (vmapped)
plus `optax.adam`. The measured steps return the attention probs and block outputs as aux (all
four blocks and the adapter) and add, on top of the plain step:
- `+ attention entropy`: per head of every block;
- `+ renyi2 + effective rank`: of every block's output [B*T, d] and of the adapter output;
- `+ gradient entropy`: per parameter group (embed, core, adapter, head);
- `all metrics`: all of the above through one `aqgov.entropy.measure` call;
- `all metrics + enforce`: and the update through `aqgov.enforce(demo profile, adam)` (bounds,
  reroute table, events, pause/escalate selection of the optimizer state).
Variants are interleaved call by call; times are medians of wall-clock and of process CPU time
(all threads: steadier than wall-clock on a shared machine); ratios are to the plain step of the
same run.

The effective rank's 128 x 128 symmetric eigensolve runs in LAPACK (on CPU, through scipy's
OpenBLAS). Such a small solve gains nothing from threads, and on a busy machine OpenBLAS's spinning
threads contend with XLA's own pool (measured here: 5 ms single-threaded, 50-170 ms threaded under
load), so this script pins OpenBLAS to one thread unless OPENBLAS_NUM_THREADS is already set. The
plain step does not use LAPACK; the setting only affects the eigensolve.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from importlib import resources  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NamedTuple

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import aqgov  # noqa: E402
from aqgov.entropy import _metrics as entropy
from aqgov.examples import tiny_lm as tiny_lm  # noqa: E402


def _setup(quick: bool):
  if quick:
    config, batch_size = (
      tiny_lm.Config(seq_len=16, d_model=16, num_heads=4, num_blocks=1, adapter_dim=4),
      4,
    )
  else:
    config, batch_size = (
      tiny_lm.Config(seq_len=128, d_model=128, num_heads=4, num_blocks=4, adapter_dim=32),
      32,
    )
  k_params, k_tokens = jax.random.split(jax.random.key(0))
  params = tiny_lm.init(k_params, config)
  tokens = jax.random.randint(k_tokens, (batch_size, config.seq_len + 1), 1, tiny_lm.VOCAB)
  data = Path(str(resources.files("aqgov").joinpath("data")))
  policy = aqgov.Policy.read(data / "policies" / "acme-routing.toml")
  compiled = aqgov.compile_policy(policy, params, None)
  profile = aqgov.EntropyProfile.read(data / "profiles" / "demo-profile.toml")
  return config, params, tokens, compiled, profile


def steps(config, compiled, profile) -> dict[str, Callable]:
  """The jittable steps compared: (params, opt_state, tokens) -> (loss, params, opt_state, ...)."""
  adam = optax.adam(1e-3)
  governed = aqgov.enforce(profile, compiled, optax.adam(1e-3))

  def loss_aux(p, tokens):
    return tiny_lm.example_loss(p, tokens, config, with_aux=True)

  def mean_loss(p, tokens):
    return jnp.mean(jax.vmap(lambda t: tiny_lm.example_loss(p, t, config))(tokens))

  def mean_loss_aux(p, tokens):
    losses, aux = jax.vmap(loss_aux, (None, 0))(p, tokens)
    return jnp.mean(losses), aux

  def apply(tx, grads, params, opt_state, **kw):
    updates, opt_state = tx.update(grads, opt_state, params, **kw)
    return optax.apply_updates(params, updates), opt_state

  def plain(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(mean_loss)(params, tokens)
    return (loss, *apply(adam, grads, params, opt_state))

  def with_metrics(metrics: tuple[str, ...]):
    def step(params, opt_state, tokens):
      (loss, aux), grads = jax.value_and_grad(mean_loss_aux, has_aux=True)(params, tokens)
      m = entropy.measure(profile, compiled, grads=grads, representations=aux, metrics=metrics)
      return (loss, *apply(adam, grads, params, opt_state), m)

    return step

  def enforced(params, opt_state, tokens):
    (loss, aux), grads = jax.value_and_grad(mean_loss_aux, has_aux=True)(params, tokens)
    m = entropy.measure(
      profile, compiled, grads=grads, representations=aux, metrics=entropy.METRICS
    )
    return (loss, *apply(governed, grads, params, opt_state, measurements=m), m)

  return {
    "plain": (plain, adam),
    "+ attention entropy": (with_metrics(("attention_entropy",)), adam),
    "+ renyi2 + effective rank": (with_metrics(("renyi2", "effective_rank")), adam),
    "+ gradient entropy": (with_metrics(("gradient_entropy",)), adam),
    "all metrics": (with_metrics(entropy.METRICS), adam),
    "all metrics + enforce": (enforced, governed),
  }


class Timing(NamedTuple):
  wall: float  # median seconds
  cpu: float  # median process CPU seconds (all threads)


def run(quick: bool, reps: int) -> dict[str, Timing]:
  config, params, tokens, compiled, profile = _setup(quick)
  compiled_steps = {}
  for name, (step, tx) in steps(config, compiled, profile).items():
    args = (params, tx.init(params), tokens)
    fn = jax.jit(step).lower(*args).compile()
    jax.block_until_ready(fn(*args))
    compiled_steps[name] = (fn, args)
    print(f"compiled {name}", file=sys.stderr, flush=True)
  wall: dict[str, list[float]] = {name: [] for name in compiled_steps}
  cpu: dict[str, list[float]] = {name: [] for name in compiled_steps}
  for _ in range(reps):
    for name, (fn, args) in compiled_steps.items():
      start, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(*args))
      wall[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - start_cpu)
  return {
    name: Timing(statistics.median(wall[name]), statistics.median(cpu[name]))
    for name in compiled_steps
  }


def table(timings: dict[str, Timing]) -> str:
  plain = timings["plain"]
  lines = [
    "| step | median wall | wall / plain | median CPU | CPU / plain |",
    "|---|---|---|---|---|",
  ]
  for name, t in timings.items():
    lines.append(
      f"| {name} | {t.wall * 1e3:.1f} ms | {t.wall / plain.wall:.3f}x | "
      f"{t.cpu * 1e3:.1f} ms | {t.cpu / plain.cpu:.3f}x |"
    )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--quick", action="store_true", help="tiny shapes: a smoke run, not a measurement"
  )
  parser.add_argument(
    "--reps", type=int, default=None, help="timed calls per step (median); default 21, quick 2"
  )
  args = parser.parse_args(argv)
  reps = args.reps or (2 if args.quick else 21)
  shape = "LM 1x16, T=16, B=4 (quick)" if args.quick else "LM 4 blocks, d=128, T=128, B=32"
  print(
    f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), {os.cpu_count()} CPU cores, "
    f"jax {jax.__version__}, optax {optax.__version__}; {shape}; median of {reps} interleaved calls."
  )
  print("Ratios are to the plain step (value_and_grad of the mean loss + optax.adam), same run.\n")
  print(table(run(args.quick, reps)))


if __name__ == "__main__":
  main()
