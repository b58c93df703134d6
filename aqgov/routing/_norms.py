"""Per-example contribution norms `||w_i[l] ⊙ ∇_l L_i||²` of a cotangent-scaled step.

A leaf used once by a matmul or convolution gets its norm from that equation's operands and the
gradient of a zero probe added to its output (the weighted output cotangent): by the ghost form,
input patches, or the equation's own VJP per example. Any other leaf (several uses, slices, a
matmul whose per-example product is cheaper than its Gram form) has a zero probe of its own shape
per example added on the parameter side, whose gradient is that example's weighted gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from aqgov.routing import _ghost_norms as ghost_norms
from aqgov.routing import _jax_compat as jc
from aqgov.routing._analysis import Site
from aqgov.routing._plan import Plan


def methods(plan: Plan) -> list[str]:
  """Per parameter leaf, how its norm is had: ghost, patches, vjp, materialised or none."""
  out = ["none"] * plan.n_params
  for i in plan.materialised:
    out[i] = "materialised"
  for site in plan.sites.values():
    out[site.leaf] = "ghost" if site.dot else "patches" if site.conv else "vjp"
  return out


def leaf_probes(materialised: frozenset, p_leaves, size: int) -> dict:
  """leaf -> [B, *leaf] zeros whose gradient is each example's weighted gradient of the leaf."""
  return {
    i: jnp.zeros((size,) + jnp.shape(p_leaves[i]), jnp.result_type(p_leaves[i]))
    for i in sorted(materialised)
  }


def site_probes(sites: dict, size: int) -> dict:
  """path -> [B, *out] zeros added to a site's output: their gradient is the output cotangent."""
  return {path: jnp.zeros((size,) + site.out_shape, jnp.float32) for path, site in sites.items()}


def site_sq_norms(site: Site, leaf, acts: list, cots) -> jax.Array:
  """[B] squared norms of per-example gradients at a site, from its operands and cotangents."""
  if site.dot is not None:
    return ghost_norms.batched_dot_sq_norms(site.dot, acts[0], cots)
  if site.conv:
    return jax.vmap(
      lambda lhs, cot: ghost_norms.conv_sq_norm(site.eqn.params, jnp.shape(leaf), lhs, cot)
    )(acts[0], cots)

  def one(others, cot):
    def op(p):
      operands = list(others)
      operands.insert(site.param_pos, p)
      return jc.bind(site.eqn, operands)[0]

    _, vjp = jax.vjp(op, leaf)
    (g,) = vjp(cot.astype(site.eqn.outvars[0].aval.dtype))
    return jnp.sum(jnp.square(g.astype(jnp.float32)))

  return jax.vmap(one)(acts, cots)


def sq_norms(
  sites: dict, p_leaves, size: int, g_probes: dict, g_sites: dict, acts: dict
) -> list[jax.Array]:
  """Per leaf, float32 [B] squared contribution norms from the probes' gradients.

  The probes' gradients are of the summed loss: each example's own, weighted."""
  sq = [jnp.zeros((size,), jnp.float32) for _ in p_leaves]
  for i, g in g_probes.items():
    sq[i] = ghost_norms.materialised_sq_norms(g)
  for path, site in sites.items():
    sq[site.leaf] = site_sq_norms(site, p_leaves[site.leaf], acts[path], g_sites[path])
  return sq
