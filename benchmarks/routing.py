"""Routing cost against a plain Optax step: time and peak memory, as ratios measured in one run.

    python benchmarks/routing.py            # MLP, CNN, LM, scanned blocks, RNN (shapes below)
    python benchmarks/routing.py --quick    # tiny shapes, a smoke run
    python benchmarks/routing.py --cases scan,rnn   # some of the cases (name prefixes)

Every step is jitted and includes `optax.adam`. The plain step is `value_and_grad` of the mean
per-example loss (vmapped) plus the update; the routed steps replace the gradient with
`routed_value_and_grad(..., strategy)` under a three-class, three-group policy; the visibility
step uses the same policy with every group but the first declared `visible = "routed"` (restricted
examples see only the first group: the others act as zero in their forward pass). Time: median
wall-clock per call over `--reps` rounds, with `block_until_ready`; each round runs every step
(one untimed call, then enough timed calls to make the plain step's share at least 0.1 s), so load
drifting on a shared machine affects all steps alike and no step pays for caches left cold by
another. Memory: XLA's
compiled memory analysis of the whole step (`jit(step).lower(...).compile().memory_analysis()`),
argument + output + temp bytes: the buffers the step needs at its peak, as planned by the compiler.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _measure import Measure, labels_for, machine, measure, policy_toml, taxonomy

import aqgov
from aqgov.examples import tiny_lm as tiny_lm


class Case(NamedTuple):
  name: str
  params: dict
  batch: dict
  loss: Callable
  groups: dict[str, list[str]]


def mlp_case(key, batch_size: int, width: int, depth: int) -> Case:
  keys = jax.random.split(key, depth + 3)
  layers = {
    str(i): {
      "kernel": jax.random.normal(keys[i], (width, width)) / np.sqrt(width),
      "bias": jnp.zeros(width),
    }
    for i in range(depth)
  }
  params = {
    "layers": layers,
    "head": {
      "kernel": jax.random.normal(keys[depth], (width, 10)) / np.sqrt(width),
      "bias": jnp.zeros(10),
    },
  }

  def loss(p, ex):
    h = ex["x"]
    for i in range(depth):
      h = jax.nn.relu(h @ p["layers"][str(i)]["kernel"] + p["layers"][str(i)]["bias"])
    logits = h @ p["head"]["kernel"] + p["head"]["bias"]
    return -jax.nn.log_softmax(logits)[ex["y"]]

  batch = {
    "x": jax.random.normal(keys[-2], (batch_size, width)),
    "y": jax.random.randint(keys[-1], (batch_size,), 0, 10),
  }
  half = depth // 2
  groups = {
    "early": [f"layers/{i}/**" for i in range(half)],
    "late": [f"layers/{i}/**" for i in range(half, depth)],
    "head": ["head/**"],
  }
  return Case(f"MLP {depth}x{width}, B={batch_size}", params, batch, loss, groups)


def _conv(x, kernel, bias):
  y = jax.lax.conv_general_dilated(
    x[None], kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )[0]
  return jax.nn.relu(y + bias)


def _pool(x):
  h, w, c = x.shape
  return x.reshape(h // 2, 2, w // 2, 2, c).mean((1, 3))


def cnn_case(key, batch_size: int, size: int) -> Case:
  keys = jax.random.split(key, 6)
  feat = (size // 4) ** 2 * 64
  params = {
    "conv1": {
      "kernel": jax.random.normal(keys[0], (3, 3, 3, 32)) / np.sqrt(27),
      "bias": jnp.zeros(32),
    },
    "conv2": {
      "kernel": jax.random.normal(keys[1], (3, 3, 32, 64)) / np.sqrt(288),
      "bias": jnp.zeros(64),
    },
    "dense": {
      "kernel": jax.random.normal(keys[2], (feat, 128)) / np.sqrt(feat),
      "bias": jnp.zeros(128),
    },
    "head": {"kernel": jax.random.normal(keys[3], (128, 10)) / np.sqrt(128), "bias": jnp.zeros(10)},
  }

  def loss(p, ex):
    h = _pool(_conv(ex["x"], p["conv1"]["kernel"], p["conv1"]["bias"]))
    h = _pool(_conv(h, p["conv2"]["kernel"], p["conv2"]["bias"]))
    h = jax.nn.relu(h.reshape(-1) @ p["dense"]["kernel"] + p["dense"]["bias"])
    logits = h @ p["head"]["kernel"] + p["head"]["bias"]
    return -jax.nn.log_softmax(logits)[ex["y"]]

  batch = {
    "x": jax.random.normal(keys[4], (batch_size, size, size, 3)),
    "y": jax.random.randint(keys[5], (batch_size,), 0, 10),
  }
  groups = {"convs": ["conv1/**", "conv2/**"], "dense": ["dense/**"], "head": ["head/**"]}
  return Case(f"CNN {size}x{size}x3, B={batch_size}", params, batch, loss, groups)


def lm_case(key, batch_size: int, config: tiny_lm.Config) -> Case:
  k_params, k_tokens = jax.random.split(key)
  params = tiny_lm.init(k_params, config)
  tokens = jax.random.randint(k_tokens, (batch_size, config.seq_len + 1), 1, tiny_lm.VOCAB)
  loss = lambda p, ex: tiny_lm.example_loss(p, ex["tokens"], config)
  groups = {"embed": ["embed/**"], "core": ["blocks/**", "adapter/**"], "head": ["head/**"]}
  name = f"LM {config.num_blocks}x{config.d_model}, T={config.seq_len}, B={batch_size}"
  return Case(name, params, {"tokens": tokens}, loss, groups)


def scan_case(key, batch_size: int, tokens: int, width: int, depth: int) -> Case:
  """Residual MLP blocks stacked on a leading axis and run by `lax.scan` (as `hk.layer_stack`,
  `nnx.scan` or an Equinox scanned stack do): every kernel is sliced per iteration."""
  keys = jax.random.split(key, 5)
  params = {
    "blocks": {
      "up": jax.random.normal(keys[0], (depth, width, 2 * width)) / np.sqrt(width),
      "down": jax.random.normal(keys[1], (depth, 2 * width, width)) / np.sqrt(2 * width),
      "bias": jnp.zeros((depth, 2 * width)),
    },
    "head": jax.random.normal(keys[2], (width, 10)) / np.sqrt(width),
  }

  def loss(p, ex):
    def block(h, blk):
      return h + jax.nn.gelu(h @ blk["up"] + blk["bias"]) @ blk["down"], None

    h, _ = jax.lax.scan(block, ex["x"], p["blocks"])
    logits = jnp.mean(h, axis=0) @ p["head"]
    return -jax.nn.log_softmax(logits)[ex["y"]]

  batch = {
    "x": jax.random.normal(keys[3], (batch_size, tokens, width)),
    "y": jax.random.randint(keys[4], (batch_size,), 0, 10),
  }
  groups = {"up": ["blocks/up", "blocks/bias"], "down": ["blocks/down"], "head": ["head"]}
  name = f"scan {depth}x{width}, T={tokens}, B={batch_size}"
  return Case(name, params, batch, loss, groups)


def rnn_case(key, batch_size: int, steps: int, width: int) -> Case:
  """An Elman RNN under `lax.scan`: the cell's weights are closed over, shared by every step."""
  keys = jax.random.split(key, 6)
  params = {
    "cell": {
      "wx": jax.random.normal(keys[0], (width, width)) / np.sqrt(width),
      "wh": jax.random.normal(keys[1], (width, width)) / np.sqrt(width),
      "b": jnp.zeros(width),
    },
    "head": jax.random.normal(keys[2], (width, 10)) / np.sqrt(width),
  }

  def loss(p, ex):
    cell = p["cell"]

    def step(h, x):
      return jnp.tanh(x @ cell["wx"] + h @ cell["wh"] + cell["b"]), None

    h, _ = jax.lax.scan(step, jnp.zeros(width), ex["x"])
    return -jax.nn.log_softmax(h @ p["head"])[ex["y"]]

  batch = {
    "x": jax.random.normal(keys[3], (batch_size, steps, width)),
    "y": jax.random.randint(keys[4], (batch_size,), 0, 10),
  }
  groups = {"input": ["cell/wx"], "recurrent": ["cell/wh", "cell/b"], "head": ["head"]}
  return Case(f"RNN {width}, T={steps}, B={batch_size}", params, batch, loss, groups)


