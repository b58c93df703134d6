"""Small models, random policies and a brute-force reference shared by the routing tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

import aqgov
from aqgov.examples import tiny_lm as tiny_lm

B = 5
KINDS = ("k0", "k1", "k2")
TAXONOMY = aqgov.Taxonomy.from_toml("""
[authority]
name = "t"
[fields.kind]
type = "enum"
values = ["k0", "k1", "k2"]
[fields.tier]
type = "int"
min = 0
max = 3
""")
SPACE = aqgov.credentials.LabelSpace.of(TAXONOMY)
WEIGHTS = (0.0, 0.25, 0.5, 1.0)


class Model(NamedTuple):
  name: str
  init: Callable[[jax.Array], Any]
  loss: Callable
  batch: Callable[[jax.Array, int], Any]
  segments: tuple[str, ...]  # top-level parameter names, the units random policies group


def _normal(key, shape, scale=1.0):
  return (
    jax.random.normal(key, shape, jnp.float32) * scale / np.sqrt(shape[0] if len(shape) > 1 else 1)
  )


def _xent(logits, label):
  return -jax.nn.log_softmax(logits)[label]


# -- MLP -------------------------------------------------------------------------------------


def _mlp_init(key):
  k = jax.random.split(key, 3)
  return {
    "l0": {"w": _normal(k[0], (4, 8)), "b": jnp.full((8,), 0.1)},
    "l1": {"w": _normal(k[1], (8, 8)), "b": jnp.full((8,), -0.1)},
    "head": {"w": _normal(k[2], (8, 3)), "b": jnp.zeros((3,))},
  }


def _mlp_loss(p, ex):
  h = jnp.tanh(ex["x"] @ p["l0"]["w"] + p["l0"]["b"])
  h = jax.nn.gelu(h @ p["l1"]["w"] + p["l1"]["b"])
  return _xent(h @ p["head"]["w"] + p["head"]["b"], ex["y"])


def _class_batch(shape):
  def make(key, n):
    kx, ky = jax.random.split(key)
    return {"x": jax.random.normal(kx, (n,) + shape), "y": jax.random.randint(ky, (n,), 0, 3)}

  return make


# -- small conv net ----------------------------------------------------------------------------


def _conv_init(key):
  k = jax.random.split(key, 2)
  return {
    "conv": {
      "kernel": jax.random.normal(k[0], (3, 3, 2, 4)) / np.sqrt(18),
      "bias": jnp.full((4,), 0.05),
    },
    "head": {"w": _normal(k[1], (4, 3)), "b": jnp.zeros((3,))},
  }


def _conv_loss(p, ex):
  y = jax.lax.conv_general_dilated(
    ex["x"][None], p["conv"]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )[0]
  h = jax.nn.relu(y + p["conv"]["bias"]).mean((0, 1))
  return _xent(h @ p["head"]["w"] + p["head"]["b"], ex["y"])


# -- attention block with LayerNorm and embeddings ---------------------------------------------

LM = tiny_lm.Config(seq_len=6, d_model=8, num_heads=2, num_blocks=1, adapter_dim=4)


def _lm_init(key):
  params = tiny_lm.init(key, LM)
  params["adapter"]["up"] = jax.random.normal(jax.random.fold_in(key, 1), (4, 8)) * 0.1
  return params


def _lm_loss(p, ex):
  return tiny_lm.example_loss(p, ex["tokens"], LM)


def _lm_batch(key, n):
  return {"tokens": jax.random.randint(key, (n, LM.seq_len + 1), 1, tiny_lm.VOCAB)}


# -- a lax.scan stack of residual blocks --------------------------------------------------------


def _scan_init(key):
  k = jax.random.split(key, 3)
  return {
    "embed": {"w": _normal(k[0], (4, 6))},
    "stack": {
      "w": jax.random.normal(k[1], (3, 6, 6)) / np.sqrt(6),
      "b": jnp.full((3, 6), 0.1),
      "scale": jnp.ones((3, 6)),
    },
    "head": {"w": _normal(k[2], (6, 3))},
  }


def _scan_loss(p, ex):
  def block(h, layer):
    z = (h - h.mean()) * jax.lax.rsqrt(h.var() + 1e-5) * layer["scale"]
    return h + jnp.tanh(z @ layer["w"] + layer["b"]), None

  h, _ = jax.lax.scan(block, ex["x"] @ p["embed"]["w"], p["stack"])
  return _xent(h @ p["head"]["w"], ex["y"])


MODELS = {
  "mlp": Model("mlp", _mlp_init, _mlp_loss, _class_batch((4,)), ("l0", "l1", "head")),
  "conv": Model("conv", _conv_init, _conv_loss, _class_batch((5, 5, 2)), ("conv", "head")),
  "attention": Model(
    "attention", _lm_init, _lm_loss, _lm_batch, ("embed", "blocks", "adapter", "head")
  ),
  "scan": Model("scan", _scan_init, _scan_loss, _class_batch((4,)), ("embed", "stack", "head")),
}


# -- random policies and labels ------------------------------------------------------------------


def _route(draw, groups) -> str:
  items = [f"{g} = {draw(st.sampled_from(WEIGHTS))}" for g in groups]
  return "{" + ", ".join(items) + "}"


@st.composite
def policy_tomls(draw, segments: tuple[str, ...], name: str = "p", visibility: bool = False) -> str:
  """A random policy over `segments`: random grouping (some segments maybe uncovered), one rule
  per kind with random group weights, and a random default route; with `visibility`, each group
  is declared `visible = "routed"` at random."""
  n_groups = draw(st.integers(1, len(segments)))
  owner = [draw(st.integers(0 if k == 0 else -1, n_groups - 1)) for k in range(len(segments))]
  groups = {
    f"{name}_g{j}": [f"{s}/**" for s, o in zip(segments, owner) if o == j] for j in range(n_groups)
  }
  groups = {g: pats for g, pats in groups.items() if pats}
  lines = [f'name = "{name}"']
  if draw(st.booleans()):
    lines.append(f"uncovered = {draw(st.sampled_from(WEIGHTS))}")
  lines.append("[groups]")
  for g, pats in groups.items():
    listed = "[" + ", ".join(f'"{p}"' for p in pats) + "]"
    routed = visibility and draw(st.booleans())
    lines.append(
      f'{g} = {{ patterns = {listed}, visible = "routed" }}' if routed else f"{g} = {listed}"
    )
  for kind in draw(st.lists(st.sampled_from(KINDS), unique=True)):
    lines += ["[[rules]]", f"when = \"kind == '{kind}'\"", f"route = {_route(draw, groups)}"]
  if draw(st.booleans()):
    lines += ["[[rules]]", 'when = "tier >= 2"', f"route = {_route(draw, groups)}"]
  lines += ["[default]", f"route = {_route(draw, groups)}"]
  if draw(st.booleans()):
    lines += ["[uncredentialed]", f"route = {_route(draw, groups)}"]
  return "\n".join(lines) + "\n"


@st.composite
def label_lists(draw, n: int = B) -> list:
  """Per-example labels; a few examples are uncredentialed (None)."""
  one = st.one_of(
    st.none(),
    st.builds(
      lambda k, t: {"t": {"kind": k, "tier": t}}, st.sampled_from(KINDS), st.integers(0, 3)
    ),
  )
  return draw(st.lists(one, min_size=n, max_size=n))


def compiled_policy(tomls: list[str], params) -> Any:
  policies = [aqgov.Policy.from_toml(t) for t in tomls]
  return aqgov.compile_policy(policies if len(policies) > 1 else policies[0], params, TAXONOMY)


# -- brute force -------------------------------------------------------------------------------

_GRADS: dict = {}


def example_grad(loss: Callable) -> Callable:
  if loss not in _GRADS:
    _GRADS[loss] = jax.jit(jax.grad(loss))
  return _GRADS[loss]


def seen_params(compiled, params, labels, i: int):
  """Example i's parameters: every leaf it may not see explicitly set to zero."""
  if compiled.leaf_hidden is None:
    return params
  hidden = compiled.leaf_hidden[int(compiled.route_class(labels)[i])]
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(
    treedef, [jnp.zeros_like(p) if h else p for p, h in zip(leaves, hidden)]
  )


