"""A complete, small `Task`: a two-layer MLP classifier with per-example, per-group weights.

It shows what a governed step has to hand the lineage, and is what the lineage tests replay.
Examples are JSON text `{"x": [floats], "y": int}` with an integer label `route` that picks a row
of the route table `routes[route] = [weight of "hidden", weight of "head"]`. The gradient is the
routed mean `g = (1/B) sum_i w_i[group] * grad L_i`, computed here in its reference form (vmap of
per-example gradients), which also gives the per-example contribution norms directly; real runs
use `aqgov.routed_value_and_grad` and a compiled policy instead.

Use it as `GovernedRun.start(dir, task="aqgov.examples.task:make_task", task_config={...})`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aqgov.credentials._manifest import Example
from aqgov.lineage._summary import summarize
from aqgov.lineage._task import TrainState
from aqgov.policy._paths import tree_paths

GROUPS = ("hidden", "head")
DEFAULTS = {
  "features": 4,
  "hidden": 8,
  "classes": 3,
  "learning_rate": 0.1,
  "seed": 0,
  "routes": [[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]],
}


def example(ex_id: str, x: Sequence[float], y: int, route: int = 0) -> dict:
  """A JSONL-shaped example this task reads (`content` is the JSON text of x and y)."""
  content = json.dumps({"x": [float(v) for v in x], "y": int(y)})
  return {"id": ex_id, "content": content, "labels": {"route": int(route)}}


class MLPTask:
  """Two-layer tanh MLP trained with SGD (momentum 0.9) under a per-route group weight table."""

  group_names = GROUPS

  def __init__(self, config: Mapping[str, Any]):
    self.config = {**DEFAULTS, **dict(config)}
    self.routes = jnp.asarray(self.config["routes"], jnp.float32)
    self.class_names = tuple(f"route{r}" for r in range(self.routes.shape[0]))
    self.optimizer = optax.sgd(float(self.config["learning_rate"]), momentum=0.9)
    # group of each leaf, in tree_leaves order: the first path segment names it
    self.leaf_group = tuple(
      GROUPS.index(p.split("/")[0]) for p in tree_paths(jax.eval_shape(self._params))
    )
    self.step = jax.jit(self._step)

  def _params(self) -> dict:
    c = self.config
    k1, k2 = jax.random.split(jax.random.key(int(c["seed"])))
    return {
      "hidden": {
        "w": jax.random.normal(k1, (c["features"], c["hidden"])) / np.sqrt(c["features"]),
        "b": jnp.zeros((c["hidden"],)),
      },
      "head": {
        "w": jax.random.normal(k2, (c["hidden"], c["classes"])) / np.sqrt(c["hidden"]),
        "b": jnp.zeros((c["classes"],)),
      },
    }

  def init(self) -> TrainState:
    params = self._params()
    return TrainState(jnp.int32(0), params, self.optimizer.init(params), ())

  def make_batch(self, examples: Sequence[Example]) -> tuple[dict, dict]:
    docs = [json.loads(ex.content) for ex in examples]
    batch = {
      "x": np.asarray([d["x"] for d in docs], np.float32),
      "y": np.asarray([d["y"] for d in docs], np.int32),
      "index": np.arange(len(examples), dtype=np.int32),
    }
    labels = {"route": np.asarray([(ex.labels or {}).get("route", 0) for ex in examples], np.int32)}
    return batch, labels

  @staticmethod
  def _loss(params, x, y):
    h = jnp.tanh(x @ params["hidden"]["w"] + params["hidden"]["b"])
    logits = h @ params["head"]["w"] + params["head"]["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)

  def _step(self, state: TrainState, batch: dict, labels: dict):
    route = labels["route"]
    weights = self.routes[route]  # [B, G]
    losses, grads = jax.vmap(jax.value_and_grad(self._loss), in_axes=(None, 0, 0))(
      state.params, batch["x"], batch["y"]
    )
    scaled = {
      name: jax.tree.map(
        lambda g, gi=gi: g * weights[:, gi].reshape((-1,) + (1,) * (g.ndim - 1)), grads[name]
      )
      for gi, name in enumerate(GROUPS)
    }
    norms = jnp.stack(
      [
        jnp.sqrt(
          sum(
            jnp.sum(jnp.reshape(g, (g.shape[0], -1)) ** 2, axis=1)
            for g in jax.tree.leaves(scaled[name])
          )
        )
        for name in GROUPS
      ],
      axis=1,
    )
    mean_grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), scaled)
    updates, opt_state = self.optimizer.update(mean_grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step = state.step + 1
    summary = summarize(
      step=step,
      example_index=batch["index"],
      route_class=route,
      weights=weights,
      contribution_norms=norms,
      loss=jnp.mean(losses),
      params=params,
      leaf_group=self.leaf_group,
      key=int(self.config["seed"]),
    )
    return TrainState(step, params, opt_state, state.governance), summary


def make_task(config: Mapping[str, Any], run_dir: Path | None = None) -> MLPTask:
  """Task factory (`aqgov.examples.task:make_task`)."""
  return MLPTask(config)
