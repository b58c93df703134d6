"""A columnar index of the signed part of a lineage, signed with the run key, for fast queries.

`RUN/index/` holds, for the effective and superseded step records a signed tree head covers, one
row per (step record, batch row), as plain `.npy` files a query reads only when it needs them:

  step.npy, record.npy, example.npy, route_class.npy   int32 [N]
  superseded.npy                                      bool [N]
  weight-<g>.npy, norm-<g>.npy                        float32 [N], per group index g: the weight
                                                      and contribution norm as applied
                                                      (`StepView.applied_weights`, `applied_norms`)
  reached-<g>.npy                                     bool [N], per group (see `reached`)
  ids.json                                            the id table: example ids, `example` indexes it
  labels.npy                                          int32 [K, len(ids)], the label table

and `index.json`, a DSSE envelope (payload type `PAYLOAD_TYPE`) signed by the run key whose
payload names the signed tree head the index was built from (id, size, root), the groups, route
classes, taxonomies, manifest ids, label keys and the SHA-256 of every file. A query uses the
index only when that signature verifies with the run-start signer's key, the head is the log's
latest signed head, and each file it reads hashes to the recorded digest; otherwise it says why
and scans the log instead (`load_columns`). `verify_lineage` rebuilds the columns from the log and
holds every digest to them (`check_index`): an index cannot say what the log does not.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from aqgov.documents import _canonical as canonical
from aqgov.documents import _signing as signing
from aqgov.documents._document_type import verify
from aqgov.documents._files import atomic_write
from aqgov.documents._keys import PublicKey, SigningKey
from aqgov.errors import AqgovError, LineageError
from aqgov.lineage import _history as hist
from aqgov.lineage import _record as rec
from aqgov.lineage._heads import HEAD, read_heads, run_trust
from aqgov.lineage._labels import RunLabels, label_space
from aqgov.lineage._segments import first_record, records

INDEX_DIR = "index"
FORMAT = "aqgov.lineage-index/1"
PAYLOAD_TYPE = "application/vnd.aqgov.lineage-index+json"
_COMMON = ("step", "record", "example", "route_class", "superseded")
_PER_GROUP = ("weight", "norm", "reached")


def reached(view: rec.StepView) -> np.ndarray:
  """bool [B, G]: the rows whose update reached each group (weight > 0, and the weight actually
  applied > 0 where the record says what was applied after pause, reroute or strict mode)."""
  return (view.weights > 0) & (view.applied_weights > 0)


class Columns(NamedTuple):
  """The rows of the signed step records, one array per column (see the module doc)."""

  groups: tuple[str, ...]
  classes: tuple[str, ...]
  ids: tuple[str, ...]
  step: np.ndarray
  record: np.ndarray
  example: np.ndarray
  route_class: np.ndarray
  superseded: np.ndarray
  weight: dict[int, np.ndarray]  # group index -> float32 [N]
  norm: dict[int, np.ndarray]
  reached: dict[int, np.ndarray]
  label_keys: tuple[str, ...]
  labels: np.ndarray  # int32 [K, len(ids)]
  space: Any  # LabelSpace

  @property
  def size(self) -> int:
    return int(self.step.shape[0])

  def label_table(self) -> dict[str, np.ndarray]:
    return {k: self.labels[i] for i, k in enumerate(self.label_keys)}

  def group(self, name: str) -> int:
    if name not in self.groups:
      raise LineageError(
        f"group {name!r} is not one of this run's groups: {', '.join(self.groups)}"
      )
    return self.groups.index(name)


def _start(ldir: Path) -> dict:
  """The run-start body (record 0 alone: a query from the index reads nothing else of the log)."""
  first = first_record(ldir)
  if first is None:
    raise LineageError(f"{ldir} holds no run-start record; nothing to index")
  return first.body


def build_columns(
  ldir: Path, history: hist.History, start: Mapping[str, Any], labels: RunLabels
) -> Columns:
  """The columns of the first `history.size` records (the signed part), read from the log."""
  groups = tuple(start["groups"])
  g = len(groups)
  ids: dict[str, int] = {}
  step, record, example, rclass, superseded = [], [], [], [], []
  weight, norm, hit = [], [], []
  for index, _, body in records(ldir, kinds=(rec.STEP,), stop=history.size):
    view = rec.view_step(body, index, g)
    n = view.route_class.shape[0]
    row_ids = view.row_ids
    step.append(np.full(n, view.step, np.int32))
    record.append(np.full(n, index, np.int32))
    example.append(np.fromiter((ids.setdefault(i, len(ids)) for i in row_ids), np.int32, n))
    rclass.append(view.route_class.astype(np.int32))
    superseded.append(np.full(n, not history.effective(index), bool))
    weight.append(view.applied_weights.astype(np.float32).reshape(n, g))
    norm.append(view.applied_norms.astype(np.float32).reshape(n, g))
    hit.append(reached(view).reshape(n, g))

  def cat(parts: list, dtype, shape=(0,)) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(shape, dtype)

  w, nm, r = cat(weight, np.float32, (0, g)), cat(norm, np.float32, (0, g)), cat(hit, bool, (0, g))
  id_table = tuple(ids)
  table = labels.table(id_table)
  keys = tuple(labels.space.keys())
  return Columns(
    groups,
    tuple(start.get("classes", ())),
    id_table,
    cat(step, np.int32),
    cat(record, np.int32),
    cat(example, np.int32),
    cat(rclass, np.int32),
    cat(superseded, bool),
    {i: np.ascontiguousarray(w[:, i]) for i in range(g)},
    {i: np.ascontiguousarray(nm[:, i]) for i in range(g)},
    {i: np.ascontiguousarray(r[:, i]) for i in range(g)},
    keys,
    np.stack([table[k] for k in keys]).astype(np.int32).reshape(len(keys), len(id_table)),
    labels.space,
  )


def _last_signed_head(ldir: Path, signer: str) -> dict | None:
  """The payload of the last tree head in heads.seg that the run key signed (None: no such head)."""
  heads, _ = read_heads(ldir)
  if not heads:
    return None
  trust = run_trust(hist._run_key(ldir, signer))
  for h in reversed(heads):
    try:
      verify(HEAD, h, trust)
    except AqgovError:
      continue
    return {"id": h.id, "size": int(h.payload["size"]), "root": h.payload["root"]}
  return None


def _files(columns: Columns) -> dict[str, bytes]:
  """File name -> bytes of every index file but index.json."""

  def npy(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()

  out = {f"{c}.npy": npy(getattr(columns, c)) for c in _COMMON}
  for gi in range(len(columns.groups)):
    for c in _PER_GROUP:
      out[f"{c}-{gi}.npy"] = npy(getattr(columns, c)[gi])
  out["ids.json"] = json.dumps(list(columns.ids), ensure_ascii=False).encode("utf-8")
  out["labels.npy"] = npy(columns.labels)
  return out


def index_payload(columns: Columns, head: Mapping[str, Any], run_id: str, start) -> dict:
  """What index.json signs: the head, the shape of the index and each file's SHA-256."""
  return {
    "format": FORMAT,
    "run_id": run_id,
    "head": dict(head),
    "groups": list(columns.groups),
    "classes": list(columns.classes),
    "rows": columns.size,
    "ids": len(columns.ids),
    "manifests": [m["id"] for m in start.get("manifests", ())],
    "taxonomies": [t.to_dict() for t in columns.space.taxonomies],
    "label_keys": list(columns.label_keys),
    "files": {k: hashlib.sha256(v).hexdigest() for k, v in sorted(_files(columns).items())},
  }


