"""Lineage records: canonical msgpack envelopes, each naming its predecessor's hash.

A record is the canonical msgpack (`aqgov.documents`) of

    {"v": 2, "seq": i, "kind": str, "prev": <32-byte hash of record i-1>, "body": <bytes>}

where `body` is itself the canonical msgpack of the kind's body map. The record hash is SHA-256
of the record bytes; record 0 (always "run-start") has `prev` = 32 zero bytes. Nesting the body as
bytes lets a verifier check a million records by hashing them and decoding five small fields each,
without materialising any body it does not need. Arrays inside bodies are `{"dtype", "shape",
"data"}` maps with raw little-endian C-order bytes, so float32 values survive exactly.
The full field list of every kind is in docs/lineage-schema.md. Version 2 only adds optional
body fields, so records written at version 1 are read and verified as they are (`READS`).
"""

from __future__ import annotations

import functools
import hashlib
import math
import sys
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import msgpack
import numpy as np

from aqgov.credentials._admission import Rejection
from aqgov.documents import _canonical as canonical
from aqgov.errors import LineageError
from aqgov.lineage._summary import DROP_REASONS, PyTree, StepSummary
from aqgov.policy import _paths as paths

if TYPE_CHECKING:
  from jax.typing import ArrayLike


VERSION = 2
READS = (1, 2)  # envelope versions this aqgov reads; a log may mix them (a v1 run resumed by v2)
GENESIS = bytes(32)

RUN_START = "run-start"
STEP = "step"
CHECKPOINT = "checkpoint"
EVENT = "event"
ESCALATION = "escalation"
OVERRIDE = "override"
RUN_RESUME = "run-resume"
RUN_END = "run-end"
KINDS = (RUN_START, STEP, CHECKPOINT, EVENT, ESCALATION, OVERRIDE, RUN_RESUME, RUN_END)


class Record(NamedTuple):
  """One decoded record envelope; `body_bytes` is decoded on demand by `body`."""

  seq: int
  kind: str
  prev: bytes
  body_bytes: bytes
  hash: bytes

  @property
  def body(self) -> dict:
    return decode_body(self.body_bytes, self.seq, self.kind)


def encode_record(seq: int, kind: str, prev: bytes, body: Mapping[str, Any] | bytes) -> bytes:
  """Canonical bytes of a record envelope around `body` (a map, or its canonical bytes)."""
  if kind not in KINDS:
    raise LineageError(f"unknown record kind {kind!r}; expected one of {', '.join(KINDS)}")
  if len(prev) != 32:
    raise LineageError(f"prev must be a 32-byte hash, got {len(prev)} bytes")
  seq = int(seq)
  if not 0 <= seq < 2**63:
    raise LineageError(f"seq must be a record index, got {seq}")
  # keys in canonical (sorted) order and only str, bytes and int values: plain msgpack already
  # yields the canonical bytes, without `canonical.encode`'s normalisation pass over the body
  return msgpack.packb(
    {
      "body": body if isinstance(body, bytes) else canonical.encode(dict(body)),
      "kind": kind,
      "prev": bytes(prev),
      "seq": seq,
      "v": VERSION,
    },
    use_bin_type=True,
  )


def record_hash(data: bytes) -> bytes:
  return hashlib.sha256(data).digest()


_ENVELOPE_HEAD = b"\x85\xa4body"  # canonical envelopes start with a 5-map whose first key is "body"
_BIN_HEADERS = {0xC4: 1, 0xC5: 2, 0xC6: 4}


def _split_envelope(data) -> tuple[dict, int, int] | None:
  """(the other four fields, body start, body end) of a canonically laid out envelope, found
  without copying the body; None for any other layout (the general decoder then decides)."""
  view = memoryview(data)
  if len(view) < 8 or view[:6] != _ENVELOPE_HEAD or view[6] not in _BIN_HEADERS:
    return None
  width = _BIN_HEADERS[view[6]]
  start = 7 + width
  end = start + int.from_bytes(view[7:start], "big")
  if end > len(view):
    return None
  try:
    tail = msgpack.unpackb(b"\x84" + view[end:].tobytes(), raw=False, strict_map_key=True)
  except Exception:
    return None
  return tail, start, end


