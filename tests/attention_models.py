"""A one-layer attention model in three forms (plain JAX, Flax NNX, Flax Linen) for entropy tests.

The task is engineered to collapse attention: every position must predict the sequence's first
token, so training drives each query to attend to key 0 alone, and attention entropy falls step
by step. Parameters fall into the groups `embed`, `core` (attention) and `head`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import aqgov
from aqgov.entropy import _metrics as entropy

VOCAB, SEQ, DIM, HEADS = 12, 8, 16, 2

TAXONOMY = """
[authority]
name = "lab"

[fields.split]
type = "enum"
values = ["train", "holdout"]
"""

POLICY = """
name = "lab-routing"

[groups]
embed = ["embed/**"]
core = ["core/**"]
head = ["head/**"]

[default]
route = { embed = 1.0, core = 1.0, head = 1.0 }
"""


def taxonomy() -> aqgov.Taxonomy:
  return aqgov.Taxonomy.from_toml(TAXONOMY)


def policy() -> aqgov.Policy:
  return aqgov.Policy.from_toml(POLICY)


def batch(size: int = 8, seed: int = 0) -> tuple[jax.Array, dict]:
  """Token sequences [B, SEQ] (first token in 1..VOCAB-1) and their labels."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, VOCAB, size=(size, SEQ)).astype(np.int32)
  labels = taxonomy().encode([{"split": "train"}] * size)
  return jnp.asarray(tokens), labels


def _causal_attention(x, wq, wk, wv, wo):
  t = x.shape[0]
  q = (x @ wq).reshape(t, HEADS, -1).transpose(1, 0, 2)
  k = (x @ wk).reshape(t, HEADS, -1).transpose(1, 0, 2)
  v = (x @ wv).reshape(t, HEADS, -1).transpose(1, 0, 2)
  logits = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
  logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -1e9)
  probs = jax.nn.softmax(logits, axis=-1)
  out = (probs @ v).transpose(1, 0, 2).reshape(t, -1) @ wo
  return out, probs


def _loss(logits, tokens):
  target = jnp.full((tokens.shape[0],), tokens[0])
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), target[:, None], axis=-1))


# --- plain JAX, representations returned as an aux dict ---------------------------------------


def init_plain(seed: int = 0) -> dict:
  ks = jax.random.split(jax.random.key(seed), 6)
  dense = lambda k, a, b: jax.random.normal(k, (a, b)) / np.sqrt(a)
  return {
    "embed": {"tokens": jax.random.normal(ks[0], (VOCAB, DIM))},
    "core": {
      "wq": dense(ks[1], DIM, DIM),
      "wk": dense(ks[2], DIM, DIM),
      "wv": dense(ks[3], DIM, DIM),
      "wo": dense(ks[4], DIM, DIM),
    },
    "head": {"kernel": dense(ks[5], DIM, VOCAB)},
  }


def plain_loss(params, tokens):
  """Per-example loss and the aux dict `{"attention": probs [H, T, T], "features": x [T, D]}`."""
  x = params["embed"]["tokens"][tokens]
  c = params["core"]
  a, probs = _causal_attention(x, c["wq"], c["wk"], c["wv"], c["wo"])
  x = x + a
  return _loss(x @ params["head"]["kernel"], tokens), {"attention": probs, "features": x}


# --- Flax NNX, representations sown as nnx.Intermediate ---------------------------------------


class Core(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    init = nnx.initializers.normal(1.0 / np.sqrt(DIM))
    self.wq, self.wk, self.wv, self.wo = (
      nnx.Param(init(rngs.params(), (DIM, DIM))) for _ in range(4)
    )

  def __call__(self, x):
    out, probs = _causal_attention(x, self.wq[...], self.wk[...], self.wv[...], self.wo[...])
    self.sow(nnx.Intermediate, "probs", probs)
    return out


class NnxModel(nnx.Module):
  def __init__(self, seed: int = 0):
    rngs = nnx.Rngs(seed)
    self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
    self.core = Core(rngs)
    self.head = nnx.Linear(DIM, VOCAB, use_bias=False, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    x = x + self.core(x)
    self.sow(nnx.Intermediate, "features", x)
    return self.head(x)


def nnx_parts(seed: int = 0) -> tuple[Any, Any, Callable]:
  """(graphdef, params state, per-example loss returning the captured intermediates as aux)."""
  graphdef, params = nnx.split(NnxModel(seed), nnx.Param)

  def loss(params, tokens):
    model = nnx.merge(graphdef, params)
    logits, intermediates = nnx.capture(model, nnx.Intermediate)(tokens)
    return _loss(logits, tokens), intermediates

  return graphdef, params, loss


# --- Flax Linen, representations captured as intermediates ------------------------------------


class LinenCore(nn.Module):
  @nn.compact
  def __call__(self, x):
    init = nn.initializers.normal(1.0 / np.sqrt(DIM))
    w = [self.param(n, init, (DIM, DIM)) for n in ("wq", "wk", "wv", "wo")]
    out, probs = _causal_attention(x, *w)
    self.sow("intermediates", "probs", probs)
    return out


class LinenModel(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, DIM, name="embed")(tokens)
    x = x + LinenCore(name="core")(x)
    return nn.Dense(VOCAB, use_bias=False, name="head")(x)


def linen_parts(seed: int = 0) -> tuple[dict, Callable]:
  """(params, per-example loss returning Linen's captured intermediates as aux)."""
  model = LinenModel()
  params = model.init(jax.random.key(seed), jnp.zeros((SEQ,), jnp.int32))["params"]

  def loss(params, tokens):
    logits, state = model.apply(
      {"params": params}, tokens, capture_intermediates=True, mutable=["intermediates"]
    )
    return _loss(logits, tokens), entropy.from_linen(state)

  return params, loss


class Source(NamedTuple):
  """One representation source: params, per-example loss, and the profile's representation paths."""

  name: str
  params: Any
  loss: Callable
  attention_path: str
  features_path: str


def source(name: str, seed: int = 0) -> Source:
  """The model in one form: "aux" (plain JAX), "nnx" or "linen"."""
  if name == "aux":
    return Source("aux", init_plain(seed), plain_loss, "attention", "features")
  if name == "nnx":
    _, params, loss = nnx_parts(seed)
    return Source("nnx", params, loss, "core/probs/0", "features/0")
  if name == "linen":
    params, loss = linen_parts(seed)
    return Source("linen", params, loss, "core/probs/0", "core/__call__/0")
  raise ValueError(f"unknown representation source {name!r}")
