"""Entropy profiles: the admissible entropy of each parameter group over training, and what to do
when a measurement leaves its bounds.

A profile has two parts:

* `[[representation]]` entries map representation paths (globs over the paths `aqgov.entropy`
  gives an aux dict, NNX intermediates or Linen intermediates) to a parameter group, as
  `kind = "attention"` (probs [..., heads, queries, keys]; `heads` required, `causal` optional)
  or `kind = "features"` (activations [..., D]; measured by `renyi2` and `effective_rank`).
* `[[bound]]` entries give, for one group and metric, a `low` and/or `high` limit and the
  `action` when it is broken: `pause` (skip the step's update), `reroute` (scale the group's
  routed gradient by `fallback`, 0 = frozen, for `duration` steps starting with the violating
  one; the default duration 1 holds the fallback exactly while the measurement stays out of
  bounds), `route` (for the `duration` steps after the violating one, examples of the route
  `classes` (composed route class names or globs) reach only the groups `to`) or `escalate` (stop
  at the step boundary for a human). `heads = [..]` restricts an
  attention bound to some heads; `steps = [start, end]` restricts it to the half-open step window
  [start, end) (e.g. looser bounds during warm-up). Any violation can be admitted by a signed
  override token (`aqgov.entropy`).

Where several bounds on the same side (low or high) cover one (group, metric, head, step), the
most specific wins: a windowed bound over an unwindowed one, then a per-head bound over an
all-heads one; two equally specific overlapping bounds are a `ProfileError`.

`optimizer_state` says what a frozen or paused group's optimizer state does: `"hold"` (default;
the group gets no update at all) or `"advance"` (its state keeps stepping). Fields left at their
defaults (`optimizer_state`, and `classes`/`to` outside route bounds) are not in the canonical
form, so profiles that do not use them keep their ids.

A profile may name its `authority` (only that authority's key may sign it) and the
`override_authorities` whose signed tokens may admit its violations (default: its authority, else
whoever signed it).

Profiles are data: TOML (`EntropyProfile.from_toml(text)`, `EntropyProfile.read(path)`) or Python
(`EntropyProfile(...)`), a canonical dict whose hash is the profile id, and signed documents of
type `PROFILE` (kind `entropy-profile`), signed and verified with `aqgov.documents` exactly like
routing policies.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from aqgov.documents import _canonical as canonical
from aqgov.documents._document_type import DocumentType, register, signed_by_named_authority
from aqgov.documents._files import read_text
from aqgov.documents._toml import dumps_toml, loads_toml
from aqgov.entropy._metrics import METRICS, PER_HEAD_METRICS
from aqgov.errors import ProfileError
from aqgov.policy._paths import glob_match

FORMAT = "aqgov.entropy-profile/1"
KIND = "entropy-profile"
ACTIONS = ("pause", "reroute", "route", "escalate")
OPTIMIZER_STATES = ("hold", "advance")
REPRESENTATION_KINDS = ("attention", "features", "router")
_SOURCE_KIND = {
  "attention_entropy": "attention",
  "renyi2": "features",
  "effective_rank": "features",
  "expert_utilisation": "router",
}


def _number(value: Any, what: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ProfileError(f"{what} = {value!r} must be a finite number")
  return float(value)


MAX_STEP = 2**31 - 1  # step numbers, windows and durations are int32 inside the jitted step


def _integer(value: Any, what: str, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_STEP:
    raise ProfileError(
      f"{what} = {value!r:.40} must be an integer in [{minimum}, {MAX_STEP}] (they are int32)"
    )
  return int(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Representation:
  """Representations whose path matches `path` (a glob) measure `group`."""

  path: str
  group: str
  kind: str
  heads: int | None = None
  causal: bool = False

  def __post_init__(self):
    where = f"representation {self.path!r}"
    if not isinstance(self.path, str):
      raise ProfileError(f"{where}: path must be a glob string such as 'attention/blocks/*'")
    try:
      glob_match(self.path, "")
    except ValueError as exc:
      raise ProfileError(f"{where}: {exc}") from None
    if not isinstance(self.group, str) or not self.group:
      raise ProfileError(f"{where}: group must be a parameter group name of the routing policy")
    if self.kind not in REPRESENTATION_KINDS:
      raise ProfileError(f"{where}: kind = {self.kind!r}; use one of {list(REPRESENTATION_KINDS)}")
    if self.kind == "attention":
      object.__setattr__(self, "heads", _integer(self.heads, f"{where}: heads", 1))
      if not isinstance(self.causal, bool):
        raise ProfileError(f"{where}: causal must be true or false")
    elif self.heads is not None or self.causal:
      raise ProfileError(f"{where}: heads/causal only apply to kind = 'attention'; remove them")

  def to_dict(self) -> dict:
    return {
      "path": self.path,
      "group": self.group,
      "kind": self.kind,
      "heads": self.heads,
      "causal": self.causal,
    }


@dataclasses.dataclass(frozen=True, kw_only=True)
class Bound:
  """Limits on one metric of one group (optionally some heads, some steps) and the action."""

  group: str
  metric: str
  action: str
  low: float | None = None
  high: float | None = None
  heads: tuple[int, ...] | None = None
  steps: tuple[int, int] | None = None
  fallback: float | None = None
  duration: int | None = None
  classes: tuple[str, ...] | None = None
  to: tuple[str, ...] | None = None

  def describe(self) -> str:
    extra = f", heads {list(self.heads)}" if self.heads is not None else ""
    extra += f", steps [{self.steps[0]}, {self.steps[1]})" if self.steps is not None else ""
    return f"bound on {self.metric}/{self.group}{extra}"

  def __post_init__(self):
    where = f"bound on {self.metric!r}/{self.group!r}"
    if not isinstance(self.group, str) or not self.group:
      raise ProfileError(f"{where}: group must be a parameter group name of the routing policy")
    if self.metric not in METRICS:
      raise ProfileError(f"{where}: unknown metric; use one of {list(METRICS)}")
    if self.action not in ACTIONS:
      raise ProfileError(f"{where}: action = {self.action!r}; use one of {list(ACTIONS)}")
    low = None if self.low is None else _number(self.low, f"{where}: low")
    high = None if self.high is None else _number(self.high, f"{where}: high")
    if low is None and high is None:
      raise ProfileError(f"{where}: give `low`, `high` or both")
    if low is not None and high is not None and low > high:
      raise ProfileError(f"{where}: low {low} > high {high}; make low <= high")
    object.__setattr__(self, "low", low)
    object.__setattr__(self, "high", high)
    if self.heads is not None:
      if self.metric not in PER_HEAD_METRICS:
        raise ProfileError(f"{where}: `heads` only applies to {list(PER_HEAD_METRICS)}; remove it")
      if (
        isinstance(self.heads, (str, bytes))
        or not isinstance(self.heads, Sequence)
        or not self.heads
      ):
        raise ProfileError(f"{where}: heads must be a non-empty list of head indices")
      heads = tuple(sorted({_integer(h, f"{where}: head", 0) for h in self.heads}))
      object.__setattr__(self, "heads", heads)
    if self.steps is not None:
      if (
        isinstance(self.steps, (str, bytes))
        or not isinstance(self.steps, Sequence)
        or len(self.steps) != 2
      ):
        raise ProfileError(
          f"{where}: steps must be [start, end] (half-open window of step numbers)"
        )
      start = _integer(self.steps[0], f"{where}: steps start", 0)
      end = _integer(self.steps[1], f"{where}: steps end", 1)
      if end <= start:
        raise ProfileError(
          f"{where}: steps [{start}, {end}] is empty; end is exclusive and must exceed start"
        )
      object.__setattr__(self, "steps", (start, end))
    self._check_route(where)
    if self.action == "reroute":
      fallback = 0.0 if self.fallback is None else _number(self.fallback, f"{where}: fallback")
      if not 0.0 <= fallback <= 1.0:
        raise ProfileError(
          f"{where}: fallback {fallback} must be a weight in [0, 1] (0 freezes the group)"
        )
      duration = 1 if self.duration is None else _integer(self.duration, f"{where}: duration", 1)
      object.__setattr__(self, "fallback", fallback)
      object.__setattr__(self, "duration", duration)
    elif self.action == "route":
      duration = 1 if self.duration is None else _integer(self.duration, f"{where}: duration", 1)
      object.__setattr__(self, "duration", duration)
    elif self.fallback is not None or self.duration is not None:
      raise ProfileError(
        f"{where}: fallback/duration only apply to action = 'reroute' or 'route'; remove them"
      )

  def _check_route(self, where: str) -> None:
    """`classes` and `to` are given together, exactly for action = 'route'."""
    if self.action != "route":
      if self.classes is not None or self.to is not None:
        raise ProfileError(f"{where}: classes/to only apply to action = 'route'; remove them")
      return
    if self.fallback is not None:
      raise ProfileError(
        f"{where}: action = 'route' sends route classes to other groups (`classes`, `to`); "
        "`fallback` scales a group's gradient (action = 'reroute'); remove it"
      )
    for name in ("classes", "to"):
      value = getattr(self, name)
      if (
        isinstance(value, (str, bytes))
        or not isinstance(value, Sequence)
        or not all(isinstance(v, str) and v for v in value)
        or (name == "classes" and not value)
      ):
        example = '["acme:sensitive*"]' if name == "classes" else '["adapter"]'
        raise ProfileError(
          f"{where}: action = 'route' needs `{name}`, a list of "
          f"{'route class names or globs' if name == 'classes' else 'group names'}, "
          f"e.g. {name} = {example}"
        )
      object.__setattr__(self, name, tuple(sorted(set(value))))

  def to_dict(self) -> dict:
    return {
      "group": self.group,
      "metric": self.metric,
      "action": self.action,
      "low": self.low,
      "high": self.high,
      "heads": None if self.heads is None else list(self.heads),
      "steps": None if self.steps is None else list(self.steps),
      "fallback": self.fallback,
      "duration": self.duration,
      # only route bounds carry these, so other profiles keep their canonical form and id
      **({"classes": list(self.classes), "to": list(self.to)} if self.action == "route" else {}),
    }

  def covers(self, step: int, head: int | None) -> bool:
    """True iff this bound applies at `step` to `head` (None for metrics without heads)."""
    in_window = self.steps is None or self.steps[0] <= step < self.steps[1]
    return in_window and (self.heads is None or head in self.heads)

  @property
  def specificity(self) -> tuple[bool, bool]:
    return (self.steps is not None, self.heads is not None)


def _overlap(a: Bound, b: Bound) -> bool:
  if (
    a.steps is not None
    and b.steps is not None
    and (a.steps[1] <= b.steps[0] or b.steps[1] <= a.steps[0])
  ):
    return False
  if a.heads is not None and b.heads is not None and not set(a.heads) & set(b.heads):
    return False
  return True


def _sorted_unique(items: Iterable[Any], what: str) -> tuple:
  keyed = {}
  for item in items:
    k = canonical.encode(item.to_dict())
    if k in keyed:
      raise ProfileError(f"{what} {item.to_dict()} appears twice; remove the duplicate")
    keyed[k] = item
  return tuple(keyed[k] for k in sorted(keyed))


@dataclasses.dataclass(frozen=True)
class EntropyProfile:
  """A validated entropy profile. Build from Python, `from_toml`, `from_dict` or a signed document."""

  name: str
  representations: tuple[Representation, ...] = ()
  bounds: tuple[Bound, ...] = ()
  description: str = ""
  authority: str = ""
  override_authorities: tuple[str, ...] = ()
  optimizer_state: str = "hold"

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ProfileError("an entropy profile needs a non-empty name")
    if self.optimizer_state not in OPTIMIZER_STATES:
      raise ProfileError(
        f"profile {self.name!r}: optimizer_state = {self.optimizer_state!r:.40}; use 'hold' (a "
        "frozen or paused group's optimizer state is held, so it gets no update at all) or "
        "'advance' (its state keeps stepping, e.g. momentum decays)"
      )
    if not isinstance(self.description, str):
      raise ProfileError("profile description must be a string")
    if not isinstance(self.authority, str):
      raise ProfileError(
        f"profile {self.name!r}: authority must be the authority's name, got {self.authority!r}"
      )
    names = self.override_authorities
    if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
      raise ProfileError(
        f"profile {self.name!r}: override_authorities must be a list of authority names, "
        f'e.g. ["acme-data"]'
      )
    object.__setattr__(self, "override_authorities", tuple(sorted(set(names))))
    for r in self.representations:
      if not isinstance(r, Representation):
        raise ProfileError(
          f"representations must be aqgov.entropy.Representation entries, got {type(r).__name__}"
        )
    for b in self.bounds:
      if not isinstance(b, Bound):
        raise ProfileError(f"bounds must be aqgov.entropy.Bound entries, got {type(b).__name__}")
    object.__setattr__(
      self, "representations", _sorted_unique(self.representations, "representation")
    )
    object.__setattr__(self, "bounds", _sorted_unique(self.bounds, "bound"))
    heads: dict[str, int] = {}
    for r in self.representations:
      if r.kind == "attention":
        if heads.setdefault(r.group, r.heads) != r.heads:
          raise ProfileError(
            f"group {r.group!r} has attention representations with {heads[r.group]} and {r.heads} heads; "
            "per-head bounds need one head count per group (split them into separate groups)"
          )
    kinds = {(r.group, r.kind) for r in self.representations}
    for b in self.bounds:
      need = _SOURCE_KIND.get(b.metric)
      if need is not None and (b.group, need) not in kinds:
        raise ProfileError(
          f"{b.describe()}: no [[representation]] of kind {need!r} feeds group {b.group!r}; add one "
          "that names the representation to measure"
        )
      if b.heads is not None and max(b.heads) >= heads[b.group]:
        raise ProfileError(
          f"{b.describe()}: head {max(b.heads)} does not exist; group {b.group!r} has {heads[b.group]} heads"
        )
    for i, a in enumerate(self.bounds):
      for b in self.bounds[i + 1 :]:
        if (a.group, a.metric, a.specificity) != (b.group, b.metric, b.specificity) or not _overlap(
          a, b
        ):
          continue
        for side in ("low", "high"):
          if getattr(a, side) is not None and getattr(b, side) is not None:
            raise ProfileError(
              f"{a.describe()} and {b.describe()} both set `{side}` for the same steps and heads; "
              "narrow one with `steps`/`heads` or merge them"
            )

  # -- queries -----------------------------------------------------------------------------

  @property
  def groups(self) -> tuple[str, ...]:
    """Groups the profile names, sorted."""
    routed_to = {g for b in self.bounds if b.to for g in b.to}
    return tuple(
      sorted({r.group for r in self.representations} | {b.group for b in self.bounds} | routed_to)
    )

  def heads(self, group: str) -> int:
    """Number of attention heads declared for `group` (0 if it has no attention representation)."""
    return next(
      (r.heads for r in self.representations if r.kind == "attention" and r.group == group), 0
    )

  @property
  def num_heads(self) -> int:
    """Size of the head axis of event arrays: the most heads of any group, at least 1."""
    return max([1] + [r.heads for r in self.representations if r.kind == "attention"])

  def check_groups(self, group_names: Sequence[str]) -> None:
    """Raise `ProfileError` if the profile names a group the compiled policy does not have."""
    unknown = [g for g in self.groups if g not in group_names]
    if unknown:
      raise ProfileError(
        f"entropy profile {self.name!r} names group(s) {unknown} that the compiled policy does not have "
        f"(its groups: {list(group_names)}); rename them in the profile or add them to the policy"
      )

  # -- canonical form, id, TOML --------------------------------------------------------------

  def to_dict(self) -> dict:
    return {
      "format": FORMAT,
      "name": self.name,
      "description": self.description,
      **({"authority": self.authority} if self.authority else {}),
      **(
        {"override_authorities": list(self.override_authorities)}
        if self.override_authorities
        else {}
      ),
      # the default is left out, so profiles that do not set it keep their canonical form and id
      **({"optimizer_state": self.optimizer_state} if self.optimizer_state != "hold" else {}),
      "representations": [r.to_dict() for r in self.representations],
      "bounds": [b.to_dict() for b in self.bounds],
    }

  @property
  def id(self) -> str:
    """Hex SHA-256 of the canonical form."""
    return canonical.digest_hex(self.to_dict())

  @classmethod
  def from_dict(cls, doc: Mapping[str, Any], *, where: str = "entropy profile") -> EntropyProfile:
    """Parse the canonical dict (or the TOML document) form; `ProfileError` names what and where."""
    if not isinstance(doc, Mapping):
      raise ProfileError(f"{where}: expected a table/map, got {type(doc).__name__}")
    allowed = {
      "format",
      "name",
      "description",
      "authority",
      "override_authorities",
      "optimizer_state",
      "representations",
      "representation",
      "bounds",
      "bound",
    }
    _no_unknown(doc, allowed, where)
    if doc.get("format", FORMAT) != FORMAT:
      raise ProfileError(f"{where}: format {doc.get('format')!r} is not {FORMAT!r}")
    reps = _entries(doc, "representation", where)
    bounds = _entries(doc, "bound", where)
    rep_keys = {f.name for f in dataclasses.fields(Representation)}
    bound_keys = {f.name for f in dataclasses.fields(Bound)}
    parsed_reps, parsed_bounds = [], []
    for i, entry in enumerate(reps):
      at = f"{where}: [[representation]] #{i + 1}"
      _no_unknown(entry, rep_keys, at)
      parsed_reps.append(
        _build(Representation, {k: v for k, v in entry.items() if v is not None}, at)
      )
    for i, entry in enumerate(bounds):
      at = f"{where}: [[bound]] #{i + 1}"
      _no_unknown(entry, bound_keys, at)
      parsed_bounds.append(_build(Bound, {k: v for k, v in entry.items() if v is not None}, at))
    try:
      return cls(
        name=doc.get("name", ""),
        representations=tuple(parsed_reps),
        bounds=tuple(parsed_bounds),
        description=doc.get("description", ""),
        authority=doc.get("authority", ""),
        override_authorities=tuple(doc.get("override_authorities", ())),
        optimizer_state=doc.get("optimizer_state", "hold"),
      )
    except ProfileError as exc:
      raise ProfileError(f"{where}: {exc}") from None

  @classmethod
  def from_toml(cls, text: str, *, where: str = "profile TOML") -> EntropyProfile:
    """Parse TOML text (read a file with `EntropyProfile.read`)."""
    if not isinstance(text, str):
      raise ProfileError(
        f"EntropyProfile.from_toml takes TOML text, got {type(text).__name__}; read a file "
        "with EntropyProfile.read"
      )
    doc = loads_toml(text, ProfileError, where)
    return cls.from_dict(doc, where=where)

  @classmethod
  def read(cls, path: str | os.PathLike) -> EntropyProfile:
    """Parse the TOML file at `path`."""
    return cls.from_toml(read_text(path, ProfileError, "entropy profile"), where=str(path))

  def to_toml(self) -> str:
    """TOML text that `from_toml` reads back to an equal profile."""
    doc: dict[str, Any] = {"format": FORMAT, "name": self.name}
    if self.description:
      doc["description"] = self.description
    if self.authority:
      doc["authority"] = self.authority
    if self.override_authorities:
      doc["override_authorities"] = list(self.override_authorities)
    if self.optimizer_state != "hold":
      doc["optimizer_state"] = self.optimizer_state
    for table, entries in (("representation", self.representations), ("bound", self.bounds)):
      if entries:
        doc[table] = [
          {
            k: v
            for k, v in e.to_dict().items()
            if v is not None and not (k == "causal" and v is False)
          }
          for e in entries
        ]
    return dumps_toml(doc)


def _no_unknown(entry: Any, allowed: set[str], where: str) -> None:
  if not isinstance(entry, Mapping):
    raise ProfileError(f"{where}: expected a table, got {type(entry).__name__}")
  unknown = sorted(set(entry) - allowed)
  if unknown:
    raise ProfileError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _entries(doc: Mapping[str, Any], name: str, where: str) -> list:
  if name in doc and name + "s" in doc:
    raise ProfileError(f"{where}: give either [[{name}]] tables or a `{name}s` list, not both")
  entries = doc.get(name, doc.get(name + "s", []))
  if not isinstance(entries, list):
    raise ProfileError(f"{where}: `{name}` must be an array of tables ([[{name}]])")
  return entries


def _build(cls, fields: dict, where: str):
  try:
    return cls(**fields)
  except ProfileError as exc:
    raise ProfileError(f"{where}: {exc}") from None
  except TypeError as exc:
    raise ProfileError(f"{where}: {exc}") from None


# --- signed documents ------------------------------------------------------------------------


def _from_payload(payload: Mapping[str, Any]) -> EntropyProfile:
  return EntropyProfile.from_dict(
    payload, where=f"signed profile {canonical.digest_hex(payload)[:16]}..."
  )


PROFILE: DocumentType[EntropyProfile] = register(
  DocumentType(
    name="profile",
    kind=KIND,
    noun="entropy profile",
    to_payload=EntropyProfile.to_dict,
    from_payload=_from_payload,
    error=ProfileError,
    from_text=EntropyProfile.from_toml,
    on_verified=signed_by_named_authority("entropy profile", ProfileError),
  )
)
