"""Conformance: our RFC 9162 proof verifiers against the transparency-dev/merkle test vectors.

The vectors live outside the project (`../shared/vectors/rfc6962-merkle/`, see its README): every
file under `inclusion/` and `consistency/` is loaded at test time, and a verifier passes a file
when it accepts the proof exactly when `wantErr` is false.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from aqgov.documents import _merkle as merkle

ROOT = Path(__file__).parents[1]


def _vectors_dir() -> Path:
  """`<project root>/../shared/vectors/rfc6962-merkle`; from a git worktree, its main checkout is the root."""
  roots = [ROOT]
  dotgit = ROOT / ".git"
  if dotgit.is_file() and dotgit.read_text().startswith("gitdir:"):
    gitdir = Path(dotgit.read_text().split(":", 1)[1].strip())
    roots.append(gitdir.parents[2])  # <main>/.git/worktrees/<name>
  for r in roots:
    d = (r / ".." / "shared" / "vectors" / "rfc6962-merkle").resolve()
    if d.is_dir():
      return d
  return (ROOT / ".." / "shared" / "vectors" / "rfc6962-merkle").resolve()


VECTORS = _vectors_dir()
pytestmark = pytest.mark.skipif(
  not VECTORS.is_dir(), reason=f"conformance vectors not present at {VECTORS}"
)


def _files(kind: str) -> list[Path]:
  return sorted((VECTORS / kind).rglob("*.json")) if VECTORS.is_dir() else []


def _b64(s: str | None) -> bytes:
  return base64.b64decode(s or "")


def _name(path: Path) -> str:
  return path.relative_to(VECTORS).as_posix()


@pytest.mark.parametrize("path", _files("inclusion"), ids=_name)
def test_inclusion_vector(path: Path):
  v = json.loads(path.read_text())
  ok = merkle.verify_inclusion(
    _b64(v["leafHash"]),
    v["leafIdx"],
    v["treeSize"],
    [_b64(p) for p in v["proof"] or ()],
    _b64(v["root"]),
  )
  assert ok is not v["wantErr"], v["desc"]


@pytest.mark.parametrize("path", _files("consistency"), ids=_name)
def test_consistency_vector(path: Path):
  v = json.loads(path.read_text())
  ok = merkle.verify_consistency(
    v["size1"], v["size2"], _b64(v["root1"]), _b64(v["root2"]), [_b64(p) for p in v["proof"] or ()]
  )
  assert ok is not v["wantErr"], v["desc"]


def test_every_vector_file_was_loaded():
  """196 files (184 invalid); a smaller count means the directory is incomplete."""
  files = _files("inclusion") + _files("consistency")
  assert len(files) == 196
  assert sum(json.loads(p.read_text())["wantErr"] for p in files) == 184