def cases(quick: bool) -> list[Case]:
  key = jax.random.key(0)
  k1, k2, k3, k4, k5 = jax.random.split(key, 5)
  if quick:
    return [
      mlp_case(k1, 8, 16, 2),
      cnn_case(k2, 4, 8),
      lm_case(
        k3, 2, tiny_lm.Config(seq_len=8, d_model=16, num_heads=2, num_blocks=1, adapter_dim=4)
      ),
      scan_case(k4, 4, 4, 8, 2),
      rnn_case(k5, 4, 4, 8),
    ]
  return [
    mlp_case(k1, 128, 512, 6),
    cnn_case(k2, 64, 32),
    lm_case(
      k3, 32, tiny_lm.Config(seq_len=128, d_model=128, num_heads=4, num_blocks=4, adapter_dim=32)
    ),
    scan_case(k4, 32, 64, 128, 4),
    rnn_case(k5, 64, 32, 128),
  ]


def steps(case: Case, compiled_policy, hiding_policy, optimizer) -> dict[str, Callable]:
  """The jittable steps compared: (params, opt_state, batch, labels) -> (loss, params, opt_state)."""

  def apply(grads, params, opt_state):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def plain(params, opt_state, batch, labels):
    del labels
    mean_loss = lambda p: jnp.mean(jax.vmap(case.loss, (None, 0))(p, batch))
    loss, grads = jax.value_and_grad(mean_loss)(params)
    return (loss, *apply(grads, params, opt_state))

  def routed(strategy: str, with_norms: bool | str, policy=compiled_policy):
    fn = aqgov.routed_value_and_grad(case.loss, policy, strategy, with_norms=with_norms)

    def step(params, opt_state, batch, labels):
      out = fn(params, batch, labels)
      loss, grads = out[0], out[1]
      new = apply(grads, params, opt_state)
      return (loss, *new, out[2]) if with_norms else (loss, *new)

    return step

  return {
    "plain": plain,
    "per_example": routed("per_example", False),
    "cotangent": routed("cotangent", False),
    "cotangent+norms": routed("cotangent", True),
    "cotangent+sketch": routed("cotangent", "sketch"),
    "cotangent+visibility": routed("cotangent", False, hiding_policy),
  }


