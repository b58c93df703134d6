"""Per-example contribution norms `||w_i[l] ⊙ ∇_l L_i||²` of a cotangent-scaled step.

A leaf used once by an equation that meets the example (a site, see `_site_stats`) gets its norm
from a statistic computed in the backward pass from that equation's operands and output
cotangent: the ghost (Gram) form or the direct product of a matmul, input patches or the VJP of a
convolution, or a sketch. Inside a `lax.scan` a leaf scanned over (stacked layers) adds its
iterations' squared norms; a leaf shared by the iterations (a recurrent cell's weights) keeps
each iteration's rows of its gradient for one Gram form over all of them. Any other leaf
(several uses, slices, a shared leaf whose Gram form is dearer than its gradient) has a zero
probe of its own shape per example added on the parameter side, whose gradient is that example's
weighted gradient (materialised).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from aqgov.routing import _ghost_norms as ghost_norms
from aqgov.routing import _site_stats as site_stats
from aqgov.routing._plan import Plan


def methods(plan: Plan) -> list[str]:
  """Per parameter leaf, how its norm is had (see `norm_methods`)."""
  out = ["none"] * plan.n_params
  for i in plan.materialised:
    out[i] = "materialised"
  for site, stat in plan.sites.values():
    out[site.leaf] = stat.method
  return out


def leaf_probes(materialised: frozenset, p_leaves, size: int) -> dict:
  """leaf -> [B, *leaf] zeros whose gradient is each example's weighted gradient of the leaf."""
  return {
    i: jnp.zeros((size,) + jnp.shape(p_leaves[i]), jnp.result_type(p_leaves[i]))
    for i in sorted(materialised)
  }


def site_probes(sites: dict, size: int) -> dict:
  """path -> [B, *probe] zeros tapped at a site: their gradient is its per-example statistic."""
  return {
    path: jnp.zeros((size,) + site_stats.probe_shape(site, stat), jnp.float32)
    for path, (site, stat) in sites.items()
  }


def sq_norms(sites: dict, p_leaves, size: int, g_probes: dict, g_sites: dict) -> list[jax.Array]:
  """Per leaf, float32 [B] squared contribution norms from the probes' gradients.

  The probes' gradients are of the summed loss: each example's own, weighted."""
  sq = [jnp.zeros((size,), jnp.float32) for _ in p_leaves]
  for i, g in g_probes.items():
    sq[i] = ghost_norms.materialised_sq_norms(g)
  for path, (site, stat) in sites.items():
    sq[site.leaf] = stat.finish(g_sites[path])
  return sq
