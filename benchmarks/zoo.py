"""The model zoo: routing checked against brute force, and its cost against a plain Optax step.

    python benchmarks/zoo.py                         # every model, small sizes, CPU
    python benchmarks/zoo.py --size large --device gpu
    python benchmarks/zoo.py --models linen_lm,hk_layer_stack --reps 3
    python benchmarks/zoo.py --readme                # and rewrite README.md's zoo section

The models (`zoo_models.py`) are written from the public layers of Flax Linen, Flax NNX, Equinox
and Haiku. Each runs under the three-class routing policy of `benchmarks/routing.py` over two or
three of its parameter groups (licensed examples reach all groups but the last at half weight,
restricted ones only the first), with labels cycling through the classes.

Per model: first the check, the routed gradient of `cotangent` and of `auto` and their per-example
per-group norms against `vmap(grad)` weighted by the policy (the largest relative error, per
group of the gradient and over the norms, is printed); then the cost. The plain step is
`value_and_grad` of the mean per-example loss (vmapped) plus `optax.adam`; `cotangent` replaces
the gradient with `routed_value_and_grad(..., "cotangent")`, `+norms` also returns the [B, G]
contribution norms, and `governed` is `aqgov.governed_step` with a gradient-entropy profile
(routing by `auto`, norms, entropy measurement and enforcement, the step summary). Time: median
wall-clock over `--reps` interleaved rounds (see `_measure.measure`); memory: XLA's compiled
temp bytes (`memory_analysis().temp_size_in_bytes`), what the step allocates besides its inputs
and outputs, and in parentheses the whole footprint (argument + output + temp bytes), the
meaningful figure where the plain step needs almost no temp space. Both are ratios to the plain step of the same run.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import zoo_models
from _measure import Measure, labels_for, machine, measure, policy_toml, taxonomy
from routing import steps as routing_steps

import aqgov

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- zoo:begin -->", "<!-- zoo:end -->"
STEPS = ("cotangent", "cotangent+norms", "governed")


def profile_toml(groups: Sequence[str]) -> str:
  """Gradient-entropy bounds on every group (the zoo's models return no representations)."""
  lines = ['name = "zoo"']
  for g in groups:
    lines += [
      "[[bound]]",
      f'group = "{g}"',
      'metric = "gradient_entropy"',
      "low = 0.05",
      'action = "reroute"',
      "fallback = 0.5",
    ]
  return "\n".join(lines) + "\n"


class Setup(NamedTuple):
  case: zoo_models.Case
  compiled: Any  # CompiledPolicy
  labels: dict


def setup(case: zoo_models.Case) -> Setup:
  """Compile the case's policy and label its batch with the three classes in turn."""
  tax = taxonomy()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", aqgov.policy.UncoveredParametersWarning)
    compiled = aqgov.compile_policy(
      aqgov.Policy.from_toml(policy_toml(case.groups)), case.params, tax
    )
  space = aqgov.credentials.LabelSpace.of(tax)
  return Setup(case, compiled, labels_for(space, batch_size(case.batch)))


def batch_size(batch) -> int:
  return jax.tree.leaves(batch)[0].shape[0]


def brute_force(s: Setup) -> tuple[Any, jax.Array]:
  """`(1/B) sum_i w_i grad L_i` from `vmap(grad)`, and the [B, G] norms of `w_i grad L_i`."""
  per_example = jax.jit(jax.vmap(jax.grad(s.case.loss), (None, 0)))(s.case.params, s.case.batch)
  weights = s.compiled.leaf_weights(s.labels)

  def scaled(w, g):
    return w.reshape(w.shape + (1,) * (g.ndim - w.ndim)) * g

  contributions = jax.tree.map(scaled, weights, per_example)
  n = batch_size(s.case.batch)
  grads = jax.tree.map(lambda c: jnp.sum(c, 0) / n, contributions)
  squares = jnp.zeros((n, s.compiled.num_groups))
  for leaf, group in zip(jax.tree.leaves(contributions), s.compiled.leaf_group):
    squares = squares.at[:, group].add(jnp.sum(jnp.square(leaf), tuple(range(1, leaf.ndim))))
  return grads, jnp.sqrt(squares)


def relative_error(s: Setup, got: Any, got_norms: jax.Array, want: Any, want_norms) -> float:
  """The larger of: per group, ||got - want|| / ||want|| (the absolute error where the group
  gets no gradient), and over the norms, max |got - want| / max want."""
  diff = np.zeros(s.compiled.num_groups)
  norm = np.zeros(s.compiled.num_groups)
  for g, w, group in zip(jax.tree.leaves(got), jax.tree.leaves(want), s.compiled.leaf_group):
    diff[group] += float(jnp.sum(jnp.square(g - w)))
    norm[group] += float(jnp.sum(jnp.square(w)))
  grads = np.sqrt(diff) / np.where(norm > 0, np.sqrt(norm), 1.0)
  scale = float(jnp.max(want_norms)) or 1.0
  return max(float(grads.max()), float(jnp.max(jnp.abs(got_norms - want_norms))) / scale)


def check(s: Setup, strategies: Sequence[str] = ("cotangent", "auto")) -> float:
  """The largest relative error of the given strategies' gradients and norms to brute force."""
  want, want_norms = brute_force(s)
  errors = []
  for strategy in strategies:
    fn = aqgov.routed_value_and_grad(s.case.loss, s.compiled, strategy, with_norms=True)
    _, grads, norms = jax.jit(fn)(s.case.params, s.case.batch, s.labels)
    errors.append(relative_error(s, grads, norms, want, want_norms))
  return max(errors)


def governed(s: Setup, optimizer: optax.GradientTransformation) -> tuple[Callable, tuple]:
  """`aqgov.governed_step` under a gradient-entropy profile, and its arguments."""
  profile = aqgov.EntropyProfile.from_toml(profile_toml(s.compiled.group_names))
  tx, step = aqgov.governed_step(s.case.loss, s.compiled, optimizer, profile=profile)
  params = s.case.params
  state = aqgov.lineage.TrainState(
    jnp.zeros((), jnp.int32),
    params,
    tx.init(params),
    aqgov.governed.GovernanceState(jnp.zeros((s.compiled.num_groups,), bool)),
  )
  batch = {"inputs": s.case.batch, "index": jnp.arange(batch_size(s.case.batch), dtype=jnp.int32)}
  return step, (state, batch, s.labels)


def norm_methods(case: zoo_models.Case) -> str:
  """How `with_norms` gets each leaf's norm, counted by method; for materialised leaves, the
  bytes of their per-example gradients over the batch (what the norms add to a step at most)."""
  example = jax.tree.map(lambda x: x[0], case.batch)
  methods = aqgov.routing.norm_methods(case.loss, case.params, example)
  counts: dict[str, int] = {}
  materialised = 0
  for method, leaf in zip(jax.tree.leaves(methods), jax.tree.leaves(case.params)):
    counts[method] = counts.get(method, 0) + 1
    if method == "materialised":
      materialised += leaf.size * leaf.dtype.itemsize * batch_size(case.batch)
  text = ", ".join(f"{m} {n}" for m, n in sorted(counts.items()))
  return text + (f" ({materialised / 2**20:.1f} MiB per-example)" if materialised else "")


class Row(NamedTuple):
  key: str
  case: zoo_models.Case
  auto: str  # the strategy `auto` picked
  error: float
  results: dict[str, Measure]
  methods: str  # norm_methods(case)


def run_one(key: str, size: str, reps: int, device: jax.Device) -> Row:
  with jax.default_device(device):
    case = zoo_models.build(key, size)
    case = case._replace(
      params=jax.device_put(case.params, device), batch=jax.device_put(case.batch, device)
    )
    s = setup(case)
    error = check(s)
    auto = aqgov.routed_value_and_grad(case.loss, s.compiled).strategy(case.params, case.batch)
    optimizer = optax.adam(1e-3)
    args = (case.params, optimizer.init(case.params), case.batch, s.labels)
    named = routing_steps(case, s.compiled, s.compiled, optimizer)
    chosen = {name: (named[name], args) for name in ("plain", "cotangent", "cotangent+norms")}
    chosen["governed"] = governed(s, optimizer)
    return Row(key, case, auto, error, measure(chosen, reps), norm_methods(case))


def _ratio(value: float, plain: float) -> str:
  return f"{value / plain:.2f}x" if plain > 0 else "n/a"


def table(rows: Sequence[Row]) -> str:
  head = ["model", "framework", "auto", "max rel err", "plain step", "plain temp"]
  head += [f"{s} time" for s in STEPS] + [f"{s} mem" for s in STEPS]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in rows:
    plain = row.results["plain"]
    cells = [
      row.case.name,
      row.case.framework,
      row.auto,
      f"{row.error:.1e}",
      f"{plain.seconds * 1e3:.1f} ms",
      f"{plain.temp / 2**20:.1f} MiB",
    ]
    cells += [_ratio(row.results[s].seconds, plain.seconds) for s in STEPS]
    cells += [
      f"{_ratio(row.results[s].temp, plain.temp)} ({_ratio(row.results[s].bytes, plain.bytes)})"
      for s in STEPS
    ]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def methods_table(rows: Sequence[Row]) -> str:
  lines = ["| model | framework | norms by (leaves per method) |", "|---|---|---|"]
  lines += [f"| {r.case.name} | {r.case.framework} | {r.methods} |" for r in rows]
  return "\n".join(lines)


def preamble(size: str, reps: int, device: jax.Device) -> str:
  return (
    f"{machine(device)}; size {size}; median of {reps} interleaved rounds; memory = XLA compiled "
    "temp bytes of the jitted step (in parentheses: argument + output + temp bytes). Ratios are to the plain step (value_and_grad of the mean "
    "loss + optax.adam) of the same run; max rel err is routed (cotangent and auto, gradient "
    "per group and norms) against vmap(grad)."
  )


def write_readme(text: str, path: Path = ROOT / "README.md") -> None:
  """Replace what lies between the zoo markers of `path` by `text`."""
  readme = path.read_text()
  if BEGIN not in readme or END not in readme:
    raise SystemExit(f"{path} has no {BEGIN} ... {END} section to rewrite; add the markers first")
  pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
  path.write_text(pattern.sub(lambda _: f"{BEGIN}\n{text}\n{END}", readme, count=1))


def main(argv: list[str] | None = None) -> list[Row]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=tuple(zoo_models.SIZES), default="small")
  parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  parser.add_argument(
    "--models", default=None, help=f"comma-separated, of: {', '.join(zoo_models.MODELS)}"
  )
  parser.add_argument("--reps", type=int, default=5, help="timing rounds (median reported)")
  parser.add_argument("--readme", action="store_true", help="rewrite README.md's zoo section")
  args = parser.parse_args(argv)
  names = args.models.split(",") if args.models else list(zoo_models.MODELS)
  unknown = [n for n in names if n not in zoo_models.MODELS]
  if unknown:
    parser.error(f"unknown models {unknown}; choose from {', '.join(zoo_models.MODELS)}")
  device = jax.devices(args.device)[0]
  rows = []
  for name in names:
    rows.append(run_one(name, args.size, args.reps, device))
    print(f"measured {name}:\n{table(rows[-1:])}\n{rows[-1].methods}", file=sys.stderr, flush=True)
  text = "\n\n".join([preamble(args.size, args.reps, device), table(rows), methods_table(rows)])
  print(text)
  if args.readme:
    write_readme(text)
  return rows


if __name__ == "__main__":
  main()
