"""Progress of long passes (verify, replay, reports, training), reported to a callback.

A pass calls `progress(done, total)` as it goes (`total` None while it is unknown). The library
never draws anything itself; `progress_bar` turns the callback into a rich progress bar on a
terminal and into nothing elsewhere, so logs and tests stay clean.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
  BarColumn,
  MofNCompleteColumn,
  Progress,
  TextColumn,
  TimeElapsedColumn,
  TimeRemainingColumn,
)

ProgressFn = Callable[[int, int | None], None]


def report(progress: ProgressFn | None, done: int, total: int | None) -> None:
  """Call `progress` if one was given (the one line every pass uses)."""
  if progress is not None:
    progress(done, total)


@contextlib.contextmanager
def progress_bar(description: str, console: Console | None = None) -> Iterator[ProgressFn]:
  """A `ProgressFn` drawing a rich progress bar on `console` (stderr by default) while the block
  runs; on a console that is not a terminal it draws nothing."""
  console = console or Console(stderr=True)
  columns = (
    TextColumn("[progress.description]{task.description}"),
    BarColumn(),
    MofNCompleteColumn(),
    TimeElapsedColumn(),
    TimeRemainingColumn(),
  )
  with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
    task = bar.add_task(description, total=None)

    def update(done: int, total: int | None) -> None:
      bar.update(task, completed=done, total=total)

    yield update
