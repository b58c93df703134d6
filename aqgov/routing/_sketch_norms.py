"""Sketched per-example contribution norms: unbiased estimates from random projections.

For a per-example weight gradient `M` (a matmul's `A_iᵀ G_i`, a convolution's kernel gradient),
`k` independent rank-one Gaussian projections `s_j = p_jᵀ M q_j` give `E[s_j²] = ||M||²`, so
`(1/k) Σ_j s_j²` is an unbiased estimate of the squared norm with relative standard deviation
`√(2/k)` for a gradient of high stable rank and at most `√(8/k)` (rank one). No per-example
gradient is formed: `s_j = Σ_f (A p_j)_f (G q_j)_f`, two thin products of the operands a matmul
has anyway; for a convolution `A p_j` is the convolution of the input with a random kernel of
one output channel. The projections are the same for every example and step, drawn from a
static seed, so a run's norms are reproducible; a batch dimension of the matmul (heads) gets
independent projections per block, so its blocks' norms add.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from aqgov.routing import _ghost_norms as ghost_norms
from aqgov.routing import _jax_compat as jc

Array = jax.Array


def _gaussians(seed: int, p_shape: tuple, q_shape: tuple) -> tuple[Array, Array]:
  """The projections of a site: drawn on the host once per trace, so a step only reads them."""
  rng = np.random.default_rng(seed)
  p = rng.standard_normal(p_shape, dtype=np.float32)
  return jnp.asarray(p), jnp.asarray(rng.standard_normal(q_shape, dtype=np.float32))


def dot_sketch(site: ghost_norms.DotSite, k: int, seed: int, act: Array, cot: Array) -> Array:
  """float32 [k] projections of one example's weight gradient at a matmul (see module doc)."""
  a, g = ghost_norms.rearrange(site, act, cot)  # [D, F, C], [D, F, W]
  p, q = _gaussians(seed, (a.shape[0], a.shape[2], k), (g.shape[0], g.shape[2], k))
  ap = jnp.einsum("dfc,dck->dfk", a, p)
  gq = jnp.einsum("dfw,dwk->dfk", g, q)
  return jnp.sum(ap * gq, axis=(0, 1))


def conv_sketch(
  params: dict, kernel_shape: tuple, k: int, seed: int, lhs: Array, cot: Array
) -> Array:
  """float32 [k] projections of one example's kernel gradient at a convolution: `⟨p_j ⊗ q_j,
  ∇K⟩ = ⟨conv(lhs, p_j) ⊗ q_j, G⟩`, with `p_j` over the kernel's input-channel and spatial axes
  and `q_j` over its output channels (needs `ghost_norms.conv_supported`)."""
  conv = jc.conv_params(params)
  dn = conv.dimension_numbers
  o_axis = dn.rhs_spec[0]
  p_shape = tuple(k if d == o_axis else n for d, n in enumerate(kernel_shape))
  p, q = _gaussians(seed, p_shape, (kernel_shape[o_axis], k))
  y = jax.lax.conv_general_dilated(
    lhs.astype(jnp.float32),
    p,
    conv.window_strides,
    conv.padding,
    conv.lhs_dilation,
    conv.rhs_dilation,
    dn,
    precision=jax.lax.Precision.HIGHEST,
  )
  y = jnp.moveaxis(y, dn.out_spec[1], -1)  # [..., k]
  gq = jnp.moveaxis(cot.astype(jnp.float32), dn.out_spec[1], -1) @ q
  return jnp.sum((y * gq).reshape(-1, k), axis=0)


def sketch_sq_norms(stats: Array) -> Array:
  """[B] squared-norm estimates from stacked projections [B, ..., k]."""
  k = stats.shape[-1]
  return jnp.sum(jnp.square(stats).reshape(stats.shape[0], -1), axis=1) / k
