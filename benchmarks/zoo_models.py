"""The model zoo: common model families written from Flax Linen, Flax NNX, Equinox and Haiku layers.

Each entry builds a `Case` at a size (`quick` for tests, `small` for a CPU, `large` for an
accelerator): trainable parameters, a per-example loss `(params, example) -> scalar`, a batch
(every leaf with a leading batch axis) and the parameter groups of its routing policy (glob
patterns over the framework's leaf paths, first match wins, the last group catches the rest).
Non-trainable state (BatchNorm statistics, Equinox/NNX static parts) is closed over by the loss.

`COUPLED` holds the training-mode BatchNorm variants: their loss mixes the examples of a batch,
so routing must refuse them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class Dims(NamedTuple):
  batch: int
  width: int  # hidden / model width
  depth: int  # layers, blocks or stages
  seq: int  # sequence length
  image: int  # image side
  vocab: int
  heads: int


SIZES = {
  "quick": Dims(batch=6, width=8, depth=2, seq=5, image=8, vocab=16, heads=2),
  "small": Dims(batch=32, width=64, depth=4, seq=32, image=16, vocab=256, heads=4),
  "large": Dims(batch=128, width=256, depth=6, seq=128, image=32, vocab=4096, heads=8),
}


class Case(NamedTuple):
  name: str
  framework: str
  params: Any
  loss: Callable[[Any, Any], jax.Array]
  batch: Any
  groups: dict[str, list[str]]


def _xent(logits, label):
  return -jax.nn.log_softmax(logits)[label]


def _keys(seed: int, n: int):
  return jax.random.split(jax.random.key(seed), n)


def _tokens(key, d: Dims, length: int | None = None):
  return jax.random.randint(key, (d.batch, (length or d.seq) + 1), 1, d.vocab)


def _images(key, d: Dims, channels_first: bool = False):
  kx, ky = jax.random.split(key)
  shape = (3, d.image, d.image) if channels_first else (d.image, d.image, 3)
  return {
    "x": jax.random.normal(kx, (d.batch, *shape)),
    "y": jax.random.randint(ky, (d.batch,), 0, 10),
  }


def _lm_loss(logits, tokens):
  """Mean next-token cross-entropy; `logits` [T, V] predict `tokens[1:]`."""
  return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[1:, None], -1))


def _causal(t: int):
  return jnp.tril(jnp.ones((t, t), bool))


# =============================================================================================
# Flax Linen


class LinenBlock(nn.Module):
  width: int
  heads: int

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="ln_attn")(x)
    mask = _causal(x.shape[-2])[None]
    x = x + nn.MultiHeadDotProductAttention(self.heads, name="attn")(h, h, mask=mask)
    h = nn.LayerNorm(name="ln_mlp")(x)
    h = nn.Dense(4 * self.width, name="mlp_in")(h)
    return x + nn.Dense(self.width, name="mlp_out")(nn.gelu(h))


class LinenLM(nn.Module):
  """lm1b-style decoder: token and learned position embeddings, pre-LN blocks, untied head."""

  d: Dims

  @nn.compact
  def __call__(self, tokens):
    d = self.d
    x = nn.Embed(d.vocab, d.width, name="embed")(tokens)
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (d.seq, d.width))
    x = x + pos[: tokens.shape[-1]]
    for i in range(d.depth):
      x = LinenBlock(d.width, d.heads, name=f"block_{i}")(x)
    return nn.Dense(d.vocab, name="head")(nn.LayerNorm(name="ln_final")(x))


def linen_lm(d: Dims) -> Case:
  k = _keys(10, 2)
  model = LinenLM(d)
  batch = {"tokens": _tokens(k[1], d)}
  params = model.init(k[0], batch["tokens"][0, :-1][None])["params"]

  def loss(p, ex):
    return _lm_loss(model.apply({"params": p}, ex["tokens"][None, :-1])[0], ex["tokens"])

  groups = {"embed": ["embed/**", "pos_embed"], "blocks": ["block_*/**"], "head": ["**"]}
  return Case("lm1b transformer", "flax.linen", params, loss, batch, groups)


class LinenResBlock(nn.Module):
  channels: int
  stride: int
  train: bool

  @nn.compact
  def __call__(self, x):
    norm = lambda name: nn.BatchNorm(use_running_average=not self.train, name=name)
    h = nn.Conv(self.channels, (3, 3), self.stride, use_bias=False, name="conv1")(x)
    h = nn.relu(norm("bn1")(h))
    h = nn.Conv(self.channels, (3, 3), use_bias=False, name="conv2")(h)
    h = norm("bn2")(h)
    if self.stride != 1 or x.shape[-1] != self.channels:
      x = nn.Conv(self.channels, (1, 1), self.stride, use_bias=False, name="proj")(x)
      x = norm("bn_proj")(x)
    return nn.relu(x + h)


class LinenResNet(nn.Module):
  d: Dims
  train: bool = False

  @nn.compact
  def __call__(self, x):
    c = max(4, self.d.width // 4)
    x = nn.Conv(c, (3, 3), use_bias=False, name="stem")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not self.train, name="bn_stem")(x))
    for i in range(self.d.depth):
      x = LinenResBlock(c * 2 ** (i // 2), 2 if i % 2 else 1, self.train, name=f"stage_{i}")(x)
    return nn.Dense(10, name="head")(x.mean((-3, -2)))


def _linen_resnet(d: Dims, train: bool) -> Case:
  k = _keys(11, 2)
  model = LinenResNet(d, train)
  batch = _images(k[1], d)
  variables = model.init(k[0], batch["x"][:1])
  # running statistics as if trained a while: not the identity
  stats = jax.tree.map(lambda s: s + 0.1, variables["batch_stats"])

  def loss(p, ex):
    variables = {"params": p, "batch_stats": stats}
    if train:
      logits, _ = model.apply(variables, ex["x"][None], mutable=["batch_stats"])
    else:
      logits = model.apply(variables, ex["x"][None])
    return _xent(logits[0], ex["y"])

  half = d.depth // 2
  groups = {
    "stem": ["stem/**", "bn_stem/**"] + [f"stage_{i}/**" for i in range(half)],
    "late": ["stage_*/**"],
    "head": ["**"],
  }
  name = "ResNet, training BatchNorm" if train else "ResNet, eval BatchNorm"
  return Case(name, "flax.linen", variables["params"], loss, batch, groups)


def linen_resnet(d: Dims) -> Case:
  return _linen_resnet(d, train=False)


class LinenBiLSTM(nn.Module):
  """SST-2 style: embeddings, a bidirectional LSTM, mean pooling, a binary head."""

  d: Dims

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.d.vocab, self.d.width, name="embed")(tokens)
    # cells made here are named in this scope: lstm_fwd/..., lstm_bwd/...
    forward = nn.RNN(nn.OptimizedLSTMCell(self.d.width, name="lstm_fwd"))
    backward = nn.RNN(nn.OptimizedLSTMCell(self.d.width, name="lstm_bwd"))
    x = nn.Bidirectional(forward, backward)(x)
    return nn.Dense(2, name="head")(x.mean(-2))


def linen_bilstm(d: Dims) -> Case:
  k = _keys(12, 3)
  model = LinenBiLSTM(d)
  batch = {
    "tokens": jax.random.randint(k[1], (d.batch, d.seq), 1, d.vocab),
    "y": jax.random.randint(k[2], (d.batch,), 0, 2),
  }
  params = model.init(k[0], batch["tokens"][:1])["params"]

  def loss(p, ex):
    return _xent(model.apply({"params": p}, ex["tokens"][None])[0], ex["y"])

  groups = {"embed": ["embed/**"], "lstm": ["lstm_*/**"], "head": ["**"]}
  return Case("SST-2 BiLSTM", "flax.linen", params, loss, batch, groups)


class LinenSeq2Seq(nn.Module):
  """An LSTM encoder whose final carry starts an LSTM decoder (teacher forcing); both scanned."""

  d: Dims

  @nn.compact
  def __call__(self, source, target_in):
    d = self.d
    embed = nn.Embed(d.vocab, d.width, name="embed")
    encoder = nn.RNN(nn.LSTMCell(d.width, name="encoder"), return_carry=True)
    carry, _ = encoder(embed(source))
    out = nn.RNN(nn.LSTMCell(d.width, name="decoder"))(embed(target_in), initial_carry=carry)
    return nn.Dense(d.vocab, name="head")(out)


def linen_seq2seq(d: Dims) -> Case:
  k = _keys(13, 3)
  model = LinenSeq2Seq(d)
  batch = {
    "source": jax.random.randint(k[1], (d.batch, d.seq), 1, d.vocab),
    "target": _tokens(k[2], d),
  }
  params = model.init(k[0], batch["source"][:1], batch["target"][:1, :-1])["params"]

  def loss(p, ex):
    logits = model.apply({"params": p}, ex["source"][None], ex["target"][None, :-1])[0]
    return _lm_loss(logits, ex["target"])

  groups = {"encoder": ["encoder/**", "embed/**"], "decoder": ["decoder/**"], "head": ["**"]}
  return Case("seq2seq LSTM", "flax.linen", params, loss, batch, groups)


def _vae_batch(key, d: Dims, features: int, latent: int):
  kx, ke = jax.random.split(key)
  return {
    "x": jax.random.normal(kx, (d.batch, features)),
    "eps": jax.random.normal(ke, (d.batch, latent)),
  }


def _vae_loss(recon, x, mean, logvar):
  kl = 0.5 * jnp.sum(jnp.exp(logvar) + mean**2 - 1.0 - logvar)
  return 0.5 * jnp.sum((recon - x) ** 2) + kl


class LinenVAE(nn.Module):
  d: Dims

  @nn.compact
  def __call__(self, x, eps):
    w, z = 4 * self.d.width, self.d.width // 2
    h = nn.relu(nn.Dense(w, name="enc_hidden")(x))
    mean, logvar = nn.Dense(z, name="enc_mean")(h), nn.Dense(z, name="enc_logvar")(h)
    code = mean + jnp.exp(0.5 * logvar) * eps
    h = nn.relu(nn.Dense(w, name="dec_hidden")(code))
    return nn.Dense(x.shape[-1], name="dec_out")(h), mean, logvar


def linen_vae(d: Dims) -> Case:
  k = _keys(14, 2)
  features = d.image * d.image
  model = LinenVAE(d)
  batch = _vae_batch(k[1], d, features, d.width // 2)
  params = model.init(k[0], batch["x"][0], batch["eps"][0])["params"]

  def loss(p, ex):
    recon, mean, logvar = model.apply({"params": p}, ex["x"], ex["eps"])
    return _vae_loss(recon, ex["x"], mean, logvar)

  groups = {"encoder": ["enc_*/**"], "decoder": ["**"]}
  return Case("VAE", "flax.linen", params, loss, batch, groups)


# =============================================================================================
# Flax NNX


def _rope(x, positions):
  """Rotary position embedding over the last axis of x [T, H, Dh]."""
  half = x.shape[-1] // 2
  freq = 1.0 / (10_000 ** (jnp.arange(half) / half))
  angle = positions[:, None, None] * freq
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate(
    [x1 * jnp.cos(angle) - x2 * jnp.sin(angle), x2 * jnp.cos(angle) + x1 * jnp.sin(angle)], -1
  )


class GemmaBlock(nnx.Module):
  """RMSNorm, multi-query attention with rotary positions, gated-GELU MLP."""

  def __init__(self, d: Dims, rngs: nnx.Rngs):
    self.heads, self.head_dim = d.heads, d.width // d.heads
    self.pre_attn = nnx.RMSNorm(d.width, rngs=rngs)
    self.q = nnx.Linear(d.width, d.width, use_bias=False, rngs=rngs)
    self.kv = nnx.Linear(d.width, 2 * self.head_dim, use_bias=False, rngs=rngs)
    self.out = nnx.Linear(d.width, d.width, use_bias=False, rngs=rngs)
    self.pre_mlp = nnx.RMSNorm(d.width, rngs=rngs)
    self.gate = nnx.Linear(d.width, 2 * d.width, use_bias=False, rngs=rngs)
    self.up = nnx.Linear(d.width, 2 * d.width, use_bias=False, rngs=rngs)
    self.down = nnx.Linear(2 * d.width, d.width, use_bias=False, rngs=rngs)

  def __call__(self, x):
    t = x.shape[0]
    pos = jnp.arange(t)
    h = self.pre_attn(x)
    q = _rope(self.q(h).reshape(t, self.heads, self.head_dim), pos)
    k, v = jnp.split(self.kv(h).reshape(t, 1, 2 * self.head_dim), 2, -1)
    k = _rope(k, pos)
    scores = jnp.einsum("thd,shd->hts", q, k) / np.sqrt(self.head_dim)
    probs = jax.nn.softmax(jnp.where(_causal(t), scores, -1e9), -1)
    x = x + self.out(jnp.einsum("hts,shd->thd", probs, v).reshape(t, -1))
    h = self.pre_mlp(x)
    return x + self.down(jax.nn.gelu(self.gate(h)) * self.up(h))


class Gemma(nnx.Module):
  def __init__(self, d: Dims, rngs: nnx.Rngs):
    self.width = d.width
    self.embed = nnx.Embed(d.vocab, d.width, rngs=rngs)
    self.blocks = nnx.List([GemmaBlock(d, rngs) for _ in range(d.depth)])
    self.final_norm = nnx.RMSNorm(d.width, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) * np.sqrt(self.width)
    for block in self.blocks:
      x = block(x)
    return self.embed.attend(self.final_norm(x))  # tied embeddings


def nnx_gemma(d: Dims) -> Case:
  graphdef, params = nnx.split(Gemma(d, nnx.Rngs(20)), nnx.Param)
  batch = {"tokens": _tokens(jax.random.key(21), d)}

  def loss(p, ex):
    return _lm_loss(nnx.merge(graphdef, p)(ex["tokens"][:-1]), ex["tokens"])

  half = d.depth // 2
  groups = {
    "embed": ["embed/**", "final_norm/**"],
    "early": [f"blocks/{i}/**" for i in range(half)],
    "late": ["**"],
  }
  return Case("Gemma-style transformer", "flax.nnx", params, loss, batch, groups)


class ScanBlock(nnx.Module):
  def __init__(self, width: int, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.mlp_in = nnx.Linear(width, 4 * width, rngs=rngs)
    self.mlp_out = nnx.Linear(4 * width, width, rngs=rngs)

  def __call__(self, x):
    return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.norm(x))))


class ScannedStack(nnx.Module):
  """A layer stack whose parameters carry a leading layer axis (built by nnx.vmap) and which
  runs under nnx.scan, like scanned NNX transformers."""

  def __init__(self, d: Dims, rngs: nnx.Rngs):
    self.embed = nnx.Embed(d.vocab, d.width, rngs=rngs)

    @nnx.split_rngs(splits=d.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs: nnx.Rngs):
      return ScanBlock(d.width, rngs)

    self.layers = make(rngs)
    self.head = nnx.Linear(d.width, d.vocab, rngs=rngs)

  def __call__(self, tokens):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, layer: ScanBlock):
      return layer(x)

    return self.head(run(self.embed(tokens), self.layers))


def nnx_scanned(d: Dims) -> Case:
  graphdef, params = nnx.split(ScannedStack(d, nnx.Rngs(22)), nnx.Param)
  batch = {"tokens": _tokens(jax.random.key(23), d)}

  def loss(p, ex):
    return _lm_loss(nnx.merge(graphdef, p)(ex["tokens"][:-1]), ex["tokens"])

  groups = {"embed": ["embed/**"], "layers": ["layers/**"], "head": ["**"]}
  return Case("scanned layer stack", "flax.nnx", params, loss, batch, groups)


class NnxVAE(nnx.Module):
  def __init__(self, features: int, d: Dims, rngs: nnx.Rngs):
    w, z = 4 * d.width, d.width // 2
    self.enc_hidden = nnx.Linear(features, w, rngs=rngs)
    self.enc_mean = nnx.Linear(w, z, rngs=rngs)
    self.enc_logvar = nnx.Linear(w, z, rngs=rngs)
    self.dec_hidden = nnx.Linear(z, w, rngs=rngs)
    self.dec_out = nnx.Linear(w, features, rngs=rngs)

  def __call__(self, x, eps):
    h = jax.nn.relu(self.enc_hidden(x))
    mean, logvar = self.enc_mean(h), self.enc_logvar(h)
    h = jax.nn.relu(self.dec_hidden(mean + jnp.exp(0.5 * logvar) * eps))
    return self.dec_out(h), mean, logvar


def nnx_vae(d: Dims) -> Case:
  features = d.image * d.image
  graphdef, params = nnx.split(NnxVAE(features, d, nnx.Rngs(24)), nnx.Param)
  batch = _vae_batch(jax.random.key(25), d, features, d.width // 2)

  def loss(p, ex):
    recon, mean, logvar = nnx.merge(graphdef, p)(ex["x"], ex["eps"])
    return _vae_loss(recon, ex["x"], mean, logvar)

  return Case("VAE", "flax.nnx", params, loss, batch, {"encoder": ["enc_*/**"], "decoder": ["**"]})


class NnxBNNet(nnx.Module):
  def __init__(self, d: Dims, train: bool, rngs: nnx.Rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.norm = nnx.BatchNorm(8, use_running_average=not train, rngs=rngs)
    self.head = nnx.Linear(8, 10, rngs=rngs)

  def __call__(self, x):
    return self.head(jax.nn.relu(self.norm(self.conv(x))).mean((-3, -2)))


def nnx_batchnorm_train(d: Dims) -> Case:
  graphdef, params, rest = nnx.split(NnxBNNet(d, True, nnx.Rngs(26)), nnx.Param, ...)
  batch = _images(jax.random.key(27), d)

  def loss(p, ex):
    return _xent(nnx.merge(graphdef, p, rest)(ex["x"][None])[0], ex["y"])

  groups = {"body": ["conv/**", "norm/**"], "head": ["**"]}
  return Case("CNN, training BatchNorm", "flax.nnx", params, loss, batch, groups)


# =============================================================================================
# Equinox


def _eqx_case(name: str, model, apply: Callable, batch, groups) -> Case:
  params, static = eqx.partition(model, eqx.is_inexact_array)

  def loss(p, ex):
    return apply(eqx.combine(p, static), ex)

  return Case(name, "equinox", params, loss, batch, groups)


def _class_batch(key, d: Dims, features: int):
  kx, ky = jax.random.split(key)
  return {
    "x": jax.random.normal(kx, (d.batch, features)),
    "y": jax.random.randint(ky, (d.batch,), 0, 10),
  }


def eqx_mlp(d: Dims) -> Case:
  model = eqx.nn.MLP(d.width, 10, 4 * d.width, d.depth, key=jax.random.key(30))
  batch = _class_batch(jax.random.key(31), d, d.width)
  apply = lambda m, ex: _xent(m(ex["x"]), ex["y"])
  groups = {"first": ["layers/0/**"], "last": [f"layers/{d.depth}/**"], "hidden": ["**"]}
  return _eqx_case("MLP", model, apply, batch, groups)


def eqx_cnn(d: Dims) -> Case:
  k = _keys(32, 4)
  c = max(4, d.width // 2)
  side = d.image // 4
  model = [
    eqx.nn.Conv2d(3, c, 3, padding=1, key=k[0]),
    eqx.nn.Conv2d(c, c, 3, padding=1, key=k[1]),
    eqx.nn.Linear(c * side * side, 10, key=k[2]),
  ]
  pool = eqx.nn.AvgPool2d(2, 2)

  def apply(m, ex):
    h = pool(jax.nn.relu(m[0](ex["x"])))
    h = pool(jax.nn.relu(m[1](h)))
    return _xent(m[2](h.reshape(-1)), ex["y"])

  return _eqx_case(
    "CNN",
    model,
    apply,
    _images(k[3], d, True),
    {"conv0": ["0/**"], "conv1": ["1/**"], "head": ["**"]},
  )


def eqx_gru(d: Dims) -> Case:
  k = _keys(33, 4)
  model = {
    "embed": eqx.nn.Embedding(d.vocab, d.width, key=k[0]),
    "cell": eqx.nn.GRUCell(d.width, d.width, key=k[1]),
    "head": eqx.nn.Linear(d.width, 10, key=k[2]),
  }
  batch = {
    "tokens": jax.random.randint(k[3], (d.batch, d.seq), 1, d.vocab),
    "y": jax.random.randint(jax.random.fold_in(k[3], 1), (d.batch,), 0, 10),
  }

  def apply(m, ex):
    xs = jax.vmap(m["embed"])(ex["tokens"])
    h, _ = jax.lax.scan(lambda h, x: (m["cell"](x, h), None), jnp.zeros(d.width), xs)
    return _xent(m["head"](h), ex["y"])

  return _eqx_case(
    "GRU", model, apply, batch, {"embed": ["embed/**"], "cell": ["cell/**"], "head": ["**"]}
  )


class EqxBlock(eqx.Module):
  """Pre-LN transformer block on [T, D]."""

  ln1: eqx.nn.LayerNorm
  attn: eqx.nn.MultiheadAttention
  ln2: eqx.nn.LayerNorm
  mlp_in: eqx.nn.Linear
  mlp_out: eqx.nn.Linear
  causal: bool = eqx.field(static=True)

  def __init__(self, width: int, heads: int, causal: bool, key):
    k = jax.random.split(key, 3)
    self.ln1, self.ln2 = eqx.nn.LayerNorm(width), eqx.nn.LayerNorm(width)
    self.attn = eqx.nn.MultiheadAttention(heads, width, key=k[0])
    self.mlp_in = eqx.nn.Linear(width, 4 * width, key=k[1])
    self.mlp_out = eqx.nn.Linear(4 * width, width, key=k[2])
    self.causal = causal

  def __call__(self, x):
    h = jax.vmap(self.ln1)(x)
    mask = _causal(x.shape[0]) if self.causal else None
    x = x + self.attn(h, h, h, mask=mask)
    h = jax.vmap(self.ln2)(x)
    return x + jax.vmap(lambda r: self.mlp_out(jax.nn.gelu(self.mlp_in(r))))(h)


class EqxViT(eqx.Module):
  patch: eqx.nn.Conv2d
  pos: jax.Array
  blocks: list
  norm: eqx.nn.LayerNorm
  head: eqx.nn.Linear

  def __init__(self, d: Dims, key):
    k = jax.random.split(key, d.depth + 3)
    p = max(2, d.image // 4)
    self.patch = eqx.nn.Conv2d(3, d.width, p, stride=p, key=k[0])
    self.pos = 0.02 * jax.random.normal(k[1], ((d.image // p) ** 2 + 1, d.width))
    self.blocks = [EqxBlock(d.width, d.heads, False, k[2 + i]) for i in range(d.depth)]
    self.norm = eqx.nn.LayerNorm(d.width)
    self.head = eqx.nn.Linear(d.width, 10, key=k[-1])

  def __call__(self, x):
    h = self.patch(x)
    h = h.reshape(h.shape[0], -1).T
    h = jnp.concatenate([jnp.zeros((1, h.shape[1])), h]) + self.pos  # class token slot
    for block in self.blocks:
      h = block(h)
    return self.head(self.norm(h[0]))


def eqx_vit(d: Dims) -> Case:
  model = EqxViT(d, jax.random.key(34))
  half = d.depth // 2
  groups = {
    "embed": ["patch/**", "pos"] + [f"blocks/{i}/**" for i in range(half)],
    "late": ["blocks/**"],
    "head": ["**"],
  }
  apply = lambda m, ex: _xent(m(ex["x"]), ex["y"])
  return _eqx_case("ViT", model, apply, _images(jax.random.key(35), d, True), groups)


class EqxUNet(eqx.Module):
  """Two-level UNet (conv, GroupNorm, strided down, transposed up, skip concatenation) with a
  per-pixel denoising loss."""

  down: list
  mid: eqx.nn.Conv2d
  up: list
  out: eqx.nn.Conv2d

  def __init__(self, d: Dims, key):
    k = jax.random.split(key, 8)
    c = max(4, d.width // 4)
    self.down = [
      (eqx.nn.Conv2d(3, c, 3, padding=1, key=k[0]), eqx.nn.GroupNorm(2, c)),
      (eqx.nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, key=k[1]), eqx.nn.GroupNorm(2, 2 * c)),
    ]
    self.mid = eqx.nn.Conv2d(2 * c, 2 * c, 3, padding=1, key=k[2])
    self.up = [
      eqx.nn.ConvTranspose2d(2 * c, c, 4, stride=2, padding=1, key=k[3]),
      (eqx.nn.Conv2d(2 * c, c, 3, padding=1, key=k[4]), eqx.nn.GroupNorm(2, c)),
    ]
    self.out = eqx.nn.Conv2d(c, 3, 1, key=k[5])

  def __call__(self, x):
    (c0, n0), (c1, n1) = self.down
    s0 = jax.nn.silu(n0(c0(x)))
    h = jax.nn.silu(n1(c1(s0)))
    h = jax.nn.silu(self.mid(h)) + h
    h = self.up[0](h)
    conv, norm = self.up[1]
    h = jax.nn.silu(norm(conv(jnp.concatenate([h, s0], 0))))
    return self.out(h)


def eqx_unet(d: Dims) -> Case:
  model = EqxUNet(d, jax.random.key(36))
  k = _keys(37, 2)
  clean = jax.random.normal(k[0], (d.batch, 3, d.image, d.image))
  batch = {"x": clean + jax.random.normal(k[1], clean.shape), "target": clean}
  apply = lambda m, ex: jnp.mean((m(ex["x"]) - ex["target"]) ** 2)
  groups = {"down": ["down/**"], "up": ["up/**", "mid/**"], "out": ["**"]}
  return _eqx_case("UNet", model, apply, batch, groups)


def eqx_scanned(d: Dims) -> Case:
  """A causal transformer whose blocks are built by `eqx.filter_vmap` (one leading layer axis per
  leaf) and applied by `lax.scan`, the Equinox idiom for deep stacks."""
  k = _keys(38, 4)
  blocks = eqx.filter_vmap(lambda key: EqxBlock(d.width, d.heads, True, key))(
    jax.random.split(k[0], d.depth)
  )
  block_params, block_static = eqx.partition(blocks, eqx.is_inexact_array)
  model = {
    "embed": eqx.nn.Embedding(d.vocab, d.width, key=k[1]),
    "blocks": block_params,
    "norm": eqx.nn.LayerNorm(d.width),
    "head": eqx.nn.Linear(d.width, d.vocab, key=k[2]),
  }

  def apply(m, ex):
    h = jax.vmap(m["embed"])(ex["tokens"][:-1])
    body = lambda h, p: (eqx.combine(p, block_static)(h), None)
    h, _ = jax.lax.scan(body, h, m["blocks"])
    return _lm_loss(jax.vmap(lambda r: m["head"](m["norm"](r)))(h), ex["tokens"])

  batch = {"tokens": _tokens(k[3], d)}
  groups = {"embed": ["embed/**"], "blocks": ["blocks/**"], "head": ["**"]}
  return _eqx_case("scanned transformer", model, apply, batch, groups)


def eqx_batchnorm_train(d: Dims) -> Case:
  k = _keys(39, 3)
  conv = eqx.nn.Conv2d(3, 8, 3, padding=1, key=k[0])
  bn = eqx.nn.BatchNorm(8, axis_name="batch")
  head = eqx.nn.Linear(8, 10, key=k[1])
  state = eqx.nn.State(bn)

  def apply(m, ex):
    h, _ = m[1](m[0](ex["x"]), state)
    return _xent(m[2](jax.nn.relu(h).mean((1, 2))), ex["y"])

  groups = {"body": ["0/**", "1/**"], "head": ["**"]}
  return _eqx_case(
    "CNN, training BatchNorm", [conv, bn, head], apply, _images(k[2], d, True), groups
  )


# =============================================================================================
# Haiku


def _hk_case(name: str, forward: Callable, example, apply: Callable, batch, groups) -> Case:
  f = hk.without_apply_rng(hk.transform(forward))
  params = f.init(jax.random.key(40), *example)

  def loss(p, ex):
    return apply(lambda *a: f.apply(p, *a), ex)

  return Case(name, "haiku", params, loss, batch, groups)


def hk_mlp(d: Dims) -> Case:
  forward = lambda x: hk.nets.MLP([4 * d.width] * d.depth + [10])(x)
  batch = _class_batch(jax.random.key(41), d, d.width)
  apply = lambda f, ex: _xent(f(ex["x"]), ex["y"])
  groups = {
    "first": ["mlp/~/linear_0/**"],
    "last": [f"mlp/~/linear_{d.depth}/**"],
    "hidden": ["**"],
  }
  return _hk_case("MLP", forward, (batch["x"][0],), apply, batch, groups)


def hk_cnn(d: Dims) -> Case:
  c = max(4, d.width // 2)

  def forward(x):
    h = jax.nn.relu(hk.Conv2D(c, 3, name="conv_0")(x))
    h = hk.avg_pool(h, 2, 2, "VALID")
    h = jax.nn.relu(hk.Conv2D(c, 3, name="conv_1")(h))
    h = hk.avg_pool(h, 2, 2, "VALID")
    return hk.Linear(10, name="head")(h.reshape(-1))

  batch = _images(jax.random.key(42), d)
  apply = lambda f, ex: _xent(f(ex["x"]), ex["y"])
  groups = {"conv0": ["conv_0/**"], "conv1": ["conv_1/**"], "head": ["**"]}
  return _hk_case("CNN", forward, (batch["x"][0],), apply, batch, groups)


def _hk_sequence_batch(key, d: Dims):
  k1, k2 = jax.random.split(key)
  return {
    "tokens": jax.random.randint(k1, (d.batch, d.seq), 1, d.vocab),
    "y": jax.random.randint(k2, (d.batch,), 0, 10),
  }


def hk_lstm(d: Dims) -> Case:
  def forward(tokens):
    x = hk.Embed(d.vocab, d.width, name="embed")(tokens)
    core = hk.LSTM(d.width, name="lstm")
    out, _ = hk.dynamic_unroll(core, x, core.initial_state(None))
    return hk.Linear(10, name="head")(out[-1])

  batch = _hk_sequence_batch(jax.random.key(43), d)
  apply = lambda f, ex: _xent(f(ex["tokens"]), ex["y"])
  groups = {"embed": ["embed/**"], "lstm": ["lstm/**"], "head": ["**"]}
  return _hk_case("LSTM (dynamic_unroll)", forward, (batch["tokens"][0],), apply, batch, groups)


def hk_deeprnn(d: Dims) -> Case:
  def forward(tokens):
    x = hk.Embed(d.vocab, d.width, name="embed")(tokens)
    core = hk.DeepRNN(
      [hk.LSTM(d.width, name="lstm_0"), jax.nn.relu, hk.LSTM(d.width, name="lstm_1")]
    )
    out, _ = hk.dynamic_unroll(core, x, core.initial_state(None))
    return hk.Linear(10, name="head")(out[-1])

  batch = _hk_sequence_batch(jax.random.key(44), d)
  apply = lambda f, ex: _xent(f(ex["tokens"]), ex["y"])
  groups = {"embed": ["embed/**"], "lstm_0": ["**/lstm_0/**"], "rest": ["**"]}
  return _hk_case("DeepRNN", forward, (batch["tokens"][0],), apply, batch, groups)


def _hk_block(d: Dims, x):
  h = hk.LayerNorm(-1, True, True, name="ln_attn")(x)
  attn = hk.MultiHeadAttention(
    d.heads, d.width // d.heads, w_init=hk.initializers.VarianceScaling(1.0), name="attn"
  )
  x = x + attn(h, h, h, mask=_causal(x.shape[0])[None])
  h = hk.LayerNorm(-1, True, True, name="ln_mlp")(x)
  h = hk.Linear(d.width, name="mlp_out")(jax.nn.gelu(hk.Linear(4 * d.width, name="mlp_in")(h)))
  return x + h


def hk_attention(d: Dims) -> Case:
  def forward(tokens):
    x = hk.Embed(d.vocab, d.width, name="embed")(tokens)
    for i in range(d.depth):
      with hk.name_scope(f"block_{i}"):
        x = _hk_block(d, x)
    return hk.Linear(d.vocab, name="head")(x)

  batch = {"tokens": _tokens(jax.random.key(45), d)}
  apply = lambda f, ex: _lm_loss(f(ex["tokens"][:-1]), ex["tokens"])
  groups = {"embed": ["embed/**"], "blocks": ["block_*/**"], "head": ["**"]}
  return _hk_case("attention LM", forward, (batch["tokens"][0, :-1],), apply, batch, groups)


def hk_layer_stack(d: Dims) -> Case:
  def forward(tokens):
    x = hk.Embed(d.vocab, d.width, name="embed")(tokens)
    x = hk.layer_stack(d.depth, name="stack")(lambda h: _hk_block(d, h))(x)
    return hk.Linear(d.vocab, name="head")(x)

  batch = {"tokens": _tokens(jax.random.key(46), d)}
  apply = lambda f, ex: _lm_loss(f(ex["tokens"][:-1]), ex["tokens"])
  groups = {"embed": ["embed/**"], "stack": ["stack/**"], "head": ["**"]}
  return _hk_case("hk.layer_stack LM", forward, (batch["tokens"][0, :-1],), apply, batch, groups)


MODELS: dict[str, Callable[[Dims], Case]] = {
  "linen_lm": linen_lm,
  "linen_resnet": linen_resnet,
  "linen_bilstm": linen_bilstm,
  "linen_seq2seq": linen_seq2seq,
  "linen_vae": linen_vae,
  "nnx_gemma": nnx_gemma,
  "nnx_scanned": nnx_scanned,
  "nnx_vae": nnx_vae,
  "eqx_mlp": eqx_mlp,
  "eqx_cnn": eqx_cnn,
  "eqx_gru": eqx_gru,
  "eqx_vit": eqx_vit,
  "eqx_unet": eqx_unet,
  "eqx_scanned": eqx_scanned,
  "hk_mlp": hk_mlp,
  "hk_cnn": hk_cnn,
  "hk_lstm": hk_lstm,
  "hk_deeprnn": hk_deeprnn,
  "hk_attention": hk_attention,
  "hk_layer_stack": hk_layer_stack,
}

COUPLED: dict[str, Callable[[Dims], Case]] = {
  "linen_resnet_train": lambda d: _linen_resnet(d, train=True),
  "nnx_batchnorm_train": nnx_batchnorm_train,
  "eqx_batchnorm_train": eqx_batchnorm_train,
}


def build(name: str, size: str = "quick") -> Case:
  """The zoo model `name` (a key of MODELS or COUPLED) at `size` (a key of SIZES)."""
  return {**MODELS, **COUPLED}[name](SIZES[size])