def brute_force(loss: Callable, compiled, params, batch, labels) -> tuple[Any, np.ndarray]:
  """Python loop over examples in float64: the routed mean gradient and the [B, G] norms. Each
  example's gradient is taken at its own parameters, with the groups it may not see zeroed."""
  weights = jax.tree.map(np.asarray, compiled.leaf_weights(labels))
  n = jax.tree.leaves(batch)[0].shape[0]
  total = jax.tree.map(lambda p: np.zeros(np.shape(p), np.float64), params)
  norms = np.zeros((n, len(compiled.group_names)))
  for i in range(n):
    g = example_grad(loss)(
      seen_params(compiled, params, labels, i), jax.tree.map(lambda x: x[i], batch)
    )
    contrib = jax.tree.map(lambda w, gi: w[i] * np.asarray(gi, np.float64), weights, g)
    total = jax.tree.map(np.add, total, contrib)
    for leaf, group in zip(jax.tree.leaves(contrib), compiled.leaf_group):
      norms[i, group] += np.sum(leaf**2)
  return jax.tree.map(lambda t: t / n, total), np.sqrt(norms)


def group_errors(compiled, got, want) -> list[tuple[str, float, float]]:
  """Per group: (name, ||got - want||, ||want||) over the group's leaves."""
  diff = np.zeros(len(compiled.group_names))
  norm = np.zeros(len(compiled.group_names))
  for g, w, group in zip(jax.tree.leaves(got), jax.tree.leaves(want), compiled.leaf_group):
    diff[group] += np.sum((np.asarray(g, np.float64) - w) ** 2)
    norm[group] += np.sum(np.asarray(w) ** 2)
  return [
    (name, float(np.sqrt(d)), float(np.sqrt(n)))
    for name, d, n in zip(compiled.group_names, diff, norm)
  ]


