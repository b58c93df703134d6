"""Loader adapter: governed batches from any iterable of examples (or a grain `MapDataset`).

Every example passes `Admission` before it can reach a batch. Each yielded `AdmittedBatch` holds
`batch_size` admitted examples (the last may be shorter unless `drop_remainder`), their label
arrays, optional model inputs from a user `transform`, and the examples rejected while it filled.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from aqgov.credentials._admission import Admission, AdmittedBatch, Verdict
from aqgov.credentials._manifest import Example


def _iterate(source: Any) -> Iterator[Any]:
  grain = sys.modules.get("grain")
  if grain is not None and isinstance(source, grain.MapDataset):
    # Iterating a MapDataset through its IterDataset view skips elements a filter removed (None).
    return iter(source.to_iter_dataset())
  return iter(source)


def governed_batches(
  examples: Iterable[Example | Mapping[str, Any]],
  admission: Admission,
  batch_size: int,
  *,
  drop_remainder: bool = False,
  transform: Callable[[Example], Any] | None = None,
) -> Iterator[AdmittedBatch]:
  """Yield admitted batches of `batch_size` examples.

  `examples` is any iterable of `Example`s or JSONL-shaped mappings, or a grain `MapDataset` of
  them. `transform(example) -> pytree` builds model inputs, stacked with numpy on a leading batch
  axis. Rejections (with `on_reject="collect"`) ride along in the batch being filled when they were
  seen; with `drop_remainder` a final partial batch is dropped, rejections included.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be at least 1, got {batch_size}")
  pending: list[Verdict] = []
  filled = 0
  for record in _iterate(examples):
    verdict = admission.screen(record)
    pending.append(verdict)
    filled += verdict.admitted
    if filled == batch_size:
      yield admission.assemble(pending, transform=transform)
      pending, filled = [], 0
  if pending and not drop_remainder:
    yield admission.assemble(pending, transform=transform)
