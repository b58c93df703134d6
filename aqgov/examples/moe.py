"""A small mixture-of-experts byte-level transformer in plain JAX, with per-head and per-expert groups.

Each block has causal multi-head attention (separate `wq`, `wk`, `wv` [D, H*dh] and `wo` [H*dh, D]
kernels, so a head is a slice of each) and a mixture-of-experts feed-forward layer: a router
[D, E] and stacked expert kernels `w_in` [E, D, F] and `w_out` [E, F, D]. Routing is top-k token
choice: each token's router probabilities are kept for its k most likely experts (renormalised)
and the layer computes every expert densely, so an expert's kernels get exactly the gradient of
the tokens that chose it. Nothing is shared across examples: there is no expert capacity.

`POLICY` names one group per expert (`expert[e]`, a slice of axis 0 of the stacked kernels) and
one per attention head of the output projection (`head[h]`), and routes sensitive examples
(`sensitivity_tier >= 2` under the sample `acme-data` taxonomy) to expert 2 only.

`capacity_loss` is the same model with a capacity-based router: experts take at most `capacity`
tokens of the whole batch, chosen by batch-wide competition (an `all_gather` over the batch axis
`"batch"`). Each example's loss then depends on the other examples of the batch, so per-example
routing refuses it (`BatchCouplingError`).
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

  seq_len: int = 32
  d_model: int = 32
  num_heads: int = 4
  num_blocks: int = 1
  num_experts: int = 4
  expert_dim: int = 64
  top_k: int = 2


def policy_text(config: Config = Config(), sensitive_expert: int = 2) -> str:
  """The routing policy of this model: per-expert and per-head groups, sensitive examples routed
  to one expert."""
  e, h = config.num_experts, config.num_heads
  return f"""
name = "moe-routing"
authority = "acme-data"

[groups]
expert = {{ patterns = ["blocks/*/moe/w_in", "blocks/*/moe/w_out"], axis = 0, split = {e}, per = "expert" }}
head = {{ pattern = "blocks/*/attn/wo", axis = 0, split = {h}, per = "head" }}
shared = ["**"]

[[rules]]
name = "sensitive"
when = "sensitivity_tier >= 2"
route = {{ "expert[{sensitive_expert}]" = 1.0 }}

[[rules]]
name = "unknown-license"
when = "license_class == 'unknown'"
route = {{}}

[default]
route = {{ expert = 1.0, head = 1.0, shared = 1.0 }}
"""


POLICY = policy_text()


def init(key: jax.Array, config: Config = Config()) -> dict[str, Any]:
  """Random parameters (scaled normal kernels, unit norm scales)."""
  d, e, f = config.d_model, config.num_experts, config.expert_dim
  keys = iter(jax.random.split(key, 3 + 7 * config.num_blocks))

  def normal(shape, fan_in):
    return jax.random.normal(next(keys), shape, jnp.float32) / np.sqrt(fan_in)

  blocks = {}
  for i in range(config.num_blocks):
    blocks[str(i)] = {
      "ln1": jnp.ones((d,)),
      "attn": {name: normal((d, d), d) for name in ("wq", "wk", "wv", "wo")},
      "ln2": jnp.ones((d,)),
      "moe": {
        "router": normal((d, e), d),
        "w_in": normal((e, d, f), d),
        "w_out": normal((e, f, d), f),
      },
    }
  return {
    "embed": normal((VOCAB, d), 1.0) * 0.02,
    "positions": normal((config.seq_len, d), 1.0) * 0.02,
    "blocks": blocks,
    "head": normal((d, VOCAB), d),
  }


def encode_text(content: bytes, config: Config = Config()) -> np.ndarray:
  """Byte tokens, truncated or zero-padded to `seq_len + 1` (inputs and shifted targets)."""
  tokens = np.frombuffer(content[: config.seq_len + 1], dtype=np.uint8).astype(np.int32)
  return np.pad(tokens, (0, config.seq_len + 1 - len(tokens)))


def _rms_norm(x, scale):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-5) * scale


def attention(x, p, num_heads: int):
  """Causal multi-head attention of one sequence [T, D]; also the probs [H, T, T]."""
  t, d = x.shape
  split = lambda z: z.reshape(t, num_heads, d // num_heads).transpose(1, 0, 2)
  q, k, v = split(x @ p["wq"]), split(x @ p["wk"]), split(x @ p["wv"])
  logits = q @ k.transpose(0, 2, 1) / np.sqrt(d // num_heads)
  probs = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -1e9), axis=-1)
  return (probs @ v).transpose(1, 0, 2).reshape(t, d) @ p["wo"], probs


def top_k_gates(router_probs: jax.Array, k: int) -> jax.Array:
  """[T, E] gates: each token's probabilities of its k most likely experts, renormalised; 0 elsewhere."""
  kth = jax.lax.top_k(router_probs, k)[0][..., -1:]
  kept = jnp.where(router_probs >= kth, router_probs, 0.0)
  return kept / jnp.sum(kept, axis=-1, keepdims=True)


