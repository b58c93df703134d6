"""Entropy metrics as traced reductions, and the measurements an entropy profile governs.

Five metrics, each a pure jit-able reduction (all in float32):

* `attention_entropy(probs)`: per attention head, the mean over queries (and any leading axes) of
  `-sum_k p_k log p_k / log n`, where `n` is the number of keys the query may attend to (all keys,
  or those allowed by `mask`). 1 = uniform attention, 0 = every query attends to one key.
* `renyi2(reps)`: matrix-based Renyi entropy of order 2 of the trace-normalised linear-kernel Gram
  matrix `K = X X^T / tr(X X^T)` of the representations `X` [N, D]:
  `H2 = -log ||K||_F^2`, normalised by `log min(N, D)` (the rank bound, so isotropic
  representations reach 1). Computed on the D x D (or N x N, whichever is smaller) Gram matrix:
  `X X^T` and `X^T X` share their non-zero eigenvalues, so the result is the same and the cost is
  `N D min(N, D)`.
* `effective_rank(reps)`: RankMe, `exp(-sum_k q_k log q_k)` with `q = s / sum(s)` over the
  singular values `s` of `X`; in [1, min(N, D)].
* `expert_utilisation(router_probs)`: normalised entropy of a mixture-of-experts router's load,
  the mean router probability per expert over tokens; 1 = balanced experts, 0 = one expert.
* `gradient_entropy(tree)`: Shannon entropy of `|g| / sum |g|` over every entry of a gradient
  pytree, normalised by `log n` (n entries). 1 = the gradient is spread evenly, 0 = one entry.

Conventions for degenerate inputs: all-zero representations are "all identical", hence fully
collapsed (`renyi2` 0, `effective_rank` 1). An all-zero gradient carries no distribution at all,
so `gradient_entropy` returns NaN there, meaning *not measured*: enforcement never counts NaN as
out of bounds (a group that received no gradient this step is not judged). Queries that may attend
to fewer than two keys (the first query of a causal mask) have no uncertainty to measure and are
left out of the attention mean; a head with no such query at all is NaN.

`measure(profile, compiled, grads=..., representations=...)` turns one step's routed gradients and
representations into the measurements dict `{"<metric>/<group>": value}` that `aqgov.entropy`
consumes (per-head metrics keep a trailing head axis). Representations come from any of:

* an aux dict returned by the loss function (paths are the dict's keys joined with `/`);
* Flax NNX intermediates, `nnx.capture(model, nnx.Intermediate)(x)` after `self.sow(...)`
  (an `nnx.State`; paths like `blocks/0/attn/probs/0`, the final index counting sows);
* Flax Linen `model.apply(..., capture_intermediates=True, mutable=["intermediates"])`
  (paths like `intermediates/Block_0/__call__/0`; `from_linen` drops the leading
  `intermediates`).

The profile's `[[representation]]` entries map those paths (globs) to parameter groups.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from aqgov.errors import ProfileError
from aqgov.policy._compile import CompiledPolicy
from aqgov.policy._paths import glob_match, tree_paths

if TYPE_CHECKING:
  from aqgov.entropy._profile import EntropyProfile

PyTree = Any

METRICS = (
  "attention_entropy",
  "renyi2",
  "effective_rank",
  "gradient_entropy",
  "expert_utilisation",
)
"""Metric names, in the order used by event arrays."""

PER_HEAD_METRICS = ("attention_entropy",)
FEATURE_METRICS = ("renyi2", "effective_rank")
ROUTER_METRICS = ("expert_utilisation",)
_HIGHEST = jax.lax.Precision.HIGHEST


def _xlogx(x: jax.Array) -> jax.Array:
  """`x log x` with the limit 0 at x = 0 (and no NaN gradient path through log 0)."""
  positive = x > 0
  return jnp.where(positive, x * jnp.log(jnp.where(positive, x, 1.0)), 0.0)


def attention_entropy(probs: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Per-head normalised attention entropy in [0, 1], shape [heads].

  `probs` is [..., heads, queries, keys] (rows sum to 1); `mask`, broadcastable to it, marks the
  keys each query may attend to (e.g. a causal `tril`). Each query's entropy is divided by the
  log of its number of allowed keys, then averaged over queries and leading axes.
  """
  probs = jnp.asarray(probs)
  if probs.ndim < 3:
    raise ValueError(
      f"attention probs must be [..., heads, queries, keys], got shape {probs.shape}"
    )
  p = probs.astype(jnp.float32)
  ent = -jnp.sum(_xlogx(p), axis=-1)  # [..., H, Q]
  if mask is None:
    keys = p.shape[-1]
    if keys < 2:
      raise ValueError(
        f"attention over {keys} key(s) has no entropy to measure; need at least 2 keys"
      )
    per_query = ent / math.log(keys)
    valid = jnp.ones(per_query.shape, jnp.float32)
  else:
    allowed = jnp.broadcast_to(jnp.asarray(mask, bool), p.shape).sum(axis=-1)
    ok = allowed >= 2
    per_query = jnp.where(ok, ent / jnp.log(jnp.maximum(allowed, 2).astype(jnp.float32)), 0.0)
    valid = ok.astype(jnp.float32)
  per_query = jnp.clip(per_query, 0.0, 1.0)
  axes = tuple(range(per_query.ndim - 2)) + (per_query.ndim - 1,)
  count = valid.sum(axis=axes)
  total = (per_query * valid).sum(axis=axes)
  return jnp.where(count > 0, total / jnp.maximum(count, 1.0), jnp.nan)


