"""The report's plots as inline SVG (matplotlib, Agg backend; text drawn as paths, no fonts needed)."""

from __future__ import annotations

import io
import re

import numpy as np

from aqgov.report._data import ClassTable, Event, Series

_PROLOG = re.compile(r"^.*?(?=<svg)", re.S)


def _figure(width: float, height: float):
  """A figure and its axes, without pyplot's global state."""
  from matplotlib.figure import Figure

  fig = Figure(figsize=(width, height))
  return fig, fig.subplots()


def _svg(fig, title: str) -> str:
  import matplotlib

  buf = io.StringIO()
  with matplotlib.rc_context({"svg.hashsalt": "aqgov-report", "svg.fonttype": "path"}):
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Title": title})
  return _PROLOG.sub("", buf.getvalue(), count=1)


def heatmap(table: ClassTable) -> str:
  """Route class x group weights; unseen cells hatched and marked, classes never taken greyed."""
  import matplotlib
  from matplotlib.patches import Rectangle

  c, g = table.weights.shape
  fig, ax = _figure(1.6 + 1.3 * g, 1.0 + 0.38 * c)
  masked = np.ma.masked_invalid(table.weights)
  cmap = matplotlib.colormaps["viridis"].copy()
  cmap.set_bad("#dddddd")
  im = ax.imshow(masked, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
  for i in range(c):
    for j in range(g):
      w = table.weights[i, j]
      if np.isnan(w):
        text, color = "not taken", "#666666"
      else:
        text = f"{w:.2g}" + (" unseen" if table.unseen[i, j] else "")
        color = "white" if w < 0.6 else "black"
      if table.unseen[i, j]:
        ax.add_patch(
          Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="#d62728", lw=0)
        )
      ax.text(j, i, text, ha="center", va="center", fontsize=7, color=color)
  ax.set_xticks(range(g), table.groups)
  ax.set_yticks(
    range(c),
    [f"{n} ({int(k)})" for n, k in zip(table.classes, table.examples, strict=True)],
    fontsize=7,
  )
  ax.xaxis.tick_top()
  fig.colorbar(im, ax=ax, fraction=0.04, label="weight")
  ax.set_title("route class (examples trained) x group weight", fontsize=9, pad=22)
  return _svg(fig, "route class x group weights")


def per_group(series: Series, groups: tuple[str, ...], which: str) -> str:
  """Reach (`which="reach"`) or mean contribution norm (`"contribution"`) of each group over steps."""
  values = series.reach if which == "reach" else series.contribution
  fig, ax = _figure(8, 3)
  for j, name in enumerate(groups):
    ax.plot(series.steps, values[:, j], marker=".", label=name)
  ax.set_xlabel("step")
  ax.set_ylabel("examples with weight > 0" if which == "reach" else "mean contribution norm")
  ax.set_title("reach per group" if which == "reach" else "contribution per group", fontsize=9)
  ax.legend(fontsize=7, ncol=min(len(groups), 6))
  ax.grid(alpha=0.3)
  return _svg(fig, f"{which} per group")


def entropy(series: Series, key: str, bounds: list, events: list[Event]) -> str:
  """One measurement ("<metric>/<group>") over steps with its bounds and the steps it broke them."""
  metric, group = key.split("/", 1)
  fig, ax = _figure(8, 2.6)
  ax.plot(series.steps, series.measurements[key], marker=".", label=key)
  lo_step = int(series.steps.min()) if series.steps.size else 0
  hi_step = int(series.steps.max()) + 1 if series.steps.size else 1
  for b in bounds:
    a, z = b.steps if b.steps is not None else (lo_step, hi_step)
    for side, style in (("low", "--"), ("high", ":")):
      limit = getattr(b, side)
      if limit is not None:
        ax.hlines(
          limit,
          a,
          z,
          colors="#d62728",
          linestyles=style,
          label=f"{side} {limit:.3g} ({b.action})" + (f" heads {list(b.heads)}" if b.heads else ""),
        )
  hit = [e for e in events if e.metric == metric and e.group == group]
  if hit:
    ax.scatter(
      [e.step for e in hit],
      [e.value for e in hit],
      marker="x",
      color="#d62728",
      zorder=3,
      label=f"out of bounds ({len(hit)}): " + ", ".join(sorted({e.action for e in hit})),
    )
  ax.set_xlabel("step")
  ax.set_title(f"{metric} of {group}", fontsize=9)
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  return _svg(fig, f"entropy {key}")


def loss(series: Series) -> str:
  """The recorded loss over steps."""
  fig, ax = _figure(8, 2.4)
  ax.plot(series.steps, series.loss, marker=".")
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.grid(alpha=0.3)
  return _svg(fig, "loss")