def decode_record(
  data: bytes | memoryview,
  index: int,
  *,
  digest: bytes | None = None,
  bodies: Collection[str] | None = None,
) -> Record:
  """The envelope of record bytes `data` expected at position `index` (fields checked, body kept raw).

  `digest` is the record hash when the caller has already computed it. Bodies of kinds outside
  `bodies` (when given) are not copied out (`body_bytes` is empty): verifying a long log then costs
  little more than hashing it."""
  split = _split_envelope(data)
  if split is not None:
    env, start, end = split
    keep = bodies is None or env.get("kind") in bodies
    env["body"] = bytes(memoryview(data)[start:end]) if keep else b""
  else:
    try:
      env = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:
      raise LineageError(
        f"record {index}: not valid msgpack ({exc}); the record was altered", index=index
      ) from None
  if not isinstance(env, dict) or set(env) != {"v", "seq", "kind", "prev", "body"}:
    raise LineageError(
      f"record {index}: not a lineage record envelope (fields v, seq, kind, prev, body)",
      index=index,
    )
  if env["v"] not in READS:
    raise LineageError(
      f"record {index}: schema version {env['v']!r}, this aqgov reads versions "
      f"{', '.join(map(str, READS))}; "
      "upgrade aqgov to verify this log",
      index=index,
    )
  if (
    env["kind"] not in KINDS
    or not isinstance(env["prev"], bytes)
    or not isinstance(env["body"], bytes)
    or not isinstance(env["seq"], int)
    or len(env["prev"]) != 32
  ):
    raise LineageError(f"record {index}: malformed envelope (kind {env['kind']!r})", index=index)
  return Record(env["seq"], env["kind"], env["prev"], env["body"], digest or record_hash(data))


def decode_body(body_bytes: bytes, index: int | None = None, kind: str | None = None) -> dict:
  """The body map of a record; with `kind`, its fields are checked against the kind's schema."""
  try:
    body = canonical.decode(body_bytes)
  except canonical.CanonicalError as exc:
    raise LineageError(
      f"record {index}: body is not canonical msgpack ({exc})", index=index
    ) from None
  if not isinstance(body, dict):
    raise LineageError(f"record {index}: body is not a map", index=index)
  if kind is not None:
    check_body(kind, body, index)
  return body


# ---- body schemas -------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_count(v: Any) -> bool:
  return _is_int(v) and v >= 0


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_hex32(v: Any) -> bool:
  return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def _is_strs(v: Any) -> bool:
  return isinstance(v, list) and all(isinstance(x, str) for x in v)


_DOCREF_FIELDS = ("kind", "id", "sha256", "file")  # `_bodies.DocRef`'s wire form


def _is_docrefs(v: Any) -> bool:
  return isinstance(v, list) and all(
    isinstance(r, dict) and all(isinstance(r.get(k), str) for k in _DOCREF_FIELDS) for r in v
  )


def _is_parent(v: Any) -> bool:
  return v is None or (
    isinstance(v, dict)
    and all(isinstance(v.get(k), str) for k in ("run_id", "head_id", "dir"))
    and _is_count(v.get("size"))
    and _is_hex32(v.get("root"))
  )


def _is_range(v: Any) -> bool:
  return isinstance(v, list) and len(v) == 2 and all(_is_count(x) for x in v)


def _is_optional_count(v: Any) -> bool:
  return v is None or _is_count(v)


def _is(*types: type) -> Any:
  return lambda v: isinstance(v, types)


REJECTION_FIELDS = ("id", "reason")  # one entry of a "rejected" list (see `rejected_to_wire`)


def _is_rejections(v: Any) -> bool:
  return isinstance(v, list) and all(
    isinstance(r, dict)
    and set(r) == set(REJECTION_FIELDS)
    and all(isinstance(r[k], str) and r[k] for k in REJECTION_FIELDS)
    for r in v
  )


def _is_sketch_field(v: Any) -> bool:
  return (
    isinstance(v, dict)
    and set(v) == {"chunk", "dim", "dtype", "sha256"}
    and isinstance(v["chunk"], str)
    and _is_count(v["dim"])
    and isinstance(v["dtype"], str)
    and isinstance(v["sha256"], bytes)
    and len(v["sha256"]) == 32
  )