def _signed(payload: Mapping[str, Any], key: SigningKey) -> dict:
  data = canonical.encode(dict(payload))
  sig = key.sign(signing.pae(PAYLOAD_TYPE, data))
  return {
    "payload": base64.b64encode(data).decode(),
    "payloadType": PAYLOAD_TYPE,
    "signatures": [{"keyid": key.key_id, "sig": base64.b64encode(sig).decode()}],
  }


def _open_signed(env: Any, key: PublicKey) -> dict:
  """The payload of index.json if `key` signed it; `LineageError` otherwise."""
  try:
    data = base64.b64decode(env["payload"], validate=True)
    if env["payloadType"] != PAYLOAD_TYPE:
      raise LineageError(f"index.json has payload type {env['payloadType']!r}")
    message = signing.pae(PAYLOAD_TYPE, data)
    ok = any(
      s["keyid"] == key.key_id and key.verify(message, base64.b64decode(s["sig"], validate=True))
      for s in env["signatures"]
    )
    payload = canonical.decode(data)
  except (KeyError, TypeError, ValueError, AqgovError) as exc:
    raise LineageError(f"index.json is not a signed index ({exc})") from None
  if not ok:
    raise LineageError("index.json is not signed by the run key (or was altered after signing)")
  if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
    raise LineageError(f"index.json is not an {FORMAT} payload")
  return dict(payload)