def assert_matches(compiled, got, want, rtol: float = 1e-5) -> None:
  """Relative error per group against the group's gradient norm; unreached groups exactly zero."""
  for name, err, norm in group_errors(compiled, got, want):
    if norm == 0.0:
      assert err == 0.0, (
        f"group {name}: reached by no example, but its gradient is not zero ({err})"
      )
    else:
      assert err <= rtol * norm, f"group {name}: error {err:.3g} vs gradient norm {norm:.3g}"


_PER_EXAMPLE: dict = {}


def per_example_grads(loss: Callable) -> Callable:
  """Jitted `vmap(grad(loss))`: per-example gradients with a leading batch axis."""
  if loss not in _PER_EXAMPLE:
    _PER_EXAMPLE[loss] = jax.jit(jax.vmap(jax.grad(loss), (None, 0)))
  return _PER_EXAMPLE[loss]


def draw_case(
  data, model: Model, n: int = B, policies: int | None = None, visibility: bool = False
):
  """(params, batch, compiled policy, labels) for one hypothesis draw."""
  seed = data.draw(st.integers(0, 2**16), label="seed")
  params = model.init(jax.random.key(seed))
  batch = model.batch(jax.random.key(seed + 1), n)
  count = policies or data.draw(st.integers(1, 2), label="policies")
  tomls = [
    data.draw(policy_tomls(model.segments, f"p{k}", visibility), label=f"policy {k}")
    for k in range(count)
  ]
  compiled = compiled_policy(tomls, params)
  labels = SPACE.encode(data.draw(label_lists(n), label="labels"))
  return params, batch, compiled, labels