def run(quick: bool, reps: int, only: tuple[str, ...] = ()) -> list[tuple[str, dict[str, Measure]]]:
  tax = taxonomy()
  space = aqgov.credentials.LabelSpace.of(tax)
  rows = []
  for case in cases(quick):
    if only and not case.name.lower().startswith(only):
      continue
    policy = aqgov.Policy.from_toml(policy_toml(case.groups))
    compiled_policy = aqgov.compile_policy(policy, case.params, tax)
    hiding = aqgov.compile_policy(
      aqgov.Policy.from_toml(policy_toml(case.groups, visibility=True)), case.params, tax
    )
    optimizer = optax.adam(1e-3)
    batch_size = jax.tree.leaves(case.batch)[0].shape[0]
    args = (case.params, optimizer.init(case.params), case.batch, labels_for(space, batch_size))
    named = {
      name: step
      for name, step in steps(case, compiled_policy, hiding, optimizer).items()
      if supported(step, args)
    }
    results = measure({name: (step, args) for name, step in named.items()}, reps)
    rows.append((case.name, results))
    print(f"measured {case.name}", file=sys.stderr, flush=True)
  return rows


def supported(step: Callable, args: tuple) -> bool:
  """Whether the strategy a step names covers this model (e.g. the cotangent strategy does not
  transform hidden parameters inside a scan): a refused step is reported as "n/a"."""
  try:
    jax.eval_shape(step, *args)
  except aqgov.errors.UnsupportedPrimitiveError:
    return False
  return True


def table(rows) -> str:
  routed = [
    "per_example",
    "cotangent",
    "cotangent+norms",
    "cotangent+sketch",
    "cotangent+visibility",
  ]
  head = (
    ["model", "plain step", "plain peak"]
    + [f"{r} time" for r in routed]
    + [f"{r} mem" for r in routed]
  )
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, res in rows:
    plain = res["plain"]
    cells = [name, f"{plain.seconds * 1e3:.1f} ms", f"{plain.bytes / 2**20:.1f} MiB"]
    cells += [
      f"{res[r].seconds / plain.seconds:.2f}x ({res[r].best / plain.best:.2f}x)"
      if r in res
      else "n/a"
      for r in routed
    ]
    cells += [f"{res[r].bytes / plain.bytes:.2f}x" if r in res else "n/a" for r in routed]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--quick", action="store_true", help="tiny shapes: a smoke run, not a measurement"
  )
  parser.add_argument(
    "--reps",
    type=int,
    default=None,
    help="timing rounds (median and best reported); default 10, quick 2",
  )
  parser.add_argument(
    "--cases", default="", help="comma-separated case name prefixes (mlp, cnn, lm, scan, rnn)"
  )
  args = parser.parse_args(argv)
  reps = args.reps or (2 if args.quick else 10)
  warnings.simplefilter("default")
  print(
    f"{machine()}; median (and best) of {reps} interleaved rounds; "
    "memory = XLA compiled memory analysis (argument + output + temp bytes) of the jitted step."
  )
  print(
    "Ratios are routed / plain (value_and_grad of the mean loss + optax.adam), same run; time "
    "cells give the ratio of medians and, in parentheses, of the fastest rounds.\n"
  )
  only = tuple(c.strip().lower() for c in args.cases.split(",") if c.strip())
  print(table(run(args.quick, reps, only)))


if __name__ == "__main__":
  main()
