"""Timing and compiled memory of jitted steps, measured together so ratios come from one run.

Shared by the benchmarks that compare a step to the plain Optax step: `measure` compiles every
step, reads XLA's memory analysis, and times them round-robin (see its docstring); `machine`
describes where the figures were taken; `policy_toml` and `labels_for` give the three-class
policy the routing benchmarks use.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import optax

import aqgov

TAXONOMY = """
[authority]
name = "bench"
[fields.source]
type = "enum"
values = ["open", "licensed", "restricted"]
"""
SOURCES = ("open", "licensed", "restricted")


def policy_toml(groups: Mapping[str, list[str]], visibility: bool = False) -> str:
  """Open data reaches every group, licensed data all but the last (at half weight), restricted
  only the first; with `visibility`, groups after the first are seen only by the examples routed
  to them."""
  names = list(groups)
  lines = ['name = "bench-routing"', "[groups]"]
  for i, (g, patterns) in enumerate(groups.items()):
    listed = f"{patterns!r}".replace("'", '"')
    lines.append(
      f'{g} = {{ patterns = {listed}, visible = "routed" }}'
      if visibility and i
      else f"{g} = {listed}"
    )
  lines += [
    "[[rules]]",
    "when = \"source == 'licensed'\"",
    "route = {" + ", ".join(f"{g} = 0.5" for g in names[:-1]) + "}",
  ]
  lines += [
    "[[rules]]",
    "when = \"source == 'restricted'\"",
    "route = {" + f"{names[0]} = 1.0" + "}",
  ]
  lines += ["[default]", "route = {" + ", ".join(f"{g} = 1.0" for g in names) + "}"]
  return "\n".join(lines) + "\n"


def taxonomy() -> aqgov.Taxonomy:
  return aqgov.Taxonomy.from_toml(TAXONOMY)


def labels_for(space, batch_size: int) -> dict:
  """Encoded labels cycling open, licensed, restricted over the batch."""
  return space.encode([{"bench": {"source": SOURCES[i % 3]}} for i in range(batch_size)])


class Measure(NamedTuple):
  seconds: float  # median
  best: float  # fastest round
  bytes: int  # argument + output + temp bytes of the compiled step
  temp: int  # temp bytes alone: what the step allocates besides its inputs and outputs


def measure(
  named_steps: Mapping[str, tuple[Callable, tuple[Any, ...]]],
  reps: int,
  baseline: str = "plain",
) -> dict[str, Measure]:
  """Compile every `(step, args)`, then time them round-robin so that load drifting on a shared
  machine affects all of them alike. In a round each step runs once untimed (so no step pays for
  caches another left cold), then `calls` times back to back, timed together; `calls` makes the
  baseline step's share of a round at least 0.1 s, so fast steps are not timed at the clock's
  noise floor."""
  compiled, peak, temp = {}, {}, {}
  for name, (step, args) in named_steps.items():
    compiled[name] = jax.jit(step).lower(*args).compile()
    mem = compiled[name].memory_analysis()
    peak[name] = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    temp[name] = mem.temp_size_in_bytes
    jax.block_until_ready(compiled[name](*args))  # warm-up
  start = time.perf_counter()
  jax.block_until_ready(compiled[baseline](*named_steps[baseline][1]))
  calls = max(1, math.ceil(0.1 / (time.perf_counter() - start)))
  times: dict[str, list[float]] = {name: [] for name in named_steps}
  for _ in range(reps):
    for name, fn in compiled.items():
      args = named_steps[name][1]
      jax.block_until_ready(fn(*args))
      start = time.perf_counter()
      for _ in range(calls):
        out = fn(*args)
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - start) / calls)
  return {
    name: Measure(statistics.median(times[name]), min(times[name]), peak[name], temp[name])
    for name in named_steps
  }


def machine(device: jax.Device | None = None) -> str:
  """Where the figures were taken: backend, device kind, CPU cores, library versions."""
  device = device or jax.devices()[0]
  return (
    f"backend: {device.platform} ({device.device_kind}), {os.cpu_count()} CPU cores, "
    f"jax {jax.__version__}, optax {optax.__version__}"
  )