def experts(x, p, gates):
  """Every expert on every token [T, D], combined by `gates` [T, E]."""
  h = jax.nn.gelu(jnp.einsum("td,edf->tef", x, p["w_in"]))
  y = jnp.einsum("tef,efd->ted", h, p["w_out"])
  return jnp.einsum("te,ted->td", gates, y)


def forward(params, tokens, config: Config = Config(), router=None):
  """Logits [T, VOCAB] of one sequence, and per block the attention probs and router probs."""
  router = router or functools.partial(_token_choice, k=config.top_k)
  x = params["embed"][tokens] + params["positions"][: tokens.shape[0]]
  attn, routing = {}, {}
  for i in range(config.num_blocks):
    p = params["blocks"][str(i)]
    a, probs = attention(_rms_norm(x, p["ln1"]), p["attn"], config.num_heads)
    x = x + a
    h = _rms_norm(x, p["ln2"])
    router_probs = jax.nn.softmax(h @ p["moe"]["router"], axis=-1)
    x = x + experts(h, p["moe"], router(router_probs))
    attn[f"blocks/{i}"], routing[f"blocks/{i}"] = probs, router_probs
  return x @ params["head"], attn, routing


def _token_choice(router_probs, k: int):
  return top_k_gates(router_probs, k)


def _nll(logits, targets):
  mask = (targets != PAD).astype(jnp.float32)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, None], axis=-1)[:, 0]
  return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def example_loss(params, tokens, config: Config = Config(), with_aux: bool = False):
  """Mean next-byte cross-entropy of one example; with `with_aux` also `{"attention": ...,
  "router": ...}` (attention probs [H, T, T] and router probs [T, E] per block)."""
  logits, attn, routing = forward(params, tokens[:-1], config)
  loss = _nll(logits, tokens[1:])
  return (loss, {"attention": attn, "router": routing}) if with_aux else loss


def capacity_gates(router_probs: jax.Array, capacity: int) -> jax.Array:
  """[T, E] top-1 gates where each expert keeps only the `capacity` highest-scoring tokens of the
  whole batch: the tokens of every example compete, through an `all_gather` over axis "batch"."""
  best = jnp.max(router_probs, axis=-1, keepdims=True)
  choice = jnp.where(router_probs >= best, router_probs, 0.0)  # [T, E]
  everyone = jax.lax.all_gather(choice, "batch")  # [B, T, E]: the batch's tokens
  flat = everyone.reshape(-1, everyone.shape[-1])
  threshold = jax.lax.top_k(flat.T, capacity)[0][:, -1]  # [E]: the capacity-th best score
  return jnp.where(choice >= threshold, choice, 0.0)


def capacity_loss(params, tokens, config: Config = Config(), capacity: int = 8):
  """`example_loss` with a capacity-based router (batch-coupled: tokens dropped by competition)."""
  router = functools.partial(capacity_gates, capacity=capacity)
  logits, _, _ = forward(params, tokens[:-1], config, router=router)
  return _nll(logits, tokens[1:])


def make_task(task_config: Mapping[str, Any], run_dir: str | Path):
  """The governed task of a run training this model (`aqgov.examples.moe:make_task`).

  `task_config` keys: the `Config` fields, `seed`, `learning_rate`, `strategy`, `strict`.
  """
  import optax

  from aqgov.governed import GovernedTask

  config = Config(**{k: int(task_config[k]) for k in Config._fields if k in task_config})
  seed = int(task_config.get("seed", 0))
  return GovernedTask(
    run_dir,
    loss_fn=functools.partial(example_loss, config=config, with_aux=True),
    init_params=lambda: init(jax.random.PRNGKey(seed), config),
    make_inputs=lambda ex: encode_text(ex.content, config),
    optimizer=optax.adam(float(task_config.get("learning_rate", 3e-3))),
    strategy=str(task_config.get("strategy", "auto")),
    strict=bool(task_config.get("strict", True)),
    seed=seed,
  )
