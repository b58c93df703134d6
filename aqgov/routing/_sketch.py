"""Gradient sketches: seeded random projections of each example's routed gradient, per group.

A sketch of example i at group g is `φ_g(i) = Σ_{leaves l of g} R_l vec(w_i[g] ∇_l L_i)`, a
[dim] vector (Johnson–Lindenstrauss: inner products of sketches estimate inner products of the
gradients, which is what TracIn-style attribution needs). The projections `R_l` are a pure
function of `SketchSpec.seed` and the leaf's position in the parameter tree, so a probe's
gradient is projected identically later, from the spec alone.

Each leaf is viewed as a matrix X [m, n] (`leaf_view`: all axes but the last, by the last; a vector
folded to about √n by √n). For a
matrix leaf `R_l` is Kronecker-structured as in LoGra: `R_l vec(X) = vec(P X Qᵀ)` with P [k1, m],
Q [k2, n], k1·k2 = dim. At a matmul whose per-example gradient is `A_iᵀ G_i` (operand A_i [F, m],
output cotangent G_i [F, n], as the backward pass has them at the use, `_site_stats`) that is
`(A_i Pᵀ)ᵀ (G_i Qᵀ)`, and at a convolution the same with A_i the input patches: no per-example
gradient is formed. A leaf too small (or too thin) to factor has a dense R [dim, m·n].
Anywhere else (a gather, an elementwise parameter, tied weights, a leaf used inside a scan, a
layout the Kronecker form does not match) the example's gradient of that leaf is formed (one
equation's VJP per example, or the materialised probe gradient) and projected; it is the
fallback, exact but not free.

An example whose weight at a leaf is 0 has a sketch of exactly +0.0 there (a select, not a
multiply), so an example routed away from a group has a bitwise-zero sketch at it.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from aqgov.errors import RoutingError
from aqgov.routing import _ghost_norms as ghost_norms
from aqgov.routing import _jax_compat as jc
from aqgov.routing._analysis import Site
from aqgov.routing._transforms import broadcast_weight

DTYPES = ("bfloat16", "float16", "float32")
_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class SketchSpec:
  """What a sketch is: `dim` entries per example and group, projections seeded by `seed`, stored
  as `dtype` (bfloat16 by default: half the bytes of float32, the range of float32)."""

  dim: int = 256
  seed: int = 0
  dtype: str = "bfloat16"

  def __post_init__(self):
    if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
      raise RoutingError(f"sketch dim must be a positive int, got {self.dim!r}")
    if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
      raise RoutingError(f"sketch seed must be an int in [0, 2**32), got {self.seed!r}")
    if self.dtype not in DTYPES:
      raise RoutingError(f"sketch dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

  @property
  def factors(self) -> tuple[int, int]:
    """(k1, k2): the Kronecker factors of `dim`, k1 the largest divisor not above its square root."""
    k1 = max(d for d in range(1, math.isqrt(self.dim) + 1) if self.dim % d == 0)
    return k1, self.dim // k1

  def to_wire(self) -> dict:
    return {"dim": self.dim, "seed": self.seed, "dtype": self.dtype}


def leaf_view(shape: tuple[int, ...]) -> tuple[int, int]:
  """(m, n): the matrix a leaf of `shape` is viewed as: all axes but the last, by the last; a
  vector of n entries as [m, n / m] with m its largest divisor not above √n (so that a bias's
  projection is Kronecker too, ~√n times cheaper than a dense one)."""
  if len(shape) <= 1:
    n = math.prod(shape)
    m = max(d for d in range(1, math.isqrt(max(n, 1)) + 1) if n % d == 0) if n else 1
    return m, n // m if m else 0
  return math.prod(shape[:-1]), shape[-1]


def is_kronecker(spec: SketchSpec, shape: tuple[int, ...]) -> bool:
  """Whether a leaf of `shape` is projected by P X Qᵀ (else by a dense R)."""
  m, n = leaf_view(shape)
  return min(m, n) > 1 and m * n > spec.dim


def projections(spec: SketchSpec, leaf: int, shape: tuple[int, ...]) -> tuple[jax.Array, ...]:
  """The projection of parameter leaf number `leaf`: (P [k1, m], Q [k2, n]) or (R [dim, m·n],).

  Gaussian, scaled so that E‖R x‖² = ‖x‖²; a pure function of (seed, leaf, shape). Computed once
  per (spec, leaf, shape) and entered into a jitted step as constants, never regenerated per step."""
  return tuple(jnp.asarray(x) for x in _projections(spec, int(leaf), tuple(int(d) for d in shape)))


@functools.lru_cache(maxsize=256)
def _projections(spec: SketchSpec, leaf: int, shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
  with jax.ensure_compile_time_eval():
    key = jax.random.fold_in(jax.random.key(spec.seed), leaf)
    m, n = leaf_view(shape)
    if is_kronecker(spec, shape):
      k1, k2 = spec.factors
      kp, kq = jax.random.split(key)
      p = jax.random.normal(kp, (k1, m), jnp.float32) / np.sqrt(k1)
      q = jax.random.normal(kq, (k2, n), jnp.float32) / np.sqrt(k2)
      return np.asarray(p), np.asarray(q)
    return (np.asarray(jax.random.normal(key, (spec.dim, m * n), jnp.float32) / np.sqrt(spec.dim)),)


def project(proj: tuple[jax.Array, ...], grads: jax.Array) -> jax.Array:
  """[B, dim] projections of per-example gradients [B, *leaf] of one leaf."""
  b = grads.shape[0]
  g = grads.astype(jnp.float32)
  if len(proj) == 1:
    return jnp.matmul(g.reshape(b, -1), proj[0].T, precision=_HI)
  p, q = proj
  x = g.reshape(b, p.shape[1], q.shape[1])
  return jnp.einsum("im,bmn,jn->bij", p, x, q, precision=_HI).reshape(b, -1)


def _kron(p, q, a, g) -> jax.Array:
  """[B, k1·k2] = (A_b Pᵀ)ᵀ (G_b Qᵀ) for A [B, F, m], G [B, F, n]: two plain matmuls over all
  rows of the batch, then one small product per example."""
  b, f = a.shape[:2]
  ap = jnp.matmul(a.reshape(b * f, -1), p.T, precision=_HI).reshape(b, f, -1)
  gq = jnp.matmul(g.reshape(b * f, -1), q.T, precision=_HI).reshape(b, f, -1)
  if f == 1:
    return (ap[:, 0, :, None] * gq[:, 0, None, :]).reshape(b, -1)
  return jnp.einsum("bfi,bfj->bij", ap, gq, precision=_HI).reshape(b, -1)


def _dot_layout(site: Site, shape: tuple[int, ...]) -> str | None:
  """ "CW" when the leaf's [m, n] view is [contracting, free] (per-example gradient A_iᵀ G_i),
  "WC" when it is [free, contracting] (gradient G_iᵀ A_i), None when neither or batched."""
  (lc, rc), (lb, rb) = site.dot.dimension_numbers
  pc, pb = (rc, rb) if site.dot.param_is_rhs else (lc, lb)
  if pb:
    return None
  nd = len(shape)
  pc = tuple(pc)
  if nd < 2:  # a vector's [m, n] view is not its gradient's layout at a matmul
    return None
  if pc == tuple(range(nd - 1)):
    return "CW"
  if pc == (nd - 1,):
    return "WC"
  return None


def _conv_kronecker(site: Site, shape: tuple[int, ...]) -> bool:
  """A kernel laid out [spatial..., in, out] (HWIO): its [m, n] view matches the patch order."""
  if not site.conv:
    return False
  nd = len(shape)
  spec = tuple(jc.conv_params(site.eqn.params).dimension_numbers.rhs_spec)
  return spec == (nd - 1, nd - 2, *range(nd - 2))


def _rows(x: jax.Array, n: int) -> jax.Array:
  return x.reshape(x.shape[0], -1, n).astype(jnp.float32)


def site_sketch(spec: SketchSpec, site: Site, leaf, acts: list, cots) -> jax.Array:
  """[B, dim] sketches of one use site's per-example gradients, from its non-parameter operands
  `acts` (each [B, ...]) and output cotangents `cots` [B, *out] (the weight is on one of them)."""
  shape = tuple(jnp.shape(leaf))
  proj = projections(spec, site.leaf, shape)
  if len(proj) == 2 and site.dot is not None:
    layout = _dot_layout(site, shape)
    if layout is not None:
      a, g = jax.vmap(lambda x, c: ghost_norms.rearrange(site.dot, x, c))(acts[0], cots)
      a, g = a[:, 0], g[:, 0]  # no batch dims: D = 1
      return _kron(*proj, a, g) if layout == "CW" else _kron(*proj, g, a)
  if len(proj) == 2 and _conv_kronecker(site, shape):
    conv = jc.conv_params(site.eqn.params)
    out_spec = conv.dimension_numbers.out_spec
    patches = jax.vmap(lambda x: ghost_norms._patches(conv, shape, x))(acts[0])
    g = jnp.transpose(cots, (0, 1 + out_spec[0], *(1 + d for d in out_spec[2:]), 1 + out_spec[1]))
    return _kron(*proj, patches.astype(jnp.float32), _rows(g, shape[-1]))
  return project(proj, site_grads(site, leaf, acts, cots))


def site_grads(site: Site, leaf, acts: list, cots) -> jax.Array:
  """[B, *leaf] per-example gradients at one site by that equation's VJP (the fallback)."""

  def one(others, cot):
    def op(p):
      operands = list(others)
      operands.insert(site.param_pos, p)
      return jc.bind(site.eqn, operands)[0]

    _, vjp = jax.vjp(op, leaf)
    return vjp(cot.astype(site.eqn.outvars[0].aval.dtype))[0]

  return jax.vmap(one)(acts, cots)