def expert_utilisation(router_probs: jax.Array) -> jax.Array:
  """Normalised entropy in [0, 1] of a mixture-of-experts router's load: the mean over tokens
  (and any leading axes) of the router probabilities `router_probs` [..., experts], whose entropy
  is divided by log(experts). 1 = every expert gets the same share, 0 = one expert gets all."""
  p = jnp.asarray(router_probs, jnp.float32)
  if p.ndim < 1 or p.shape[-1] < 2:
    raise ValueError(
      f"router probs must be [..., experts] with at least 2 experts, got shape {p.shape}"
    )
  load = jnp.mean(p.reshape(-1, p.shape[-1]), axis=0)
  total = jnp.sum(load)
  share = load / jnp.where(total > 0, total, 1.0)
  h = -jnp.sum(_xlogx(share)) / math.log(p.shape[-1])
  return jnp.where(total > 0, jnp.clip(h, 0.0, 1.0), jnp.nan)


def _as_matrix(reps: jax.Array, center: bool) -> jax.Array:
  x = jnp.asarray(reps)
  if x.ndim < 2:
    raise ValueError(f"representations must be [..., N, D] (features last), got shape {x.shape}")
  x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  n, d = x.shape
  if min(n, d) < 2:
    raise ValueError(
      f"representations of shape {x.shape} (as [N, D]) need N >= 2 and D >= 2 to have a spectrum"
    )
  if center:
    x = x - x.mean(axis=0, keepdims=True)
  return x


def _small_gram(x: jax.Array) -> jax.Array:
  """The smaller of `X^T X` and `X X^T` (same non-zero eigenvalues)."""
  if x.shape[0] >= x.shape[1]:
    return jnp.matmul(x.T, x, precision=_HIGHEST)
  return jnp.matmul(x, x.T, precision=_HIGHEST)


def renyi2(reps: jax.Array, *, center: bool = False) -> jax.Array:
  """Normalised matrix-based Renyi entropy of order 2 of `reps` [..., D] (flattened to [N, D]).

  `-log(||G||_F^2 / tr(G)^2) / log min(N, D)` for the linear-kernel Gram matrix G, in [0, 1].
  `center=True` subtracts the mean representation first (measures spread around the mean).
  """
  x = _as_matrix(reps, center)
  gram = _small_gram(x)
  trace = jnp.trace(gram)
  frob2 = jnp.sum(gram * gram)
  ok = trace > 0
  h2 = jnp.log(jnp.where(ok, trace, 1.0) ** 2) - jnp.log(jnp.where(ok, frob2, 1.0))
  return jnp.where(ok, jnp.clip(h2 / math.log(min(x.shape)), 0.0, 1.0), 0.0)


def effective_rank(reps: jax.Array, *, center: bool = False) -> jax.Array:
  """RankMe effective rank of `reps` [..., D] (flattened to [N, D]), in [1, min(N, D)].

  Singular values come from the eigenvalues of the small Gram matrix; eigenvalues below the
  float32 rank tolerance (`min(N, D) * eps * largest`) count as zero.
  """
  x = _as_matrix(reps, center)
  r = min(x.shape)
  eig = jnp.linalg.eigvalsh(_small_gram(x))
  tol = r * jnp.finfo(jnp.float32).eps * jnp.max(eig)
  sv = jnp.sqrt(jnp.where(eig > tol, eig, 0.0))
  total = sv.sum()
  ok = total > 0
  q = sv / jnp.where(ok, total, 1.0)
  rank = jnp.exp(-jnp.sum(_xlogx(q)))
  return jnp.where(ok, jnp.clip(rank, 1.0, float(r)), 1.0)


