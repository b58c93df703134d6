"""The audit report: one self-contained HTML page of a run's verification and lineage.

_data   what the report shows, read from the run directory (`collect`)
_plots  the plots as inline SVG (matplotlib)
_page   the page (jinja2), `render`

Needs the `report` extra (`pip install 'aqgov[report]'`: matplotlib, jinja2).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from aqgov.documents._files import atomic_write
from aqgov.documents._keys import TrustStore
from aqgov.report._data import ReportData, collect
from aqgov.report._page import render


def build_report(
  run_dir: str | os.PathLike,
  trust: TrustStore,
  *,
  attestation: str | os.PathLike | None = None,
  **verify_options: Any,
) -> str:
  """The audit report of `run_dir` as HTML: `verify_lineage(run_dir, trust, **verify_options)` (its
  failure is shown, not raised) and what the signed part of the lineage records."""
  return render(collect(run_dir, trust, attestation_path=attestation, **verify_options))


def write_report(
  run_dir: str | os.PathLike,
  out: str | os.PathLike,
  trust: TrustStore,
  *,
  attestation: str | os.PathLike | None = None,
  **verify_options: Any,
) -> ReportData:
  """Write the audit report of `run_dir` to `out` (see `build_report`); returns its data."""
  data = collect(run_dir, trust, attestation_path=attestation, **verify_options)
  path = atomic_write(Path(out), render(data).encode("utf-8"))
  os.chmod(
    path, 0o644
  )  # a report is for sharing, not private like the temporary file it was written through
  return data


__all__ = ["ReportData", "build_report", "collect", "render", "write_report"]