def routed_only(sketch: jax.Array, weight: jax.Array) -> jax.Array:
  """`sketch` [B, dim] with the rows of examples whose weight at the leaf is all 0 set to +0.0."""
  w = jnp.asarray(weight)
  reached = jnp.any(w.reshape(w.shape[0], -1) != 0, axis=1)
  return jnp.where(reached[:, None], sketch, jnp.zeros((), sketch.dtype))


def group_sketches(
  spec: SketchSpec, leaf_sketches: list, leaf_group, num_groups: int, size: int
) -> jax.Array:
  """[B, G, dim] in `spec.dtype`: per-leaf sketches [B, dim] (None: no gradient) summed per group."""
  if len(leaf_sketches) != len(leaf_group):
    raise RoutingError(
      f"got sketches for {len(leaf_sketches)} leaves but the policy was compiled for "
      f"{len(leaf_group)}; compile it with the parameter pytree you differentiate"
    )
  per_group: list = [None] * num_groups
  for s, g in zip(leaf_sketches, leaf_group):
    if s is not None:
      s = s.astype(jnp.float32)
      per_group[int(g)] = s if per_group[int(g)] is None else per_group[int(g)] + s
  zero = jnp.zeros((size, spec.dim), jnp.float32)
  return jnp.stack([zero if s is None else s for s in per_group], axis=1).astype(spec.dtype)


def per_example_sketches(spec: SketchSpec, weights: list, grads: list) -> list:
  """Per leaf, [B, dim] sketches of materialised per-example gradients [B, *leaf] times their
  weights ([B] or [B, *slice]); the reference every other form equals."""
  out = []
  for i, (w, g) in enumerate(zip(weights, grads)):
    if not jnp.issubdtype(jnp.result_type(g), jnp.inexact) or g.ndim == 0:
      out.append(None)
      continue
    w = jnp.asarray(w, jnp.float32)
    wb = broadcast_weight(w, g)
    scaled = jnp.where(wb != 0, wb * g.astype(jnp.float32), jnp.float32(0))
    out.append(routed_only(project(projections(spec, i, g.shape[1:]), scaled), w))
  return out