_STEP_NUMBER = {"step": _is_count, "time": _is_number}
# kind -> field -> (check, what the field must be); docs/lineage-schema.md lists the same fields
_SCHEMAS: dict[str, dict[str, tuple[Any, str]]] = {
  RUN_START: {
    "run_id": (_is(str), "a string"),
    "time": (_is_number, "a number"),
    "signer": (_is(str), "a key id"),
    "trust": (_is_strs, "a list of key ids"),
    "groups": (_is_strs, "a list of group names"),
    "classes": (_is_strs, "a list of route class names"),
    "policies": (_is_docrefs, "a list of docrefs"),
    "profiles": (_is_docrefs, "a list of docrefs"),
    "manifests": (_is_docrefs, "a list of docrefs"),
    "parent": (_is_parent, "nil or a parentref"),
    "config": (_is(dict), "a map"),
  },
  STEP: {
    "step": (_is_count, "a step number"),
    "time": (_is_number, "a number"),
    "example_ids": (_is(bytes), "bin"),
    "route_class": (_is(dict), "an array"),
    "weights": (_is(dict), "a weights map"),
    "contribution_norms": (_is(dict), "an array"),
    "loss": (_is(float), "a float"),
    "fingerprint": (_is(dict), "an array"),
    "measurements": (_is(dict), "a map of arrays"),
    "events": (_is(dict), "a map of arrays"),
  },
  CHECKPOINT: {
    "step": (_is_count, "a step number"),
    "params_sha256": (_is_hex32, "a hex SHA-256"),
    "path": (_is(str), "a path"),
    "lineage_size": (_is_count, "a record count"),
    "lineage_root": (_is_hex32, "a hex Merkle root"),
    "time": (_is_number, "a number"),
  },
  RUN_RESUME: {
    "checkpoint_step": (_is_count, "a step number"),
    "checkpoint_record": (_is_optional_count, "nil or a record index"),
    "superseded": (_is_range, "[start, end] record indices"),
    "time": (_is_number, "a number"),
  },
  EVENT: {"step": (_is_count, "a step number"), "time": (_is_number, "a number")},
  ESCALATION: {
    "step": (_is_count, "a step number"),
    "message": (_is(str), "a string"),
    "checkpoint_step": (_is_optional_count, "nil or a step number"),
    "time": (_is_number, "a number"),
  },
  OVERRIDE: {
    "step": (_is_count, "a step number"),
    "token_kind": (_is(str), "a string"),
    "token_id": (_is(str), "a string"),
    "token": (_is(bytes), "bin"),
    "time": (_is_number, "a number"),
  },
  RUN_END: {
    "step": (_is_count, "a step number"),
    "status": (_is(str), "a string"),
    "time": (_is_number, "a number"),
  },
}
_REJECTED = (_is_rejections, "a list of {id, reason} maps of non-empty strings")
_OPTIONAL = {
  STEP: {
    "example_sha256": (_is(bytes), "bin"),
    "rows": (_is(dict), "an array"),
    "hidden": (_is(dict), "a weights map"),
    "rejected": _REJECTED,
    "sketch": (_is_sketch_field, "a sketch map (chunk, dim, dtype, sha256)"),
  },
  EVENT: {"rejected": _REJECTED},
}


# what a step actually applied (schema version 2; docs/lineage-schema.md, "Applied weights")
_APPLIED_FIELDS = {
  "applied_weights": (_is(dict), "a weights map"),
  "applied_scale": (_is(dict), "an array"),
  "dropped": _REJECTED,  # the same {id, reason} entries as refusals
}
_OPTIONAL[STEP].update(_APPLIED_FIELDS)


def check_body(kind: str, body: Mapping[str, Any], index: int | None = None) -> None:
  """Raise `LineageError` unless `body` has every field of a `kind` body, each of its type."""
  schema = _SCHEMAS.get(kind)
  if schema is None:
    raise LineageError(f"record {index}: unknown record kind {kind!r}", index=index)
  missing = () if schema.keys() <= body.keys() else sorted(set(schema) - set(body))
  if missing:
    raise LineageError(
      f"record {index}: {kind} body lacks field(s) {', '.join(missing)}; the record is malformed "
      "(see docs/lineage-schema.md)",
      index=index,
    )
  optional = _OPTIONAL.get(kind, {})
  for name, value in body.items():
    check, what = schema.get(name) or optional.get(name) or (None, "")
    if check is not None and not check(value):
      raise LineageError(
        f"record {index}: {kind} field {name!r} must be {what}, got {type(value).__name__} "
        f"{value!r:.60}; the record is malformed",
        index=index,
      )


# ---- arrays -------------------------------------------------------------------------------------

_LITTLE = sys.byteorder == "little"


def array_to_wire(a: ArrayLike) -> dict:
  """`{"dtype", "shape", "data"}` with raw little-endian C-order bytes."""
  arr = np.asarray(a)
  dt = arr.dtype
  if _LITTLE and dt.byteorder != ">":
    data = arr.tobytes()  # C order, native = little-endian
  else:
    data = np.ascontiguousarray(arr, dtype=dt.newbyteorder("<")).tobytes()
  return {
    "data": data,
    "dtype": _dtype_name(dt),
    "shape": list(arr.shape),
  }  # keys in canonical order


