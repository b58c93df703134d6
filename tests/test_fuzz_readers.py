"""Fuzzed readers: damaged bytes give only `AqgovError`s, and undamaged ones still parse.

Each reader gets a valid file with random byte flips, truncations, insertions or random frames;
whatever it raises must be a typed aqgov error (never KeyError, TypeError, ValueError,
RecursionError, UnicodeDecodeError, OverflowError, ...).
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aqgov.credentials import _manifest as credentials
from aqgov.credentials._taxonomy import Taxonomy
from aqgov.documents import _canonical as canonical
from aqgov.documents import _keys as keys
from aqgov.documents._document_type import DocumentType, load, read, sign, verify
from aqgov.entropy._overrides import OVERRIDE, Override
from aqgov.entropy._profile import PROFILE, EntropyProfile
from aqgov.errors import AqgovError
from aqgov.examples import sample
from aqgov.lineage import _record as rec
from aqgov.lineage import _segments as segments
from aqgov.lineage._heads import HEAD, read_heads
from aqgov.lineage._query import describe
from aqgov.lineage._verify import verify_lineage
from aqgov.policy._policy import POLICY, Policy

import lineage_helpers as lh

FUZZ = settings(
  max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
AUTHORITY = keys.generate("acme-data", roles=("authority",))
TRUST = keys.TrustStore.of([AUTHORITY.public])
RUN_KEY = keys.generate("run", roles=("run",))


@st.composite
def damaged(draw, data: bytes) -> bytes:
  """`data` with a few random flips, a truncation, an insertion or a deletion."""
  out = bytearray(data)
  for _ in range(draw(st.integers(1, 4))):
    op = draw(st.sampled_from(("flip", "truncate", "insert", "delete")))
    if op == "flip" and out:
      i = draw(st.integers(0, len(out) - 1))
      out[i] ^= draw(st.integers(1, 255))
    elif op == "truncate":
      del out[draw(st.integers(0, len(out))) :]
    elif op == "insert":
      i = draw(st.integers(0, len(out)))
      out[i:i] = draw(st.binary(min_size=1, max_size=16))
    elif op == "delete" and out:
      i = draw(st.integers(0, len(out) - 1))
      del out[i : i + draw(st.integers(1, 16))]
  return bytes(out)


def only_typed_errors(fn, *args):
  """Run `fn`; an error it raises must be an `AqgovError`."""
  try:
    return fn(*args)
  except AqgovError:
    return None


def _tmp(name: str, data: bytes) -> Path:
  d = Path(tempfile.mkdtemp(prefix="aqgov-fuzz-"))
  path = d / name
  path.write_bytes(data)
  return path


# ---- signed documents through the generic reader ------------------------------------------------


def _policy() -> Policy:
  return Policy(
    "p",
    {"all": ["**"]},
    [{"name": "low", "when": "acme-data.sensitivity_tier <= 1", "route": {"all": 0.5}}],
    default={"all": 1.0},
  )


@functools.cache
def _signed_documents() -> dict[str, tuple[DocumentType, bytes]]:
  manifest = credentials.issue_manifest(
    AUTHORITY,
    sample.taxonomies()["acme-data"],
    [
      {
        "id": "a",
        "content": "one",
        "labels": {
          "license_class": "cc-by",
          "sensitivity_tier": 1,
          "jurisdictions": ["EU"],
          "source": "forum",
        },
      }
    ],
  )
  override = Override.create(
    run="r",
    steps="3-5",
    groups="all",
    metrics="renyi2",
    reason="why",
    expires="2999-01-01T00:00:00Z",
  )
  profile = EntropyProfile.read(sample.profile_path())
  head = sign(
    HEAD,
    {
      "run_id": "r",
      "size": 1,
      "root": "00" * 32,
      "last_record": "11" * 32,
      "prev_head": None,
      "time": 0.0,
    },
    RUN_KEY,
  )
  return {
    "manifest": (credentials.MANIFEST, manifest.to_bytes()),
    "policy": (POLICY, sign(POLICY, _policy(), AUTHORITY).to_bytes()),
    "profile": (PROFILE, sign(PROFILE, profile, AUTHORITY).to_bytes()),
    "override": (OVERRIDE, sign(OVERRIDE, override, AUTHORITY).to_bytes()),
    "lineage-head": (HEAD, head.to_bytes()),
  }


def _read_and_verify(doc_type: DocumentType, path: Path):
  trust = keys.TrustStore.of([AUTHORITY.public, RUN_KEY.public])
  signed = read(doc_type, path)
  load(doc_type, path)
  return verify(doc_type, signed, trust)


def test_valid_signed_documents_parse_and_verify():
  for name, (doc_type, data) in _signed_documents().items():
    assert _read_and_verify(doc_type, _tmp(name + ".signed", data)) is not None, name


@FUZZ
@given(
  st.sampled_from(sorted(["manifest", "policy", "profile", "override", "lineage-head"])), st.data()
)
def test_damaged_signed_documents_raise_only_typed_errors(name, data):
  doc_type, good = _signed_documents()[name]
  only_typed_errors(_read_and_verify, doc_type, _tmp(name + ".signed", data.draw(damaged(good))))


@FUZZ
@given(
  st.sampled_from(sorted(["manifest", "policy", "profile", "override", "lineage-head"])),
  st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=6)
    | st.binary(max_size=6),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=10,
  ),
  st.data(),
)
def test_signed_payloads_with_fields_replaced_by_random_values_raise_only_typed_errors(
  name, value, data
):
  doc_type, good = _signed_documents()[name]
  signed = read(doc_type, _tmp(name + ".signed", good))
  payload = dict(signed.payload)
  field = data.draw(st.sampled_from(sorted(payload) + ["extra"]))
  payload[field] = value
  try:
    forged = signed._replace(payload=payload).to_bytes()
  except AqgovError:
    return
  only_typed_errors(_read_and_verify, doc_type, _tmp(name + ".signed", forged))


# ---- TOML sources --------------------------------------------------------------------------------


def _toml_sources() -> dict[str, tuple[object, str]]:
  return {
    "policy": (Policy.from_toml, _policy().to_toml()),
    "profile": (EntropyProfile.from_toml, sample.profile_path().read_text()),
    "taxonomy": (Taxonomy.from_toml, sample.taxonomies()["acme-data"].to_toml()),
  }


def test_valid_toml_documents_parse():
  for name, (parse, text) in _toml_sources().items():
    assert parse(text) is not None, name


@FUZZ
@given(st.sampled_from(["policy", "profile", "taxonomy"]), st.data())
def test_damaged_toml_documents_raise_only_typed_errors(name, data):
  parse, text = _toml_sources()[name]
  raw = data.draw(damaged(text.encode()))
  reader = {"policy": Policy.read, "profile": EntropyProfile.read, "taxonomy": Taxonomy.read}[name]
  only_typed_errors(reader, _tmp(name + ".toml", raw))


# ---- JSONL examples ------------------------------------------------------------------------------

GOOD_JSONL = (
  b'{"id": "a", "content": "one", "labels": {"acme-data": {"source": "x"}}}\n'
  b'{"id": "b", "content_b64": "dHdv"}\n'
)


def test_valid_jsonl_parses():
  assert [e.id for e in credentials.read_examples(_tmp("e.jsonl", GOOD_JSONL))] == ["a", "b"]


@FUZZ
@given(st.data())
def test_damaged_jsonl_raises_only_typed_errors(data):
  only_typed_errors(credentials.read_examples, _tmp("e.jsonl", data.draw(damaged(GOOD_JSONL))))


@FUZZ
@given(
  st.lists(
    st.text(max_size=12) | st.binary(max_size=12).map(lambda b: b.decode("latin-1")), max_size=6
  )
)
def test_jsonl_of_random_text_lines_raises_only_typed_errors(lines):
  raw = "\n".join(lines).encode("utf-8", "surrogatepass")
  only_typed_errors(credentials.read_examples, _tmp("e.jsonl", raw))


# ---- lineage segments and heads ------------------------------------------------------------------


@functools.cache
def _log() -> Path:
  d = Path(tempfile.mkdtemp(prefix="aqgov-fuzz-log-")) / "lineage"
  lh.write_log(d, RUN_KEY, 4, head_every=2)
  lh.publish_key(d.parent, RUN_KEY)  # RUN/keys/run.pub: readers check the signed heads with it
  return d


def _read_log(ldir: Path):
  trust = keys.TrustStore.of([RUN_KEY.public])
  verify_lineage(ldir, trust)
  describe(ldir)
  for r in segments.LogReader(ldir):
    _ = r.body
  read_heads(ldir)


def _with(ldir: Path, name: str, data: bytes) -> Path:
  out = Path(tempfile.mkdtemp(prefix="aqgov-fuzz-log-")) / "lineage"
  shutil.copytree(ldir, out)
  shutil.copytree(ldir.parent / "keys", out.parent / "keys")
  target = out / name if name == "heads.seg" else lh.segment_path(out)
  target.write_bytes(data)
  return out


def test_the_valid_log_verifies():
  _read_log(_log())


@FUZZ
@given(st.sampled_from(["segment", "heads.seg"]), st.data())
def test_damaged_segment_and_heads_files_raise_only_typed_errors(which, data):
  ldir = _log()
  good = (ldir / "heads.seg" if which == "heads.seg" else lh.segment_path(ldir)).read_bytes()
  only_typed_errors(_read_log, _with(ldir, which, data.draw(damaged(good))))


@FUZZ
@given(
  st.sampled_from(["segment", "heads.seg"]),
  st.lists(st.binary(max_size=64), min_size=1, max_size=3),
  st.booleans(),
)
def test_random_frames_appended_raise_only_typed_errors(which, payloads, as_records):
  ldir = _log()
  good = (ldir / "heads.seg" if which == "heads.seg" else lh.segment_path(ldir)).read_bytes()
  if as_records:  # random bodies in well-formed, correctly numbered envelopes
    reader = segments.LogReader(ldir)
    for _ in reader:
      pass
    frames, prev = [], reader.last_hash
    for k, p in enumerate(payloads):
      record = rec.encode_record(reader.size + k, rec.KINDS[len(p) % len(rec.KINDS)], prev, p)
      frames.append(segments.frame(record))
      prev = rec.record_hash(record)
  else:
    frames = [segments.frame(p) for p in payloads]
  only_typed_errors(_read_log, _with(ldir, which, good + b"".join(frames)))


@FUZZ
@given(
  st.sampled_from(rec.KINDS[1:]),
  st.dictionaries(
    st.sampled_from(
      [
        "step",
        "time",
        "loss",
        "weights",
        "route_class",
        "example_ids",
        "superseded",
        "status",
        "token",
        "events",
        "lineage_size",
        "lineage_root",
        "checkpoint_record",
        "fingerprint",
        "rows",
        "hidden",
      ]
    ),
    st.none()
    | st.integers(-3, 10)
    | st.floats()
    | st.text(max_size=4)
    | st.binary(max_size=8)
    | st.lists(st.integers(-2, 6), max_size=3)
    | st.fixed_dictionaries(
      {
        "dtype": st.sampled_from(["float32", "uint8", "object", "x"]),
        "shape": st.lists(st.integers(-1, 4), max_size=3),
        "data": st.binary(max_size=16),
      }
    ),
    max_size=8,
  ),
)
def test_records_with_random_bodies_raise_only_typed_errors(kind, body):
  ldir = _log()
  reader = segments.LogReader(ldir)
  for _ in reader:
    pass
  try:
    record = rec.encode_record(reader.size, kind, reader.last_hash, canonical.encode(body))
  except AqgovError:
    return
  good = lh.segment_path(ldir).read_bytes()
  only_typed_errors(_read_log, _with(ldir, "segment", good + segments.frame(record)))