def build_index(run_dir: str | os.PathLike, key: SigningKey) -> dict:
  """Build `RUN/index/` from the signed part of the log and sign it with the run key `key`;
  returns the signed payload. Refused unless `key` is the key run-start names as signer."""
  from aqgov.lineage._labels import run_labels
  from aqgov.lineage._verify import lineage_dir

  root, ldir = lineage_dir(run_dir)
  start = _start(ldir)
  if key.key_id != start["signer"]:
    raise LineageError(
      f"key {key.key_id[:16]}... is not the run key ({start['signer'][:16]}...): an index is "
      "signed by the key that signs the run's tree heads"
    )
  head = _last_signed_head(ldir, start["signer"])
  if head is None:
    raise LineageError(f"{ldir} has no signed tree head; there is no signed part to index")
  _, history = hist.load(ldir)
  if history.size != head["size"]:
    raise LineageError(
      f"the last signed head covers {head['size']} records but only {history.size} check out "
      "against the log; verify the run (aqgov lineage verify) before indexing it"
    )
  columns = build_columns(ldir, history, start, run_labels(root, start))
  payload = index_payload(columns, head, start["run_id"], start)
  out = root / INDEX_DIR
  out.mkdir(exist_ok=True)
  for name, data in _files(columns).items():
    atomic_write(out / name, data)
  atomic_write(out / "index.json", json.dumps(_signed(payload, key), indent=1).encode())
  return payload


class IndexUse(NamedTuple):
  """The outcome of opening an index: the payload when it may be used, else why not."""

  payload: dict | None
  reason: str


def open_index(root: Path, ldir: Path, start: Mapping[str, Any]) -> IndexUse:
  """The signed payload of `RUN/index/index.json` if the run key signed it and it covers the
  log's latest signed head; otherwise None and the reason (missing, unsigned, stale, ...)."""
  path = root / INDEX_DIR / "index.json"
  if not path.is_file():
    return IndexUse(None, f"no index ({path} is absent; build one with `aqgov lineage index`)")
  try:
    env = json.loads(path.read_bytes())
    payload = _open_signed(env, hist._run_key(ldir, start["signer"]))
  except (ValueError, OSError, AqgovError) as exc:
    return IndexUse(None, f"the index is not used: {exc}")
  head = _last_signed_head(ldir, start["signer"])
  if head is None or payload.get("head") != head:
    return IndexUse(
      None,
      f"the index is stale: it covers head {str(payload.get('head'))[:80]} but the log's latest "
      f"signed head is {head}; rebuild it with `aqgov lineage index`",
    )
  if payload.get("run_id") != start["run_id"] or payload.get("manifests") != [
    m["id"] for m in start.get("manifests", ())
  ]:
    return IndexUse(None, "the index names another run or other manifests than run-start")
  return IndexUse(payload, "")


def _read(root: Path, payload: Mapping[str, Any], name: str) -> np.ndarray:
  """One index file, refused (`LineageError`) unless it hashes to its digest in the payload."""
  path = root / INDEX_DIR / name
  data = path.read_bytes()
  if hashlib.sha256(data).hexdigest() != payload["files"].get(name):
    raise LineageError(f"{path} does not hash to the digest the signed index records: altered")
  if name.endswith(".json"):
    return json.loads(data)
  import io

  return np.load(io.BytesIO(data), allow_pickle=False)


