"""A character-level transformer with a quarantine MLP adapter in every block, for the efficacy study.

Parameters: `embed/{tokens,positions}`, `blocks/<i>/{ln1,attn,ln2,mlp}`, `adapter/<i>/{down,up}`
(added residually after block i) and `head/{ln,kernel,bias}`. Zeroing `adapter/**` ablates the
adapters: each then adds exactly zero. `score_codes` scores many candidate continuations of one
shared prefix, running the prefix once and only the candidates' own positions per candidate.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

VOCAB = 256
PAD = 0


class Config(NamedTuple):
  """Model sizes."""

  seq_len: int = 48
  d_model: int = 64
  num_heads: int = 4
  num_blocks: int = 2
  adapter_dim: int = 128


def init(key: jax.Array, config: Config = Config()) -> dict[str, Any]:
  """Random parameters; adapters start as the zero function (`up` is zero)."""
  d, h, n = config.d_model, config.adapter_dim, config.num_blocks
  keys = iter(jax.random.split(key, 4 + 5 * n))

  def dense(k, n_in, n_out):
    return jax.random.normal(k, (n_in, n_out), jnp.float32) / np.sqrt(n_in)

  norm = lambda: {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))}  # noqa: E731
  blocks = {
    str(i): {
      "ln1": norm(),
      "attn": {"qkv": dense(next(keys), d, 3 * d), "out": dense(next(keys), d, d)},
      "ln2": norm(),
      "mlp": {"up": dense(next(keys), d, 4 * d), "down": dense(next(keys), 4 * d, d)},
    }
    for i in range(n)
  }
  adapter = {str(i): {"down": dense(next(keys), d, h), "up": jnp.zeros((h, d))} for i in range(n)}
  return {
    "embed": {
      "tokens": jax.random.normal(next(keys), (VOCAB, d)) * 0.02,
      "positions": jax.random.normal(next(keys), (config.seq_len, d)) * 0.02,
    },
    "blocks": blocks,
    "adapter": adapter,
    "head": {"ln": norm(), "kernel": dense(next(keys), d, VOCAB), "bias": jnp.zeros((VOCAB,))},
  }


def ablate(params: dict[str, Any]) -> dict[str, Any]:
  """`params` with every adapter parameter zeroed (the deployed, quarantine-removed model)."""
  return {**params, "adapter": jax.tree.map(jnp.zeros_like, params["adapter"])}


def _layer_norm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def _attention(x, p, num_heads, past):
  """Causal self-attention over `x` [..., T, d], every position also seeing the shared `past`
  keys/values ([P, d] each: an earlier segment of the same sequence)."""
  t, d = x.shape[-2:]
  q, k, v = jnp.split(x @ p["qkv"], 3, axis=-1)
  heads = lambda z: jnp.swapaxes(z.reshape(z.shape[:-1] + (num_heads, d // num_heads)), -2, -3)  # noqa: E731
  qh, kh, vh = heads(q), heads(k), heads(v)
  logits = qh @ jnp.swapaxes(kh, -1, -2) / np.sqrt(d // num_heads)
  logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -1e9)
  values = vh
  if past is not None:
    pk, pv = heads(past[0]), heads(past[1])
    logits = jnp.concatenate(
      [jnp.einsum("...htd,hpd->...htp", qh, pk) / np.sqrt(d // num_heads), logits], -1
    )
    values = (pv, vh)
  probs = jax.nn.softmax(logits, axis=-1)
  if past is None:
    out = probs @ values
  else:
    split = values[0].shape[-2]
    out = (
      jnp.einsum("...htp,hpd->...htd", probs[..., :split], values[0])
      + probs[..., split:] @ values[1]
    )
  out = jnp.swapaxes(out, -2, -3).reshape(x.shape)
  return out @ p["out"], (k, v)


def run(params, tokens, config: Config = Config(), *, start: int = 0, past=None):
  """Logits [..., T, VOCAB] of tokens [..., T] at positions `start..`, the per-block keys/values, and
  the residual stream [..., num_blocks + 1, T, d] (after the embedding, then after each block and its
  adapter). `past` is the keys/values of one earlier segment, shared by every row of `tokens`."""
  positions = params["embed"]["positions"][start : start + tokens.shape[-1]]
  x = params["embed"]["tokens"][tokens] + positions
  stream, cache = [x], []
  for i in range(config.num_blocks):
    p, a = params["blocks"][str(i)], params["adapter"][str(i)]
    out, kv = _attention(
      _layer_norm(x, p["ln1"]), p["attn"], config.num_heads, None if past is None else past[i]
    )
    x = x + out
    x = x + jax.nn.gelu(_layer_norm(x, p["ln2"]) @ p["mlp"]["up"]) @ p["mlp"]["down"]
    x = x + jax.nn.relu(x @ a["down"]) @ a["up"]
    stream.append(x)
    cache.append(kv)
  h = params["head"]
  return _layer_norm(x, h["ln"]) @ h["kernel"] + h["bias"], cache, jnp.stack(stream, axis=-3)


def token_nll(params, tokens, config: Config = Config()):
  """Next-byte negative log-likelihood [T] of a `seq_len + 1` token row, and its non-pad mask."""
  logits, _, _ = run(params, tokens[:-1], config)
  targets = tokens[1:]
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, None], axis=-1)[:, 0]
  return nll, (targets != PAD).astype(jnp.float32)


def example_loss(params, tokens, config: Config = Config()):
  """Mean next-byte cross-entropy over the non-padding targets of one example."""
  nll, mask = token_nll(params, tokens, config)
  return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def score_codes(
  params, prefix: jax.Array, codes: jax.Array, config: Config = Config()
) -> jax.Array:
  """Negative log-likelihood [N] of each candidate code [N, K] (byte tokens) following `prefix` [P]."""
  logits, cache, _ = run(params, prefix, config)
  rest, _, _ = run(params, codes[:, :-1], config, start=prefix.shape[0], past=cache)
  first = jnp.broadcast_to(logits[-1], (codes.shape[0], 1, VOCAB))
  logp = jax.nn.log_softmax(jnp.concatenate([first, rest], axis=1))
  return -jnp.take_along_axis(logp, codes[..., None], axis=-1)[..., 0].sum(-1)


def residual_stream(params, tokens, config: Config = Config()) -> jax.Array:
  """The residual stream [num_blocks + 1, T, d] of the input part of one `seq_len + 1` row."""
  return run(params, tokens[:-1], config)[2]
