"""Slice routing cost against a plain Optax step: per-head and per-expert groups, ratios in one run.

    python benchmarks/slices.py            # attention LM (4x128, 4 heads, T=128, B=32) and MoE
    python benchmarks/slices.py --quick    # tiny shapes, a smoke run

Every step is jitted and includes `optax.adam`. The plain step is `value_and_grad` of the mean
per-example loss (vmapped) plus the update. The routed steps use `routed_value_and_grad` under a
policy whose groups are slices: one group per attention head of every `qkv` and output kernel
(`per = "head"`), and for the mixture of experts one per expert of the stacked expert kernels
(`per = "expert"`); restricted examples reach one head (one expert) only. "cotangent" scales each
slice at its use (the parameter is never batched); "per_example" is the reference (`vmap(grad)`);
"+norms" adds the per-example per-group contribution norms. Timing as in `benchmarks/routing.py`
(median, and best, of interleaved rounds).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import warnings
from pathlib import Path

import jax
import optax

import aqgov
from aqgov.examples import moe, tiny_lm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import TAXONOMY, labels_for, measure  # noqa: E402


def head_policy(num_heads: int) -> str:
  return f"""
name = "bench-heads"
[groups]
qkv = {{ pattern = "blocks/*/attn/qkv", axis = 1, split = {3 * num_heads}, per = "head" }}
out = {{ pattern = "blocks/*/attn/out", axis = 0, split = {num_heads}, per = "head" }}
rest = ["**"]
[[rules]]
when = "source == 'licensed'"
route = {{ qkv = 0.5, out = 0.5, rest = 1.0 }}
[[rules]]
when = "source == 'restricted'"
route = {{ "qkv[0]" = 1.0, "qkv[{num_heads}]" = 1.0, "qkv[{2 * num_heads}]" = 1.0, "out[0]" = 1.0 }}
[default]
route = {{ qkv = 1.0, out = 1.0, rest = 1.0 }}
"""


def expert_policy(config: moe.Config) -> str:
  return f"""
name = "bench-experts"
[groups]
expert = {{ patterns = ["blocks/*/moe/w_in", "blocks/*/moe/w_out"], axis = 0, split = {config.num_experts}, per = "expert" }}
head = {{ pattern = "blocks/*/attn/wo", axis = 0, split = {config.num_heads}, per = "head" }}
rest = ["**"]
[[rules]]
when = "source == 'licensed'"
route = {{ expert = 0.5, head = 1.0, rest = 1.0 }}
[[rules]]
when = "source == 'restricted'"
route = {{ "expert[1]" = 1.0 }}
[default]
route = {{ expert = 1.0, head = 1.0, rest = 1.0 }}
"""


def cases(quick: bool):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  if quick:
    lm_cfg, lm_b = (
      tiny_lm.Config(seq_len=8, d_model=16, num_heads=2, num_blocks=1, adapter_dim=4),
      4,
    )
    moe_cfg, moe_b = moe.Config(seq_len=8, d_model=16, num_heads=2, num_experts=4, expert_dim=16), 4
  else:
    lm_cfg = tiny_lm.Config(seq_len=128, d_model=128, num_heads=4, num_blocks=4, adapter_dim=32)
    moe_cfg = moe.Config(
      seq_len=64, d_model=64, num_heads=4, num_blocks=2, num_experts=8, expert_dim=128
    )
    lm_b, moe_b = 32, 32
  lm = (
    f"attention LM {lm_cfg.num_blocks}x{lm_cfg.d_model}, {lm_cfg.num_heads} heads, "
    f"T={lm_cfg.seq_len}, B={lm_b}",
    tiny_lm.init(k1, lm_cfg),
    jax.random.randint(k2, (lm_b, lm_cfg.seq_len + 1), 1, tiny_lm.VOCAB),
    functools.partial(tiny_lm.example_loss, config=lm_cfg),
    head_policy(lm_cfg.num_heads),
  )
  mixture = (
    f"MoE {moe_cfg.num_blocks}x{moe_cfg.d_model}, {moe_cfg.num_experts} experts top-"
    f"{moe_cfg.top_k}, T={moe_cfg.seq_len}, B={moe_b}",
    moe.init(k3, moe_cfg),
    jax.random.randint(k4, (moe_b, moe_cfg.seq_len + 1), 1, moe.VOCAB),
    functools.partial(moe.example_loss, config=moe_cfg),
    expert_policy(moe_cfg),
  )
  return [lm, mixture]


def steps(loss, compiled, optimizer) -> dict:
  def apply(grads, params, opt_state):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def plain(params, opt_state, batch, labels):
    del labels
    mean = lambda p: jax.numpy.mean(jax.vmap(loss, (None, 0))(p, batch))  # noqa: E731
    value, grads = jax.value_and_grad(mean)(params)
    return (value, *apply(grads, params, opt_state))

  def routed(strategy: str, with_norms: bool):
    fn = aqgov.routed_value_and_grad(loss, compiled, strategy, with_norms=with_norms)

    def step(params, opt_state, batch, labels):
      out = fn(params, batch, labels)
      return (out[0], *apply(out[1], params, opt_state), *out[2:])

    return step

  return {
    "plain": plain,
    "per_example": routed("per_example", False),
    "cotangent": routed("cotangent", False),
    "cotangent+norms": routed("cotangent", True),
  }


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run")
  parser.add_argument("--reps", type=int, default=None, help="timing rounds (default 10, quick 2)")
  args = parser.parse_args(argv)
  reps = args.reps or (2 if args.quick else 10)
  warnings.simplefilter("default")
  taxonomy = aqgov.Taxonomy.from_toml(TAXONOMY)
  space = aqgov.credentials.LabelSpace.of(taxonomy)
  print(
    f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), {os.cpu_count()} CPU "
    f"cores, jax {jax.__version__}; median (and best) of {reps} interleaved rounds; ratios are "
    "routed / plain step (value_and_grad of the mean loss + optax.adam), same run.\n"
  )
  routed = ["per_example", "cotangent", "cotangent+norms"]
  head = (
    ["model", "groups", "plain step"] + [f"{r} time" for r in routed] + [f"{r} mem" for r in routed]
  )
  print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
  for name, params, tokens, loss, text in cases(args.quick):
    compiled = aqgov.compile_policy(aqgov.Policy.from_toml(text), params, taxonomy)
    optimizer = optax.adam(1e-3)
    example = lambda p, ex, loss=loss: loss(p, ex)  # noqa: E731
    batch_size = tokens.shape[0]
    call = (params, optimizer.init(params), tokens, labels_for(space, batch_size))
    res = measure({n: (s, call) for n, s in steps(example, compiled, optimizer).items()}, reps)
    plain = res["plain"]
    cells = [name, str(compiled.num_groups), f"{plain.seconds * 1e3:.1f} ms"]
    cells += [
      f"{res[r].seconds / plain.seconds:.2f}x ({res[r].best / plain.best:.2f}x)" for r in routed
    ]
    cells += [f"{res[r].bytes / plain.bytes:.2f}x" for r in routed]
    print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  main()