def columns_from_index(
  root: Path, payload: Mapping[str, Any], groups: Sequence[int] | None = None
) -> Columns:
  """The columns the index holds (only those of `groups`, by index, when given)."""
  g = list(range(len(payload["groups"]))) if groups is None else list(groups)
  common = {c: _read(root, payload, f"{c}.npy") for c in _COMMON}
  per = {c: {i: _read(root, payload, f"{c}-{i}.npy") for i in g} for c in _PER_GROUP}
  keys = tuple(payload["label_keys"])
  from aqgov.credentials._taxonomy import Taxonomy

  return Columns(
    tuple(payload["groups"]),
    tuple(payload["classes"]),
    tuple(_read(root, payload, "ids.json")),
    common["step"],
    common["record"],
    common["example"],
    common["route_class"],
    common["superseded"],
    per["weight"],
    per["norm"],
    per["reached"],
    keys,
    _read(root, payload, "labels.npy"),
    label_space([Taxonomy.from_dict(t) for t in payload["taxonomies"]]),
  )


class Loaded(NamedTuple):
  """Columns to answer a query from, where they came from, and why the index was not used."""

  columns: Columns
  source: str  # "index" or "scan"
  note: str


def load_columns(
  run_dir: str | os.PathLike,
  *,
  groups: Sequence[str] | None = None,
  use_index: bool = True,
  labels: RunLabels | None = None,
) -> Loaded:
  """The columns of the run's signed part: from its index when that is signed, current and intact,
  else from a scan of the log (the note says why)."""
  from aqgov.lineage._labels import run_labels
  from aqgov.lineage._verify import lineage_dir

  root, ldir = lineage_dir(run_dir)
  start = _start(ldir)
  note = "the index was not asked for"
  if use_index:
    use = open_index(root, ldir, start)
    note = use.reason
    if use.payload is not None:
      names = list(use.payload["groups"])
      wanted = None if groups is None else [names.index(x) for x in groups if x in names]
      try:
        return Loaded(columns_from_index(root, use.payload, wanted), "index", "")
      except (OSError, ValueError, AqgovError) as exc:
        note = f"the index is not used: {exc}"
  _, history = hist.load(ldir)
  labels = labels if labels is not None else run_labels(root, start)
  return Loaded(build_columns(ldir, history, start, labels), "scan", note)


def check_index(run_dir: Path, ldir: Path, start: Mapping[str, Any], scan, signed_size: int) -> str:
  """Hold `RUN/index/` to the log: signed by the run key, naming a signed head, and every file
  digest equal to that of the columns rebuilt from the log. Returns a line for the verify report;
  `LineageError` when the index lies."""
  from aqgov.lineage._labels import run_labels

  path = run_dir / INDEX_DIR / "index.json"
  try:
    payload = _open_signed(json.loads(path.read_bytes()), hist._run_key(ldir, start["signer"]))
  except ValueError as exc:
    raise LineageError(f"{path} is not a signed index ({exc})") from None
  head = payload.get("head") or {}
  size = int(head.get("size", -1))
  heads, _ = read_heads(ldir)
  if not 0 < size <= signed_size or head.get("id") not in {h.id for h in heads}:
    raise LineageError(
      f"{path} names head {str(head.get('id'))[:16]}... of {size} records, not a signed head of "
      "this log; delete RUN/index/ or rebuild it with `aqgov lineage index`"
    )
  covered = hist.history(scan, size)
  columns = build_columns(ldir, covered, start, run_labels(run_dir, start))
  expected = index_payload(columns, head, start["run_id"], start)
  for name, digest in expected["files"].items():
    on_disk = run_dir / INDEX_DIR / name
    if not on_disk.is_file() or hashlib.sha256(on_disk.read_bytes()).hexdigest() != digest:
      raise LineageError(
        f"the index file {on_disk} does not hold what the log says (rebuilt digest differs): the "
        "index was altered; delete RUN/index/ or rebuild it with `aqgov lineage index`"
      )
  if {k: v for k, v in payload.items() if k != "head"} != {
    k: v for k, v in expected.items() if k != "head"
  }:
    raise LineageError(f"{path} signs a payload other than the one the log rebuilds to")
  stale = "" if size == signed_size else f" (stale: covers {size} of {signed_size} records)"
  return f"index {INDEX_DIR}/ ({payload['rows']} rows, head {head.get('id', '')[:16]}...){stale}"
