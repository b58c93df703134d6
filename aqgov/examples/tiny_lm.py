"""A small byte-level transformer language model in plain JAX, used by the demo and notebooks.

Parameters are a nested dict whose paths match the sample policy groups: `embed/**`,
`blocks/<i>/**`, `adapter/**`, `head/**`. `example_loss(params, example)` is the per-example loss
aqgov routes; with `with_aux=True` it also returns the attention probabilities and block outputs
that entropy profiles measure.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

VOCAB = 256
PAD = 0


class Config(NamedTuple):
  """Model sizes."""

  seq_len: int = 64
  d_model: int = 64
  num_heads: int = 4
  num_blocks: int = 2
  adapter_dim: int = 16


def init(key: jax.Array, config: Config = Config()) -> dict[str, Any]:
  """Random parameters (scaled normal kernels, zero biases, unit norm scales)."""
  d, h = config.d_model, config.adapter_dim
  keys = iter(jax.random.split(key, 4 + 4 * config.num_blocks))

  def dense(k, n_in, n_out):
    return jax.random.normal(k, (n_in, n_out), jnp.float32) / np.sqrt(n_in)

  blocks = {}
  for i in range(config.num_blocks):
    blocks[str(i)] = {
      "ln1": {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))},
      "attn": {"qkv": dense(next(keys), d, 3 * d), "out": dense(next(keys), d, d)},
      "ln2": {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))},
      "mlp": {"up": dense(next(keys), d, 4 * d), "down": dense(next(keys), 4 * d, d)},
    }
  return {
    "embed": {
      "tokens": jax.random.normal(next(keys), (VOCAB, d)) * 0.02,
      "positions": jax.random.normal(next(keys), (config.seq_len, d)) * 0.02,
    },
    "blocks": blocks,
    "adapter": {"down": dense(next(keys), d, h), "up": jnp.zeros((h, d))},
    "head": {"kernel": dense(next(keys), d, VOCAB), "bias": jnp.zeros((VOCAB,))},
  }


def encode_text(content: bytes, config: Config = Config()) -> np.ndarray:
  """Byte tokens, truncated or zero-padded to `seq_len + 1` (inputs and shifted targets)."""
  tokens = np.frombuffer(content[: config.seq_len + 1], dtype=np.uint8).astype(np.int32)
  return np.pad(tokens, (0, config.seq_len + 1 - len(tokens)))


def _layer_norm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def _attention(x, p, num_heads):
  t, d = x.shape
  q, k, v = jnp.split(x @ p["qkv"], 3, axis=-1)
  split = lambda z: z.reshape(t, num_heads, d // num_heads).transpose(1, 0, 2)
  q, k, v = split(q), split(k), split(v)
  logits = q @ k.transpose(0, 2, 1) / np.sqrt(d // num_heads)
  causal = jnp.tril(jnp.ones((t, t), bool))
  probs = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
  out = (probs @ v).transpose(1, 0, 2).reshape(t, d)
  return out @ p["out"], probs


def forward(params, tokens, config: Config = Config()):
  """Logits [T, VOCAB] for one sequence, plus per-block attention probs and outputs."""
  x = params["embed"]["tokens"][tokens] + params["embed"]["positions"][: tokens.shape[0]]
  attn, outputs = {}, {}
  for i in range(config.num_blocks):
    p = params["blocks"][str(i)]
    a, probs = _attention(_layer_norm(x, p["ln1"]), p["attn"], config.num_heads)
    x = x + a
    x = x + jax.nn.gelu(_layer_norm(x, p["ln2"]) @ p["mlp"]["up"]) @ p["mlp"]["down"]
    attn[f"blocks/{i}"], outputs[f"blocks/{i}"] = probs, x
  x = x + jax.nn.relu(x @ params["adapter"]["down"]) @ params["adapter"]["up"]
  outputs["adapter"] = x
  return x @ params["head"]["kernel"] + params["head"]["bias"], attn, outputs


def example_loss(params, tokens, config: Config = Config(), with_aux: bool = False):
  """Mean next-byte cross-entropy over the non-padding targets of one example."""
  logits, attn, outputs = forward(params, tokens[:-1], config)
  targets = tokens[1:]
  mask = (targets != PAD).astype(jnp.float32)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, None], axis=-1)[:, 0]
  loss = (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)
  if with_aux:
    return loss, {"attention": attn, "representations": outputs}
  return loss


def make_task(task_config: Mapping[str, Any], run_dir: str | Path):
  """The governed task of a run training this model (`aqgov.examples.tiny_lm:make_task`).

  `task_config` keys: the `Config` fields, `seed`, `learning_rate`, `strategy`, `strict`,
  `on_nonfinite` (`"fail"` or `"drop_example"`, see `aqgov.governed_step`), `norms` ("exact" or
  "sketch") with `norms_sketch_dim` / `norms_sketch_seed` for sketched norms, and `sketch_dim` /
  `sketch_seed` / `sketch_dtype` to record gradient sketches for attribution.
  """
  import optax

  from aqgov.governed import GovernedTask
  from aqgov.routing import SketchSpec

  config = Config(**{k: int(task_config[k]) for k in Config._fields if k in task_config})
  seed = int(task_config.get("seed", 0))
  return GovernedTask(
    run_dir,
    loss_fn=functools.partial(example_loss, config=config, with_aux=True),
    init_params=lambda: init(jax.random.PRNGKey(seed), config),
    make_inputs=lambda ex: encode_text(ex.content, config),
    optimizer=optax.adamw(float(task_config.get("learning_rate", 3e-3))),
    strategy=str(task_config.get("strategy", "auto")),
    strict=bool(task_config.get("strict", False)),
    on_nonfinite=str(task_config.get("on_nonfinite", "fail")),
    seed=seed,
    norms=str(task_config.get("norms", "exact")),
    norms_sketch_dim=int(task_config.get("norms_sketch_dim", 64)),
    norms_sketch_seed=int(task_config.get("norms_sketch_seed", 0)),
    sketch=SketchSpec(
      int(task_config["sketch_dim"]),
      int(task_config.get("sketch_seed", 0)),
      str(task_config.get("sketch_dtype", "bfloat16")),
    )
    if task_config.get("sketch_dim")
    else None,
  )
