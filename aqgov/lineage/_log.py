"""The append-only lineage log as one module: the names a run needs to write, read and resume it.

_segments  framed segment files and `LogReader`, which checks every record as it reads it
_scan      `scan`: one pass over a log for record hashes, Merkle roots and chosen bodies
_heads     `LogHead` and the signed tree heads in `heads.seg`
_writer    the asynchronous `LineageWriter` and `open_for_resume`
"""

from aqgov.lineage._heads import LogHead, read_heads
from aqgov.lineage._scan import LogScan, scan
from aqgov.lineage._segments import LogReader, records
from aqgov.lineage._writer import LineageWriter, open_for_resume

__all__ = [
  "LineageWriter",
  "LogHead",
  "LogReader",
  "LogScan",
  "open_for_resume",
  "read_heads",
  "records",
  "scan",
]
