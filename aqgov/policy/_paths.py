"""Parameter paths and glob patterns over them.

A parameter's path joins its pytree keys with `/` (`blocks/0/attn/kernel`). In patterns `*`
matches within one segment, `**` matches zero or more whole segments, `?` one character.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import jax


def key_name(entry: Any) -> str:
  """One path segment from a jax key entry (dict key, attribute, sequence index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def path_string(key_path: tuple) -> str:
  return "/".join(key_name(e) for e in key_path)


def tree_paths(tree: Any) -> list[str]:
  """Paths of `tree`'s leaves, in `jax.tree_util.tree_leaves` order."""
  with_path, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [path_string(kp) for kp, _ in with_path]


def tree_map_with_path_string(fn, tree: Any, *rest: Any) -> Any:
  """`jax.tree.map` whose function also receives the leaf's path string first."""
  return jax.tree_util.tree_map_with_path(lambda kp, *xs: fn(path_string(kp), *xs), tree, *rest)


@functools.lru_cache(maxsize=4096)
def _compile(pattern: str) -> re.Pattern:
  if not pattern or pattern.startswith("/") or pattern.endswith("/") or "//" in pattern:
    raise ValueError(f"glob {pattern!r} is malformed: segments are separated by single '/'")
  parts = []
  for seg in pattern.split("/"):
    if seg == "**":
      parts.append(None)
      continue
    if "**" in seg:
      raise ValueError(f"glob {pattern!r}: '**' must be a whole segment")
    parts.append(
      "".join("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c) for c in seg)
    )
  rx = ""
  for i, p in enumerate(parts):
    last = i == len(parts) - 1
    if p is None:  # `**`: any run of whole segments, each followed by '/' unless it ends the path
      rx += "(?:[^/]+(?:/[^/]+)*)?" if last else "(?:[^/]+/)*"
    else:
      rx += p + ("" if last else "/")
  rx = rx.replace(
    "/(?:[^/]+(?:/[^/]+)*)?", "(?:/[^/]+)*"
  )  # trailing `/**` also matches the prefix itself
  return re.compile(rx + r"\Z")


def glob_match(pattern: str, path: str) -> bool:
  """True iff parameter `path` matches `pattern`."""
  return _compile(pattern).match(path) is not None


def match_paths(key_path: tuple) -> tuple[str, ...]:
  """The leaf's path, and for a Variable's `.value` leaf also the path without it."""
  full = path_string(key_path)
  last = key_path[-1] if key_path else None
  if isinstance(last, jax.tree_util.GetAttrKey) and last.name == "value" and len(key_path) > 1:
    return (full, path_string(key_path[:-1]))
  return (full,)


def covers(patterns, candidates: tuple[str, ...]) -> bool:
  """Whether some pattern matches one of a leaf's candidate paths (see `match_paths`)."""
  return any(glob_match(p, c) for p in patterns for c in candidates)
