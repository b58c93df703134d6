"""Attribution from training-time gradient sketches: quality and cost, measured in one run.

    python benchmarks/attribution.py            # full sizes
    python benchmarks/attribution.py --quick    # smaller, a smoke run

- mislabel: an MLP on scikit-learn's digits with 10% of the labels flipped, trained once with
  sketches (`SketchSpec(dim)` per group); each example's self-influence `Σ_t ‖φ_g(i; θ_t)‖²`
  summed over groups ranks the flipped ones: ROC-AUC and the share of flipped labels in the top
  10%. Anchors on MNIST MLPs: TracIn ~0.86, TRAK with 50 models ~0.997.
- canaries: the tiny LM trained on a stream with planted, repeated canary sentences; each trained
  canary's text is a probe, scored against every training slot by `Σ_t ⟨φ(probe; θ_t), φ(slot)⟩`:
  how often its top 1 is one of its own slots, and the share of its own slots in its top 10.
- cost: the jitted step with routing and norms (what a governed step runs) with and without
  sketches, as ratios to the plain Optax step measured in the same run; sketch bytes per step;
  attribution time per probe from stored sketches.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aqgov.examples import _canaries as canaries
from aqgov.examples import tiny_lm as tiny_lm
from aqgov.routing import SketchSpec, gradient_sketches
from aqgov.routing._cotangent import cotangent_value_and_grad
from aqgov.routing._sketch import group_sketches


def _timed(fns, *args, reps: int = 15) -> list[float]:
  """Median CPU seconds (all threads of this process) per call of each fn: on a shared machine
  other jobs change wall-clock times far more than they change the work a step does. Every round
  times all of them, so what drift remains affects all alike."""
  for fn in fns:
    jax.block_until_ready(fn(*args))
  t = time.perf_counter()
  jax.block_until_ready(fns[0](*args))
  calls = max(1, int(0.05 / max(time.perf_counter() - t, 1e-6)))
  times = [[] for _ in fns]
  for _ in range(reps):
    for k, fn in enumerate(fns):
      t = time.process_time()
      for _ in range(calls):
        out = fn(*args)
      jax.block_until_ready(out)
      times[k].append((time.process_time() - t) / calls)
  return [statistics.median(x) for x in times]


def mlp_init(key, sizes):
  keys = jax.random.split(key, len(sizes) - 1)
  return {
    f"l{i}": {
      "w": jax.random.normal(k, (a, b)) / np.sqrt(a),
      "b": jnp.zeros((b,)),
    }
    for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
  }


def mlp_loss(params, ex):
  h = ex["x"]
  n = len(params)
  for i in range(n):
    h = h @ params[f"l{i}"]["w"] + params[f"l{i}"]["b"]
    if i < n - 1:
      h = jnp.tanh(h)
  return optax.softmax_cross_entropy_with_integer_labels(h, ex["y"])


def _steps(loss, spec, leaf_group, groups, tx):
  """(plain, routed with norms, routed with norms and sketches) jitted steps."""

  def plain(params, opt, batch):
    g = jax.grad(lambda p: jnp.mean(jax.vmap(loss, in_axes=(None, 0))(p, batch)))(params)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), opt

  def routed(sketch):
    vg = cotangent_value_and_grad(loss, with_norms=True, sketch=sketch)

    def step(params, opt, batch):
      size = jax.tree.leaves(batch)[0].shape[0]
      w = jax.tree.map(lambda _: jnp.ones((size,)), params)
      out = vg(params, batch, w)
      u, opt = tx.update(out[1], opt, params)
      norms = jax.tree.leaves(out[2])  # a governed step records them: keep them live
      if sketch is None:
        return optax.apply_updates(params, u), opt, norms
      return (
        optax.apply_updates(params, u),
        opt,
        group_sketches(sketch, out[3], leaf_group, groups, size),
        norms,
      )

    return step

  return jax.jit(plain), jax.jit(routed(None)), jax.jit(routed(spec))


def mislabel(quick: bool, dim: int) -> dict:
  from sklearn.datasets import load_digits
  from sklearn.metrics import roc_auc_score

  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  rng = np.random.default_rng(0)
  n = len(y)
  flipped = rng.random(n) < 0.10
  noisy = np.where(flipped, (y + rng.integers(1, 10, n)) % 10, y).astype(np.int32)
  params = mlp_init(jax.random.key(0), [64, 128, 10])
  leaf_group = (0, 0, 1, 1)  # l0/b, l0/w, l1/b, l1/w: hidden, head
  spec = SketchSpec(dim=dim, seed=1)
  tx = optax.adam(3e-3)
  _, _, step = _steps(mlp_loss, spec, leaf_group, 2, tx)
  opt = tx.init(params)
  influence = np.zeros(n)
  batch_size, epochs = 64, 8 if quick else 30
  for _ in range(epochs):
    order = rng.permutation(n)
    for s in range(0, n - batch_size + 1, batch_size):
      idx = order[s : s + batch_size]
      params, opt, sk, _ = step(params, opt, {"x": x[idx], "y": noisy[idx]})
      influence[idx] += np.sum(np.square(np.asarray(sk, np.float32)), axis=(1, 2))
  auc = roc_auc_score(flipped, influence)
  top = np.argsort(-influence)[: n // 10]
  return {"auc": auc, "top10": flipped[top].sum() / flipped.sum(), "flipped": int(flipped.sum())}


def canary_ranks(quick: bool, dim: int) -> dict:
  config = tiny_lm.Config(seq_len=32, d_model=32, num_heads=4, num_blocks=1, adapter_dim=8)
  steps, batch = (60, 16) if quick else (200, 16)
  trained, _ = canaries.make_canaries(0, trained=4, held_out=0)
  stream = canaries.training_stream(0, steps, batch, trained, config.seq_len, share=0.05)
  params = tiny_lm.init(jax.random.key(0), config)

  def loss(p, tokens):
    return tiny_lm.example_loss(p, tokens, config)

  leaf_group = tuple(range(len(jax.tree.leaves(params))))
  groups = len(leaf_group)
  spec = SketchSpec(dim=dim, seed=2)
  tx = optax.adam(3e-3)
  _, _, step = _steps(loss, spec, leaf_group, groups, tx)
  probe_fn = jax.jit(gradient_sketches(loss, spec, leaf_group, groups))
  probes = canaries.encode([c.text for c in trained], config.seq_len)
  opt = tx.init(params)
  scores = np.zeros((2, len(trained), steps * batch))  # raw TracIn, cosine per step
  attrib_s = 0.0
  for t in range(steps):
    phi = np.asarray(probe_fn(params, jnp.asarray(probes)), np.float32)  # at θ_{t-1}
    params, opt, sk, _ = step(params, opt, jnp.asarray(stream.tokens[t]))
    started = time.perf_counter()
    sk = np.asarray(sk, np.float32)
    dots = np.einsum("pgk,bgk->pb", phi, sk)
    norms = np.linalg.norm(phi.reshape(len(phi), -1), axis=1)[:, None] * np.linalg.norm(
      sk.reshape(len(sk), -1), axis=1
    )
    scores[0, :, t * batch : (t + 1) * batch] = dots
    scores[1, :, t * batch : (t + 1) * batch] = dots / np.maximum(norms, 1e-30)
    attrib_s += time.perf_counter() - started
  which = stream.canary.reshape(-1)
  out = {"per_probe_ms": 1e3 * attrib_s / len(trained), "own_slots": int((which >= 0).sum())}
  for name, s in zip(("raw", "cosine"), scores):
    top1, top10 = [], []
    for c in range(len(trained)):
      own = which == c
      if not own.any():
        continue
      order = np.argsort(-s[c])
      top1.append(bool(own[order[0]]))
      top10.append(own[order[:10]].sum() / min(10, own.sum()))
    out[name] = (float(np.mean(top1)), float(np.mean(top10)))
  return out


def cost(sizes: list[int], b: int, dim: int) -> dict:
  params = mlp_init(jax.random.key(0), sizes)
  rng = np.random.default_rng(0)
  batch = {
    "x": jnp.asarray(rng.normal(size=(b, sizes[0])), jnp.float32),
    "y": jnp.asarray(rng.integers(0, 10, b), jnp.int32),
  }
  leaf_group = tuple(i // 2 for i in range(len(jax.tree.leaves(params))))
  groups = max(leaf_group) + 1
  tx = optax.adam(1e-3)
  plain, routed, sketched = _steps(mlp_loss, SketchSpec(dim=dim), leaf_group, groups, tx)
  opt = tx.init(params)
  t_plain, t_routed, t_sketch = _timed([plain, routed, sketched], params, opt, batch)
  return {
    "plain_ms": 1e3 * t_plain,
    "routed": t_routed / t_plain,
    "sketched": t_sketch / t_plain,
    "sketch_vs_routed": t_sketch / t_routed,
    "bytes_per_step": b * groups * dim * 2,
    "groups": groups,
  }


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--dim", type=int, default=256)
  args = ap.parse_args()
  k = canary_ranks(args.quick, args.dim)
  shapes = [([64, 128, 10], 64)] if args.quick else [([256, 512, 512, 512, 10], 128)]
  shapes += [] if args.quick else [([784, 1024, 1024, 1024, 10], 256)]
  for sizes, b in shapes:
    c = cost(sizes, b, args.dim)
    print(
      f"cost (MLP {'x'.join(map(str, sizes))}, B={b}, {c['groups']} groups, k={args.dim}): plain "
      f"{c['plain_ms']:.2f} ms CPU; routed with norms (a governed step's gradient) "
      f"{c['routed']:.2f}x; with sketches {c['sketched']:.2f}x, i.e. "
      f"{c['sketch_vs_routed']:.2f}x the step without them; "
      f"{c['bytes_per_step'] / 1024:.0f} KiB of bfloat16 sketches per step"
    )
  m = mislabel(args.quick, args.dim)
  print(
    f"mislabel (digits MLP, {m['flipped']} of 1797 flipped): self-influence ROC-AUC "
    f"{m['auc']:.3f}; {100 * m['top10']:.0f}% of flipped labels in the top 10%"
  )
  for name in ("raw", "cosine"):
    top1, top10 = k[name]
    print(
      f"canaries (tiny LM, {k['own_slots']} canary slots, {name} TracIn): own slot ranked first "
      f"for {100 * top1:.0f}% of probes; {100 * top10:.0f}% of each top 10 are its own slots"
    )
  print(f"attribution: {k['per_probe_ms']:.2f} ms per probe over the run's stored sketches")


if __name__ == "__main__":
  main()