def _abs_moments(leaves: Iterable[jax.Array]) -> tuple[jax.Array, jax.Array, int]:
  """(sum |g|, sum |g| log |g|, entry count) over `leaves`."""
  total, xlogx, n = jnp.float32(0.0), jnp.float32(0.0), 0
  for leaf in leaves:
    a = jnp.abs(jnp.asarray(leaf).astype(jnp.float32))
    total = total + a.sum()
    xlogx = xlogx + _xlogx(a).sum()
    n += int(np.prod(a.shape))
  return total, xlogx, n


def _entropy_from_moments(total: jax.Array, xlogx: jax.Array, n: int) -> jax.Array:
  """Normalised entropy of |g|/S from S = sum |g| and T = sum |g| log |g|: (log S - T/S) / log n."""
  ok = total > 0
  safe = jnp.where(ok, total, 1.0)
  h = jnp.log(safe) - xlogx / safe
  return jnp.where(ok, jnp.clip(h / math.log(n), 0.0, 1.0), jnp.nan)


def gradient_entropy(tree: PyTree) -> jax.Array:
  """Normalised Shannon entropy of `|g| / sum |g|` over all entries of `tree`, in [0, 1].

  NaN when the whole tree is zero (no gradient: not measured).
  """
  leaves = jax.tree_util.tree_leaves(tree)
  n = sum(int(np.prod(jnp.shape(x))) for x in leaves)
  if n < 2:
    raise ValueError(f"gradient entropy needs at least 2 entries, the tree has {n}")
  return _entropy_from_moments(*_abs_moments(leaves))


# --- representations --------------------------------------------------------------------------


def from_nnx(state: Any) -> dict[str, jax.Array]:
  """`{path: array}` from the `nnx.State` that `nnx.capture(model, nnx.Intermediate)` returns."""
  from flax import nnx

  return flatten(nnx.to_pure_dict(state))


def from_linen(collections: Mapping[str, Any]) -> dict[str, jax.Array]:
  """`{path: array}` from Linen's `capture_intermediates` output (`{"intermediates": ...}` or its inside)."""
  inner = (
    collections.get("intermediates", collections)
    if isinstance(collections, Mapping)
    else collections
  )
  return flatten(inner)


def flatten(tree: PyTree) -> dict[str, jax.Array]:
  """`{path: array}` of a representations pytree (an aux dict); `nnx.State` is unwrapped first."""
  from flax import nnx

  if isinstance(tree, nnx.State):
    return from_nnx(tree)
  leaves = jax.tree_util.tree_leaves(tree)
  return dict(zip(tree_paths(tree), leaves))


# --- measurements -----------------------------------------------------------------------------


def key(metric: str, group: str) -> str:
  """The measurements-dict key of `metric` for `group`."""
  return f"{metric}/{group}"


def split_key(name: str) -> tuple[str, str]:
  """(metric, group) of a measurements-dict key."""
  metric, _, group = name.partition("/")
  return metric, group


def group_gradient_entropy(grads: PyTree, compiled: CompiledPolicy) -> dict[str, jax.Array]:
  """`{group: gradient entropy}` for every group of `compiled` with at least two entries (a slice
  group over its slices of the leaves)."""
  leaves = jax.tree_util.tree_leaves(grads)
  if len(leaves) != compiled.num_leaves:
    raise ProfileError(
      f"the gradient pytree has {len(leaves)} leaves but the compiled policy was bound to "
      f"{compiled.num_leaves}; measure the gradients of the parameters the policy was compiled for"
    )
  by_group: dict[int, list[jax.Array]] = {}
  for g, leaf in zip(compiled.part_group, compiled.parts(grads)):
    by_group.setdefault(int(g), []).append(leaf)
  out = {}
  for g, group_leaves in sorted(by_group.items()):
    moments = _abs_moments(group_leaves)
    if moments[2] >= 2:
      out[compiled.group_names[g]] = _entropy_from_moments(*moments)
  return out


