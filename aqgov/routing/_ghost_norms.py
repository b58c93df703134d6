"""Per-example contribution norms of matmul and convolution weights, without per-example grads.

For `out = dot_general(a, W)` the per-example gradient of `W` is `A_iᵀ G_i`, with `A_i` the
activation rearranged to [batch dims, free dims, contracting dims] and `G_i` the output cotangent
rearranged to [batch dims, free dims of A, free dims of W]. Its squared Frobenius norm is
`Σ_d ⟨A_d A_dᵀ, G_d G_dᵀ⟩` (the "ghost norm"), which costs `F²(C + W)` instead of `F·C·W`
per batch dim; when the free axis is long the direct product is cheaper and is used instead.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from aqgov.routing import _jax_compat as jc

Array = jax.Array


class DotSite(NamedTuple):
  """A `dot_general` whose parameter operand is one raw parameter leaf."""

  leaf: int  # index of the parameter leaf (tree_leaves order)
  param_is_rhs: bool  # which operand of the dot_general is the parameter
  dimension_numbers: tuple  # ((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))
  act_shape: tuple[int, ...]  # per-example shape of the activation operand
  out_shape: tuple[int, ...]  # per-example shape of the dot_general output


def _sizes(site: DotSite) -> tuple[int, int, int, int]:
  """(D, F, C, W): batch, activation-free, contracting and parameter-free sizes per example."""
  (lc, rc), (lb, rb) = site.dimension_numbers
  contract, batch = (lc, lb) if site.param_is_rhs else (rc, rb)
  size = lambda dims: math.prod(site.act_shape[d] for d in dims)
  nd, nc = size(batch), size(contract)
  nf = math.prod(site.act_shape) // max(nd * nc, 1)
  nw = math.prod(site.out_shape) // max(nd * nf, 1)
  return nd, nf, nc, nw


def ghost_is_cheaper(site: DotSite) -> bool:
  """True when the Gram-matrix form costs less than forming each example's gradient."""
  _, nf, nc, nw = _sizes(site)
  return nf * (nc + nw) <= nc * nw


def _rearrange(site: DotSite, act: Array, cot: Array) -> tuple[Array, Array]:
  """Per-example activation as [D, F, C] and output cotangent as [D, F, W]."""
  (lc, rc), (lb, rb) = site.dimension_numbers
  contract, batch = (lc, lb) if site.param_is_rhs else (rc, rb)
  free = [d for d in range(act.ndim) if d not in contract and d not in batch]
  size = lambda dims: math.prod(act.shape[d] for d in dims)
  nd, nf, nc = size(batch), size(free), size(contract)
  a = jnp.transpose(act, (*batch, *free, *contract)).reshape(nd, nf, nc)
  nw = math.prod(site.out_shape) // max(nd * nf, 1)
  if site.param_is_rhs:  # out = [batch, act free, param free]
    g = cot.reshape(nd, nf, nw)
  else:  # out = [batch, param free, act free]
    g = jnp.swapaxes(cot.reshape(nd, nw, nf), 1, 2)
  return a.astype(jnp.float32), g.astype(jnp.float32)


def dot_sq_norm(site: DotSite, act: Array, cot: Array) -> Array:
  """Squared norm of one example's weight gradient `A_iᵀ G_i` (scalar), cheapest exact way."""
  a, g = _rearrange(site, act, cot)
  if ghost_is_cheaper(site):
    return jnp.sum(jnp.einsum("dfc,dgc->dfg", a, a) * jnp.einsum("dfw,dgw->dfg", g, g))
  return jnp.sum(jnp.square(jnp.einsum("dfc,dfw->dcw", a, g)))


def batched_dot_sq_norms(site: DotSite, acts: Array, cots: Array) -> Array:
  """[B] squared per-example weight-gradient norms from stacked activations and cotangents."""
  return jax.vmap(lambda a, g: dot_sq_norm(site, a, g))(acts, cots)


def materialised_sq_norms(per_example_grads: Array) -> Array:
  """[B] squared norms of materialised per-example gradients [B, *leaf]."""
  g = per_example_grads.astype(jnp.float32)
  return jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1)


def _patches(params: jc.ConvParams, kernel_shape: tuple[int, ...], lhs: Array) -> Array:
  """[positions, taps * C] input patches of a convolution, by strided slices (no arithmetic)."""
  dn = params.dimension_numbers
  nsp = len(dn.lhs_spec) - 2
  x = jnp.transpose(lhs, (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1]))  # N, spatial.., C
  zero = jnp.zeros((), x.dtype)
  config = (
    [(0, 0, 0)]
    + [(lo, hi, d - 1) for (lo, hi), d in zip(params.padding, params.lhs_dilation)]
    + [(0, 0, 0)]
  )
  x = jax.lax.pad(x, zero, config)
  filt = [kernel_shape[d] for d in dn.rhs_spec[2:]]
  rhs_dil, strides = params.rhs_dilation, params.window_strides
  out_sp = [(x.shape[1 + i] - (filt[i] - 1) * rhs_dil[i] - 1) // strides[i] + 1 for i in range(nsp)]
  taps = []
  for offset in itertools.product(*(range(f) for f in filt)):
    start = [0] + [o * d for o, d in zip(offset, rhs_dil)] + [0]
    limit = [x.shape[0]] + [s + (n - 1) * st + 1 for s, n, st in zip(start[1:], out_sp, strides)]
    taps.append(jax.lax.slice(x, start, limit + [x.shape[-1]], [1, *strides, 1]))
  p = jnp.stack(taps, axis=-2)  # N, out spatial.., taps, C
  return p.reshape(-1, p.shape[-2] * p.shape[-1])


def conv_sq_norm(params: dict, kernel_shape: tuple[int, ...], lhs: Array, cot: Array) -> Array:
  """Squared norm of one example's kernel gradient for `conv_general_dilated(lhs, kernel)`.

  The kernel gradient is `Pᵀ G` with `P` the input patches (one row per output position) and `G`
  the output cotangent; the order of patch features does not change the norm. Needs
  `feature_group_count == batch_group_count == 1` (see `conv_supported`); `params` is the
  equation's parameter dict."""
  conv = jc.conv_params(params)
  dn = conv.dimension_numbers
  p = _patches(conv, kernel_shape, lhs).astype(jnp.float32)
  g = jnp.transpose(cot, (dn.out_spec[0], *dn.out_spec[2:], dn.out_spec[1]))
  g = g.reshape(-1, g.shape[-1]).astype(jnp.float32)
  return jnp.sum(jnp.square(jnp.matmul(p.T, g, precision=jax.lax.Precision.HIGHEST)))


def conv_supported(params: dict) -> bool:
  """True when `conv_sq_norm` applies (no grouped or batch-grouped convolution)."""
  conv = jc.conv_params(params)
  return conv.feature_group_count == 1 and conv.batch_group_count == 1