@functools.lru_cache(maxsize=64)
def _dtype_name(dt: np.dtype) -> str:
  return dt.name


def array_from_wire(w: Mapping[str, Any], what: str = "array") -> np.ndarray:
  """The array a `{"dtype", "shape", "data"}` map holds; `LineageError` when the map is not one."""
  shape, dtype = _wire_shape(w, what)
  dtype = dtype.newbyteorder("<")
  return np.frombuffer(w["data"], dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


_INDEX_DTYPES = (
  (255, np.dtype(np.uint8)),
  (65535, np.dtype(np.uint16)),
  (2**32 - 1, np.dtype(np.uint32)),
)


def _index_dtype(max_value: int) -> np.dtype:
  """The smallest unsigned dtype holding 0..max_value (int64 beyond uint32)."""
  return next((dt for limit, dt in _INDEX_DTYPES if max_value <= limit), np.dtype(np.int64))


def weights_to_wire(weights: np.ndarray, route_class: np.ndarray) -> dict:
  """[B, G] weights as `{"by_class": [C, G]}` when every row equals its route class's row (the
  usual case: weights come from the policy table), else `{"full": [B, G]}`. Lossless either way
  (rows are compared bit for bit, so 0.0 and -0.0 differ and a NaN equals itself); rows of
  classes absent from the batch are zero."""
  if weights.shape[0]:
    lo, hi = int(route_class.min()), int(route_class.max())
    if lo >= 0 and hi < 65536:
      by_class = np.zeros((hi + 1, weights.shape[1]), weights.dtype)
      by_class[route_class] = weights  # rows of one class agree iff the round trip is exact
      if by_class.take(route_class, axis=0).tobytes() == weights.tobytes():
        return {"by_class": array_to_wire(by_class)}
  return {"full": array_to_wire(weights)}


def weights_from_wire(
  w: Mapping[str, Any], route_class: np.ndarray, what: str = "weights"
) -> np.ndarray:
  """[B, G] per-row values from a `weights_to_wire` map."""
  if not isinstance(w, Mapping) or len(w) != 1 or not set(w) <= {"by_class", "full"}:
    raise LineageError(f"{what} must be a map with one of by_class or full")
  if "by_class" in w:
    table = array_from_wire(w["by_class"], f"{what}.by_class")
    if table.ndim != 2 or (route_class.size and int(route_class.max()) >= table.shape[0]):
      raise LineageError(
        f"{what}.by_class has shape {list(table.shape)}, which has no row for every route class "
        "of the batch"
      )
    return table[route_class]
  return array_from_wire(w["full"], f"{what}.full")


def to_host(tree: PyTree) -> PyTree:
  """`tree` with numpy leaves. Transfers from accelerators start together; CPU arrays are read
  in place (much cheaper than `jax.device_get`, which matters on the writer thread)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  device = next((x for x in leaves if isinstance(x, jax.Array)), None)
  if device is not None and any(d.platform != "cpu" for d in device.devices()):
    for x in leaves:
      if isinstance(x, jax.Array):
        x.copy_to_host_async()
  return jax.tree_util.tree_unflatten(treedef, [np.asarray(x) for x in leaves])


def _tree_to_wire(tree: Any) -> dict:
  if isinstance(tree, Mapping):
    items = [(str(k), v) for k, v in tree.items()]
  else:
    with_path, _ = jax.tree_util.tree_flatten_with_path(tree)
    items = [(paths.path_string(kp) or "value", v) for kp, v in with_path]
  return {k: array_to_wire(v) for k, v in sorted(items, key=lambda kv: kv[0])}


# ---- bodies -------------------------------------------------------------------------------------


def _join_ids(ids: Sequence[str], step: int) -> bytes:
  joined = "\x00".join(ids)
  if ids and (
    joined.count("\x00") != len(ids) - 1
    or "\x00\x00" in joined
    or joined.startswith("\x00")
    or joined.endswith("\x00")
    or not joined
  ):
    bad = next(i for i in ids if not i or "\x00" in i)
    raise LineageError(
      f"step {step}: example id {bad!r} is empty or contains NUL; ids must be non-empty text"
    )
  return joined.encode("utf-8")


def _split_ids(data: bytes) -> tuple[str, ...]:
  try:
    return tuple(data.decode("utf-8").split("\x00")) if data else ()
  except UnicodeDecodeError:
    raise LineageError("example_ids is not UTF-8 text") from None


def _count_ids(data: bytes) -> int:
  """len(_split_ids(data)), without building the id strings."""
  try:
    data.isascii() or data.decode("utf-8")  # ASCII is UTF-8, and checked without a copy
  except UnicodeDecodeError:
    raise LineageError("example_ids is not UTF-8 text") from None
  return data.count(b"\x00") + 1 if data else 0


def step_body(
  summary: StepSummary,
  example_ids: Sequence[str],
  example_sha256: Sequence[bytes | str] | None = None,
  time_s: float | None = None,
) -> dict:
  """Body of a "step" record from a host copy of the summary and the host-side id list of the batch.

  `example_ids` is recorded whole and in order (replay hands the same list to `make_batch`); the
  per-row arrays keep only real rows (`example_index >= 0`), and `rows` (omitted when it is
  0, 1, ..., n-1) maps them to positions in `example_ids`. An id no row refers to was given to the
  step but left out of the batch (for instance not admitted). `example_sha256` (one per id, 32
  bytes or hex) is the content hash of each example. Ids are stored NUL-joined and weights as
  a per-class table when they follow the route classes: both keep the record small and cheap
  to hash.
  """
  s = to_host(summary)
  step = int(s.step)
  index = np.asarray(s.example_index, np.int64)
  keep = index >= 0
  every = bool(keep.all())
  rows = index[keep]
  if rows.size and (rows.max() >= len(example_ids)):
    raise LineageError(
      f"step {step}: example_index {int(rows.max())} outside the {len(example_ids)} "
      "host ids given; pass the id list the batch was built from"
    )
  route_class = np.asarray(s.route_class).astype(np.int64)
  weights = np.asarray(s.weights, np.float32)
  norms = np.asarray(s.contribution_norms, np.float32)
  seen = None if s.seen is None else np.asarray(s.seen, bool)
  if not every:
    route_class, weights, norms = route_class[keep], weights[keep], norms[keep]
    seen = None if seen is None else seen[keep]
  body = {
    "step": step,
    "time": time.time() if time_s is None else float(time_s),
    "example_ids": _join_ids(example_ids, step),
    "route_class": array_to_wire(route_class.astype(_index_dtype(int(route_class.max(initial=0))))),
    "weights": weights_to_wire(weights, route_class),
    "contribution_norms": array_to_wire(norms),
    "loss": canonical.canonical_float(float(np.asarray(s.loss, np.float64))),
    "fingerprint": array_to_wire(np.asarray(s.fingerprint, np.float32)),
    "measurements": _tree_to_wire(s.measurements),
    "events": _tree_to_wire(s.events),
  }
  if seen is not None and not seen.all():
    body["hidden"] = weights_to_wire((~seen).astype(np.uint8), route_class)
  body.update(_applied_to_wire(s, keep, every, weights, route_class, example_ids, index))
  if not (rows.size == len(example_ids) and np.array_equal(rows, np.arange(rows.size))):
    body["rows"] = array_to_wire(rows.astype(_index_dtype(max(len(example_ids) - 1, 0))))
  if example_sha256 is not None:
    try:
      joined = b"".join(example_sha256)
    except TypeError:  # hex strings
      joined = b"".join(d if isinstance(d, bytes) else bytes.fromhex(d) for d in example_sha256)
    if len(joined) != 32 * len(example_ids):
      raise LineageError(
        f"step {step}: example_sha256 must hold one 32-byte SHA-256 per example id"
      )
    body["example_sha256"] = joined
  return dict(sorted(body.items()))  # sorted keys and builtin types only: see encode_step_body


def _applied_to_wire(
  s: StepSummary,
  keep: np.ndarray,
  every: bool,
  weights: np.ndarray,
  route_class: np.ndarray,
  example_ids: Sequence[str],
  index: np.ndarray,
) -> dict:
  """The optional step fields saying what was actually applied, each left out when it says
  nothing new: `applied_weights` when they differ from `weights`, `applied_scale` when some group
  was not scaled by 1, `dropped` when an example was dropped."""
  out: dict[str, Any] = {}
  if s.applied_weights is not None:
    applied = np.asarray(s.applied_weights, np.float32)
    applied = applied if every else applied[keep]
    if applied.shape != weights.shape or not np.array_equal(applied, weights):
      out["applied_weights"] = weights_to_wire(applied, route_class)
  if s.applied_scale is not None:
    scale = np.asarray(s.applied_scale, np.float32)
    if not (scale == 1).all():
      out["applied_scale"] = array_to_wire(scale)
  if s.dropped is not None:
    why = np.asarray(s.dropped)
    rows = np.flatnonzero((why != 0) & keep)
    if rows.size:
      out["dropped"] = [
        {"id": example_ids[int(index[r])], "reason": DROP_REASONS[int(why[r])]} for r in rows
      ]
  return out


# ---- admission refusals ---------------------------------------------------------------------------


def rejected_to_wire(rejected: Iterable[Any]) -> list[dict]:
  """`[{"id", "reason"}]` for examples refused at admission: `aqgov.credentials.Rejection`s,
  `(id, reason)` pairs or `{"id", "reason"}` maps, in the order given."""
  out = []
  for r in rejected:
    try:
      ex_id, reason = (r["id"], r["reason"]) if isinstance(r, Mapping) else tuple(r)
    except (KeyError, TypeError, ValueError):
      raise LineageError(
        f"a refused example must be a Rejection, an (id, reason) pair or an {{id, reason}} map, "
        f"got {r!r:.60}"
      ) from None
    if not isinstance(ex_id, str) or not ex_id or not str(reason):
      raise LineageError(
        f"a refused example needs a non-empty id and reason, got {ex_id!r}: {reason!r}; pass the "
        "`rejected` of an AdmittedBatch (aqgov.credentials.Rejection)"
      )
    out.append({"id": ex_id, "reason": str(reason)})
  return out


def with_rejected(body: Mapping[str, Any], rejected: Iterable[Any]) -> dict:
  """A step or event `body` with its `rejected` field (keys kept sorted, see `encode_step_body`);
  the body unchanged when nothing was refused."""
  wire = rejected_to_wire(rejected)
  return dict(body) if not wire else dict(sorted({**body, "rejected": wire}.items()))


def rejected_of(body: Mapping[str, Any]) -> tuple[Rejection, ...]:
  """The refused examples a step or event body records (checked: `check_body`)."""
  return tuple(Rejection(r["id"], r["reason"]) for r in body.get("rejected", ()))


def encode_step_body(body: Mapping[str, Any]) -> bytes:
  """Canonical bytes of a `step_body` result, without the generic normalisation pass.

  `step_body` builds maps with sorted string keys and only builtin values (int, float, str,
  bytes, lists), so plain msgpack already yields the canonical bytes (readers re-check with
  `aqgov.documents.decode`); this saves most of the writer thread's time per record.
  """
  return msgpack.packb(body, use_bin_type=True, use_single_float=False)


class StepView(NamedTuple):
  """A decoded "step" body as arrays; per-row arrays have one entry per batch row."""

  step: int
  example_ids: tuple[str, ...]
  example_sha256: tuple[str, ...] | None
  rows: np.ndarray
  route_class: np.ndarray
  weights: np.ndarray
  contribution_norms: np.ndarray
  loss: float
  fingerprint: np.ndarray
  measurements: dict[str, np.ndarray]
  events: dict[str, np.ndarray]
  seen: np.ndarray | None = None  # bool [B, G]; groups each row saw in its forward pass
  applied_weights: np.ndarray | None = None  # float32 [B, G]; what each row was applied with
  applied_scale: np.ndarray | None = None  # float32 [G]; scale applied to each group's gradient
  dropped: tuple[tuple[str, str], ...] = ()  # (example id, reason) of examples dropped
  rejected: tuple[Rejection, ...] = ()  # examples refused at admission, left out of the batch

  @property
  def applied_norms(self) -> np.ndarray:
    """float32 [B, G]: the contribution of each row that reached each group's update."""
    return (self.contribution_norms * self.applied_scale[None, :]).astype(np.float32)

  @property
  def row_ids(self) -> tuple[str, ...]:
    """The example id of each batch row."""
    return tuple(self.example_ids[i] for i in self.rows)

  @property
  def left_out(self) -> tuple[str, ...]:
    """Ids given to the step that no batch row refers to (not admitted, or dropped by the task)."""
    used = set(int(i) for i in self.rows)
    return tuple(e for i, e in enumerate(self.example_ids) if i not in used)


def check_step(
  body: Mapping[str, Any],
  index: int | None = None,
  groups: int | None = None,
  *,
  fields_checked: bool = False,
) -> None:
  """Raise `LineageError` unless a "step" body has every field, and arrays whose dtypes, byte counts and
  shapes fit together ([B] rows, [B, G] or [C, G] per-row maps, [G, dim] fingerprint), without
  building the arrays (what `verify_lineage` checks of every step record). `fields_checked`: the
  caller already ran `check_body` on it (as `decode_body` with a kind does), so it is not rerun."""
  try:
    _check_step(body, groups, fields_checked)
  except LineageError as exc:
    raise LineageError(f"record {index}: malformed step body: {exc}", index=index) from None


def view_step(
  body: Mapping[str, Any], index: int | None = None, groups: int | None = None
) -> StepView:
  """A "step" body (record `index`) as arrays, checked (`groups`: the run's G, when known)."""
  try:
    return _view_step(body, groups)
  except LineageError as exc:
    raise LineageError(f"record {index}: malformed step body: {exc}", index=index) from None


@functools.lru_cache(maxsize=64)
def _wire_dtype(name: Any) -> np.dtype | None:
  try:
    dtype = np.dtype(name)
  except TypeError:
    return None
  return (
    None
    if dtype.hasobject or dtype.fields is not None or dtype.itemsize == 0 or dtype.subdtype
    else dtype
  )


def _wire_shape_of(w: Any) -> tuple[tuple[int, ...], np.dtype] | None:
  """(shape, dtype) of a well-formed array map as decoded (plain types), checked without numpy;
  None for anything else (`_wire_shape` then says what is wrong)."""
  if type(w) is dict and len(w) == 3:
    data, name, shape = w.get("data"), w.get("dtype"), w.get("shape")
    if type(data) is bytes and type(name) is str and type(shape) is list:
      dtype = _wire_dtype(name)
      n = -1 if dtype is None else dtype.itemsize
      for d in shape:
        n = n * d if type(d) is int and d >= 0 and n >= 0 else -1
      if n == len(data):
        return tuple(shape), dtype
  return None


def _wire_shape(w: Any, what: str) -> tuple[tuple[int, ...], np.dtype]:
  """(shape, dtype) of an array map, checked to hold exactly that many bytes."""
  known = _wire_shape_of(w)
  if known is not None:
    return known
  if not isinstance(w, Mapping) or set(w) != {"data", "dtype", "shape"}:
    raise LineageError(f"{what} is not an array map (data, dtype, shape)")
  dtype = _wire_dtype(w["dtype"]) if isinstance(w["dtype"], str) else None
  if dtype is None:
    raise LineageError(
      f"{what} has dtype {w['dtype']!r:.40}, which is not a numeric numpy dtype name"
    )
  shape = w["shape"]
  if (
    not isinstance(shape, list)
    or not all(_is_count(d) for d in shape)
    or not isinstance(w["data"], bytes)
  ):
    raise LineageError(f"{what} needs a list of non-negative dimensions and bin data")
  if math.prod(shape) * dtype.itemsize != len(w["data"]):
    raise LineageError(
      f"{what} of shape {shape} and dtype {dtype.name} needs {math.prod(shape) * dtype.itemsize} "
      f"bytes, holds {len(w['data'])}"
    )
  return tuple(shape), dtype


def _check_per_row(w: Any, rows: int, g: int, what: str) -> None:
  if not isinstance(w, Mapping) or len(w) != 1 or not set(w) <= {"by_class", "full"}:
    raise LineageError(f"{what} must be a map with one of by_class or full")
  form = next(iter(w))
  shape, _ = _wire_shape(w[form], f"{what}.{form}")
  if len(shape) != 2 or shape[1] != g or (form == "full" and shape[0] != rows):
    raise LineageError(
      f"{what}.{form} has shape {list(shape)}, not [{'B' if form == 'full' else 'C'}, G] with "
      f"B = {rows}, G = {g}"
    )


def _check_step(body: Mapping[str, Any], groups: int | None, fields_checked: bool = False) -> int:
  if not fields_checked:
    check_body(STEP, body)
  n_ids = _count_ids(body["example_ids"])
  sha = body.get("example_sha256")
  if sha is not None and len(sha) != 32 * n_ids:
    raise LineageError(
      f"example_sha256 holds {len(sha)} bytes, not 32 for each of the {n_ids} example ids"
    )
  rc_shape, rc_dtype = _wire_shape(body["route_class"], "route_class")
  if len(rc_shape) != 1 or rc_dtype.kind not in "iu":
    raise LineageError(
      f"route_class must be a [B] integer array, got {rc_dtype.name} {list(rc_shape)}"
    )
  if "rows" in body:
    rows_shape, rows_dtype = _wire_shape(body["rows"], "rows")
    if rows_shape != rc_shape or rows_dtype.kind not in "iu":
      raise LineageError(
        f"rows must be a [B] integer array with B = {rc_shape[0]}, got {list(rows_shape)}"
      )
  elif rc_shape[0] != n_ids:
    raise LineageError(
      f"{rc_shape[0]} batch rows but {n_ids} example ids, and no rows map between them"
    )
  fp_shape, _ = _wire_shape(body["fingerprint"], "fingerprint")
  if len(fp_shape) != 2 or (groups is not None and fp_shape[0] != groups):
    raise LineageError(
      f"fingerprint has shape {list(fp_shape)}, not [G, dim] for the run's "
      f"{groups if groups is not None else 'G'} groups"
    )
  g = fp_shape[0]
  _check_per_row(body["weights"], rc_shape[0], g, "weights")
  _check_applied(body, rc_shape[0], g)
  if "hidden" in body:
    _check_per_row(body["hidden"], rc_shape[0], g, "hidden")
  norms_shape, _ = _wire_shape(body["contribution_norms"], "contribution_norms")
  if norms_shape != (rc_shape[0], g):
    raise LineageError(
      f"contribution_norms has shape {list(norms_shape)}, not [B, G] = {[rc_shape[0], g]}"
    )
  for field in ("measurements", "events"):
    for k, v in body[field].items():
      if _wire_shape_of(v) is None:  # the message only for a bad one
        _wire_shape(v, f"{field[:-1]} {k!r}")
  return g


def _check_applied(body: Mapping[str, Any], rows: int, g: int) -> None:
  if "applied_weights" in body:
    _check_per_row(body["applied_weights"], rows, g, "applied_weights")
  if "applied_scale" in body:
    shape, dtype = _wire_shape(body["applied_scale"], "applied_scale")
    if shape != (g,) or dtype.kind != "f":
      raise LineageError(f"applied_scale must be a float [G] array with G = {g}, got {list(shape)}")
  known = set(_split_ids(body["example_ids"])) if body.get("dropped") else set()
  for d in body.get("dropped", ()):
    if d["id"] not in known:
      raise LineageError(
        f"dropped names example {d['id']!r:.60}, which is not among the step's ids"
      )


def _view_applied(body: Mapping[str, Any], weights: np.ndarray, route_class: np.ndarray) -> dict:
  """The applied fields of a step view; a record without them applied exactly its `weights`."""
  applied = (
    weights
    if "applied_weights" not in body
    else weights_from_wire(body["applied_weights"], route_class, "applied_weights")
  )
  scale = (
    np.ones(weights.shape[1], np.float32)
    if "applied_scale" not in body
    else array_from_wire(body["applied_scale"], "applied_scale").astype(np.float32)
  )
  dropped = tuple((d["id"], d["reason"]) for d in body.get("dropped", ()))
  return {"applied_weights": applied, "applied_scale": scale, "dropped": dropped}


def _view_step(body: Mapping[str, Any], groups: int | None) -> StepView:
  g = _check_step(body, groups)
  sha = body.get("example_sha256")
  ids = _split_ids(body["example_ids"])
  route_class = array_from_wire(body["route_class"], "route_class").astype(np.int64)
  if route_class.size and route_class.min() < 0:
    raise LineageError("route_class holds a negative route class")
  rows = array_from_wire(body["rows"], "rows") if "rows" in body else np.arange(len(ids))
  if rows.size and not 0 <= rows.min() <= rows.max() < len(ids):
    raise LineageError(
      f"rows must name one of the {len(ids)} example ids for each of the {route_class.size} "
      "batch rows"
    )
  fingerprint = array_from_wire(body["fingerprint"], "fingerprint")
  per_row = (route_class.size, g)
  weights = weights_from_wire(body["weights"], route_class)
  norms = array_from_wire(body["contribution_norms"], "contribution_norms")
  hidden = (
    None if "hidden" not in body else weights_from_wire(body["hidden"], route_class, "hidden")
  )
  return StepView(
    step=int(body["step"]),
    example_ids=ids,
    example_sha256=None
    if sha is None
    else tuple(sha[i : i + 32].hex() for i in range(0, len(sha), 32)),
    rows=rows.astype(np.int64),
    route_class=route_class.astype(np.int32),
    weights=weights,
    contribution_norms=norms,
    loss=float(body["loss"]),
    fingerprint=fingerprint,
    measurements={
      k: array_from_wire(v, f"measurement {k!r}") for k, v in body["measurements"].items()
    },
    events={k: array_from_wire(v, f"event {k!r}") for k, v in body["events"].items()},
    seen=np.ones(per_row, bool) if hidden is None else hidden == 0,
    **_view_applied(body, weights, route_class),
    rejected=rejected_of(body),
  )