def _assign(profile: EntropyProfile, reps: Mapping[str, jax.Array]) -> dict[int, list[str]]:
  """Representation entry index -> matching representation paths (each path at most one entry)."""
  assigned: dict[int, list[str]] = {i: [] for i in range(len(profile.representations))}
  for path in sorted(reps):
    hits = [i for i, r in enumerate(profile.representations) if glob_match(r.path, path)]
    if len(hits) > 1:
      pats = ", ".join(repr(profile.representations[i].path) for i in hits)
      raise ProfileError(
        f"representation {path!r} matches several [[representation]] entries ({pats}); "
        "make the patterns disjoint so each representation feeds one group"
      )
    if hits:
      assigned[hits[0]].append(path)
  for i, paths in assigned.items():
    if not paths:
      raise ProfileError(
        f"[[representation]] path {profile.representations[i].path!r} matched none of the step's "
        f"representations {sorted(reps)}; fix the glob or return that representation from the loss"
      )
  return assigned


def _causal_mask(probs: jax.Array) -> jax.Array:
  q, k = probs.shape[-2:]
  return jnp.tril(jnp.ones((q, k), bool), k - q)


def representation_metrics(
  profile: EntropyProfile, representations: PyTree, wanted: Mapping[str, set[str]]
) -> dict[str, jax.Array]:
  """Measurements of the representation metrics in `wanted` ({group: metrics})."""
  reps = flatten(representations)
  assigned = _assign(profile, reps)
  per: dict[tuple[str, str], list[jax.Array]] = {}
  for i, paths in assigned.items():
    entry = profile.representations[i]
    metrics = wanted.get(entry.group, set())
    for path in paths:
      value = reps[path]
      if entry.kind == "attention" and "attention_entropy" in metrics:
        if value.ndim < 3 or value.shape[-3] != entry.heads:
          raise ProfileError(
            f"representation {path!r} has shape {tuple(value.shape)} but the profile declares attention "
            f"probs [..., heads={entry.heads}, queries, keys]; fix `heads` or return the probs in that layout"
          )
        mask = _causal_mask(value) if entry.causal else None
        per.setdefault(("attention_entropy", entry.group), []).append(
          attention_entropy(value, mask)
        )
      if entry.kind == "router" and "expert_utilisation" in metrics:
        per.setdefault(("expert_utilisation", entry.group), []).append(expert_utilisation(value))
      if entry.kind == "features":
        for metric, fn in (("renyi2", renyi2), ("effective_rank", effective_rank)):
          if metric in metrics:
            per.setdefault((metric, entry.group), []).append(fn(value))
  return {key(m, g): jnp.mean(jnp.stack(vs), axis=0) for (m, g), vs in per.items()}


def measure(
  profile: EntropyProfile,
  compiled: Any,
  *,
  grads: PyTree | None = None,
  representations: PyTree | None = None,
  metrics: Iterable[str] | None = None,
) -> dict[str, jax.Array]:
  """One step's measurements `{"<metric>/<group>": value}` (traced; call inside the jitted step).

  By default measures what the profile bounds; `metrics=` names metrics to measure for every group
  that has a source for them. Several representations mapped to one group are averaged (per
  head for attention). A bound the step cannot measure (no gradients or no matching
  representation) is a `ProfileError` at trace time.
  """
  profile.check_groups(compiled.group_names)
  sources: dict[str, set[str]] = {}
  for entry in profile.representations:
    kinds = {"attention": ("attention_entropy",), "router": ROUTER_METRICS}.get(
      entry.kind, FEATURE_METRICS
    )
    sources.setdefault(entry.group, set()).update(kinds)
  if metrics is None:
    wanted: dict[str, set[str]] = {}
    for b in profile.bounds:
      wanted.setdefault(b.group, set()).add(b.metric)
  else:
    metrics = tuple(metrics)
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
      raise ProfileError(f"unknown metric(s) {unknown}; choose from {list(METRICS)}")
    wanted = {g: set(metrics) for g in compiled.group_names}
  out: dict[str, jax.Array] = {}
  if any("gradient_entropy" in ms for ms in wanted.values()):
    if grads is None:
      if metrics is None:
        raise ProfileError(
          "the profile bounds gradient_entropy but measure() got no gradients; pass grads= (the routed gradients)"
        )
    else:
      for group, value in group_gradient_entropy(grads, compiled).items():
        if "gradient_entropy" in wanted.get(group, ()):
          out[key("gradient_entropy", group)] = value
  rep_wanted = {g: ms & sources.get(g, set()) for g, ms in wanted.items()}
  if representations is not None and any(rep_wanted.values()):
    out.update(representation_metrics(profile, representations, rep_wanted))
  if metrics is None:
    missing = sorted({key(b.metric, b.group) for b in profile.bounds} - set(out))
    if missing:
      raise ProfileError(
        f"the profile bounds {missing} but this step measured none of them; pass the routed gradients "
        "(grads=) and the representations its [[representation]] entries name (representations=)"
      )
  return out
