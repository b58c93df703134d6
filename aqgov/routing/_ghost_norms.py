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


def sizes(site: DotSite) -> tuple[int, int, int, int]:
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
  _, nf, nc, nw = sizes(site)
  return nf * (nc + nw) <= nc * nw


def rearrange(site: DotSite, act: Array, cot: Array) -> tuple[Array, Array]:
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


def rows_sq_norm(a: Array, g: Array) -> Array:
  """`Σ_d ||A_dᵀ G_d||²` for `a` [D, F, C] and `g` [D, F, W], by the cheaper exact form."""
  nf, nc, nw = a.shape[1], a.shape[2], g.shape[2]
  if nf * (nc + nw) <= nc * nw:
    return jnp.sum(jnp.einsum("dfc,dgc->dfg", a, a) * jnp.einsum("dfw,dgw->dfg", g, g))
  return jnp.sum(jnp.square(jnp.einsum("dfc,dfw->dcw", a, g)))


def dot_rows(site: DotSite, act: Array, cot: Array) -> Array:
  """One example's activation and cotangent side by side, [D, F, C + W] float32: a use's rows of
  the weight gradient `A_iᵀ G_i`, kept when the rows of several uses make one gradient."""
  return jnp.concatenate(rearrange(site, act, cot), axis=-1)


def shared_rows_sq_norm(site: DotSite, rows: Array) -> Array:
  """Squared norm of `Σ_t A_tᵀ G_t` (a weight shared by the iterations of a scan) from each
  iteration's `dot_rows` stacked as [T, D, F, C + W]: the iterations are more rows of one
  product, so its Gram form has the cross terms `⟨A_t A_sᵀ, G_t G_sᵀ⟩`."""
  _, _, nc, _ = sizes(site)
  nt, nd, nf, _ = rows.shape
  rows = jnp.swapaxes(rows, 0, 1).reshape(nd, nt * nf, -1)
  return rows_sq_norm(rows[..., :nc], rows[..., nc:])


def shared_ghost_is_cheaper(site: DotSite, length: int) -> bool:
  """True when the Gram form over all `length` iterations' rows beats one per-example gradient."""
  _, nf, nc, nw = sizes(site)
  return length * nf * (nc + nw) <= nc * nw


def dot_sq_norm(site: DotSite, act: Array, cot: Array) -> Array:
  """Squared norm of one example's weight gradient `A_iᵀ G_i` (scalar), cheapest exact way."""
  return rows_sq_norm(*rearrange(site, act, cot))


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
  the output cotangent; the order of patch features does not change the norm. Its Gram form
  `⟨P Pᵀ, G Gᵀ⟩` is used when it is cheaper (`conv_gram_is_cheaper`: few output positions).
  Needs `feature_group_count == batch_group_count == 1` (see `conv_supported`); `params` is the
  equation's parameter dict."""
  conv = jc.conv_params(params)
  dn = conv.dimension_numbers
  p = _patches(conv, kernel_shape, lhs).astype(jnp.float32)
  g = jnp.transpose(cot, (dn.out_spec[0], *dn.out_spec[2:], dn.out_spec[1]))
  g = g.reshape(-1, g.shape[-1]).astype(jnp.float32)
  return rows_sq_norm(p[None], g[None])


def conv_gram_is_cheaper(params: dict, kernel_shape: tuple, out_shape: tuple) -> bool:
  """True when the patch Gram form (`T²(K + O)` for T output positions, K patch features, O
  output channels) beats forming the kernel gradient (`T·K·O`, by the convolution's own VJP)."""
  dn = jc.conv_params(params).dimension_numbers
  n_out = kernel_shape[dn.rhs_spec[0]]
  nk = math.prod(kernel_shape) // n_out
  nt = math.prod(out_shape) // n_out
  return nt * (nk + n_out) <= nk * n_out


def conv_supported(params: dict) -> bool:
  """True when `conv_sq_norm` applies (no grouped or batch-grouped convolution)."""
  conv = jc.conv_params(params)
  return conv.feature_group_count == 1 and conv.batch_group_count == 1
