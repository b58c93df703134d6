"""Routing policies: which example may shape which parameter group, and by how much.

A policy names parameter **groups** by glob patterns over parameter paths (`blocks/**`,
`head/*`), and lists ordered **rules** `when -> route`: the first rule whose condition holds for
an example gives its route, a map `group -> weight in [0, 1]` (groups not named get 0). An
example no rule matches takes the `default` route; an example admitted without a valid credential
takes the `uncredentialed` route. Both default to excluded everywhere (all weights 0). A parameter
that no group covers gets the policy's `uncovered` weight from every example (default 0.0: it is
never trained while this policy governs).

TOML form:

  name = "acme-routing"
  uncovered = 0.0                      # optional
  [groups]
  embed = ["embed/**"]
  core = ["blocks/**"]
  adapter = { patterns = ["adapter/**"], visible = "routed" }   # optional visibility
  heads = { pattern = "blocks/*/attn/wo", axis = 0, split = 8, per = "head" }  # heads[0]..heads[7]
  [[rules]]
  name = "unknown-license"             # optional; names the route class in reports
  when = "license_class == 'unknown'"
  route = {}
  [[rules]]
  when = "sensitivity_tier >= 2 or 'EU' in jurisdictions"
  route = { core = 0.5 }
  subspace = { core = { rank = 8, seed = 1234 } }   # optional: project onto a published basis
  [default]
  route = { embed = 1.0, core = 1.0 }
  [uncredentialed]                     # optional
  route = {}

Slices. A group table with `axis` and `split` (and `index`, or `per` for one group `name[k]` per
part) takes those parts of one axis of every leaf it matches; the rest of the leaf stays in its
first matching whole-leaf group (see `aqgov.policy._slices`). Subspaces: see
`aqgov.policy._subspaces`.

Visibility. A group declared `visible = "routed"` is seen only by the examples routed to it: for
every example whose weight in the group is 0, the group's parameters act as zero in that example's
forward pass (the default, `visible = "always"`, lets every example's forward pass use them).
Gradient routing alone confines what a group is *trained* by; visibility also keeps the rest of
the model from coming to depend on a group it may not train, so that zeroing the group at
deployment is exactly the model every unrouted example trained (docs/efficacy.md).

Python form: `Policy(name=..., groups={...}, rules=[Rule(when=..., route={...})], default={...})`
validates and normalises exactly like the TOML form (`Policy.from_toml(text)`, `Policy.read(path)`). Normal form: expressions in canonical text,
patterns of a group sorted, zero weights dropped, weights as floats. The policy id is the hex
SHA-256 of the canonical encoding of `to_dict()`. Group order and rule order are part of the
policy (a parameter belongs to its first matching group; the first matching rule wins).

Several authorities' policies compose (`compose`): the most restrictive wins, i.e. every
parameter's weight is the minimum over the policies (see `aqgov.policy`).

Signed policies are documents of type `POLICY` (kind "routing-policy"): sign, verify, read and
write them with `aqgov.documents.sign(POLICY, policy, key)` and friends.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from aqgov.documents import _canonical as canonical
from aqgov.documents._document_type import DocumentType, register, signed_by_named_authority
from aqgov.documents._files import read_text
from aqgov.documents._toml import InlineTable, dumps_toml, loads_toml
from aqgov.errors import PolicyError
from aqgov.policy import _expressions as expressions
from aqgov.policy import _paths as paths
from aqgov.policy._slices import SLICE_KEYS, Slice, parse_slice
from aqgov.policy._subspaces import Subspace, parse_subspaces

KIND = "routing-policy"
FORMAT = "aqgov-routing-policy/1"
UNCOVERED_GROUP = "(uncovered)"
_GROUP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*(\[[0-9]+\])?\Z", re.ASCII)
_RULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z", re.ASCII)
_POLICY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z", re.ASCII)
_TOP_KEYS = ("name", "authority", "groups", "rules", "default", "uncredentialed", "uncovered")
VISIBILITY = ("always", "routed")

Route = Mapping[str, float]


class Rule(NamedTuple):
  """`when` (expression text) -> `route` (group -> weight); `name` labels its route class;
  `subspace` (group -> `Subspace`) confines the class's gradient in those groups to a subspace."""

  when: str
  route: Route
  name: str = ""
  subspace: Mapping[str, Subspace] = {}


def _fail(policy: str, where: str, message: str) -> PolicyError:
  return PolicyError(f"policy {policy!r}, {where}: {message}")


def _weight(policy: str, where: str, group: str, value: Any) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise _fail(policy, where, f"weight of group {group!r} is {value!r}; write a number in [0, 1]")
  w = float(value)
  if not math.isfinite(w) or not 0.0 <= w <= 1.0:
    raise _fail(
      policy,
      where,
      f"weight of group {group!r} is {value!r}; weights lie in [0, 1] "
      "(0 = never reaches the group, 1 = full gradient)",
    )
  return w


def _route(
  policy: str, where: str, route: Any, groups: Sequence[str], aliases: Mapping[str, Any]
) -> dict[str, float]:
  """A route in normal form; a name in `aliases` (a `per` declaration's name) sets each part
  (a part named in the route itself keeps its own weight)."""
  if route is None:
    return {}
  if not isinstance(route, Mapping):
    raise _fail(policy, where, f"a route is a table group -> weight, got {type(route).__name__}")
  out = {}
  for g, value in route.items():
    if g not in groups and g not in aliases:
      raise _fail(
        policy,
        where,
        f"route names group {g!r}, which is not declared; declared groups: "
        f"{', '.join(groups) or '(none)'} (declare it under [groups] or fix the name)",
      )
    w = _weight(policy, where, g, value)
    for member in aliases.get(g, (g,)):
      if member == g or member not in route:
        out[member] = w
  return dict(sorted((g, w) for g, w in out.items() if w != 0.0))


def _group_spec(policy: str, name: str, spec: Any) -> tuple[Any, str, bool, Any]:
  """(patterns, visibility, optional, slice keys or None) of one group declared as a pattern
  list or a table."""
  if not isinstance(spec, Mapping):
    return spec, "always", False, None
  unknown = set(spec) - {"patterns", "pattern", "visible", "optional", *SLICE_KEYS}
  if unknown:
    raise _fail(
      policy,
      f"groups.{name}",
      f"unknown key(s) {sorted(unknown)}; a group table has 'patterns' (or 'pattern'), optional "
      "'visible' and 'optional', and for a slice of its leaves 'axis', 'split', 'index' or 'per'",
    )
  if "pattern" in spec and "patterns" in spec:
    raise _fail(policy, f"groups.{name}", "give 'pattern' or 'patterns', not both")
  optional = spec.get("optional", False)
  if not isinstance(optional, bool):
    raise _fail(policy, f"groups.{name}", f"optional = {optional!r} must be true or false")
  visible = spec.get("visible", "always")
  if visible not in VISIBILITY:
    raise _fail(
      policy,
      f"groups.{name}",
      f"visible = {visible!r} is not one of {list(VISIBILITY)} "
      "('routed': the group acts as zero for examples not routed to it)",
    )
  sliced = {k: spec[k] for k in SLICE_KEYS if k in spec} or None
  if sliced is not None and visible == "routed":
    raise _fail(
      policy,
      f"groups.{name}",
      'visible = "routed" applies to whole-leaf groups; a slice group is always visible',
    )
  return spec.get("patterns", spec.get("pattern")), visible, optional, sliced


class _Groups(NamedTuple):
  groups: tuple[tuple[str, tuple[str, ...]], ...]  # ordered (name, patterns)
  routed: tuple[str, ...]  # declared visible = "routed"
  optional: tuple[str, ...]  # allowed to match no parameter
  slices: tuple[tuple[str, Slice], ...]  # the slice groups and their slices
  aliases: dict[str, tuple[str, ...]]  # a `per` declaration's name -> its parts


def _groups(policy: str, groups: Any) -> _Groups:
  """Normal form of the groups, a `per` declaration expanded into one group per part."""
  items = list(groups.items()) if isinstance(groups, Mapping) else list(groups or ())
  if not items:
    raise _fail(policy, "groups", 'declare at least one group, e.g. [groups] core = ["blocks/**"]')
  out, seen, routed, optional, slices, aliases = [], set(), [], [], [], {}
  for item in items:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
      raise _fail(policy, "groups", f"expected (name, patterns) pairs or a table, got {item!r}")
    name, pats = item
    if not isinstance(name, str) or not _GROUP_NAME.match(name):
      raise _fail(
        policy,
        "groups",
        f"group name {name!r} must use letters, digits, '_' or '-' and start with a letter or '_'",
      )
    pats, visible, may_be_empty, sliced = _group_spec(policy, name, pats)
    if isinstance(pats, str):
      pats = [pats]
    if not isinstance(pats, (list, tuple)) or not pats or not all(isinstance(p, str) for p in pats):
      raise _fail(
        policy, f"groups.{name}", 'expected a non-empty list of glob patterns like "blocks/**"'
      )
    for p in pats:
      try:
        paths.glob_match(p, "")
      except ValueError as exc:
        raise _fail(
          policy, f"groups.{name}", f"{exc} ('*' matches within a segment, '**' whole segments)"
        ) from None
    try:
      parts = [(name, None)] if sliced is None else parse_slice(name, sliced)
    except ValueError as exc:
      raise _fail(policy, f"groups.{name}", str(exc)) from None
    if parts[0][0] != name:
      aliases[name] = tuple(n for n, _ in parts)
    for part, sl in parts:
      if part in seen or part in aliases and part != name:
        raise _fail(
          policy, "groups", f"group {part!r} is declared twice; merge its patterns into one list"
        )
      seen.add(part)
      routed += [part] if visible == "routed" else []
      optional += [part] if may_be_empty else []
      slices += [(part, sl)] if sl is not None else []
      out.append((part, tuple(sorted(set(pats)))))
  if set(aliases) & seen:
    raise _fail(policy, "groups", f"group name(s) {sorted(set(aliases) & seen)} declared twice")
  return _Groups(tuple(out), tuple(routed), tuple(optional), tuple(slices), aliases)


def _rule(
  policy: str, i: int, rule: Any, groups: Sequence[str], aliases: Mapping[str, Any]
) -> Rule:
  where = f"rules[{i}]"
  if isinstance(rule, Mapping):
    unknown = set(rule) - {"when", "route", "name", "subspace"}
    if unknown:
      raise _fail(
        policy,
        where,
        f"unknown key(s) {sorted(unknown)}; a rule has 'when', 'route' and optional 'name' "
        "and 'subspace'",
      )
    if "when" not in rule:
      raise _fail(policy, where, "missing 'when = \"<condition>\"'")
    rule = Rule(rule["when"], rule.get("route", {}), rule.get("name", ""), rule.get("subspace"))
  elif not isinstance(rule, Rule):
    raise _fail(
      policy, where, f"expected a Rule(when=..., route=...) or a table, got {type(rule).__name__}"
    )
  if not isinstance(rule.name, str) or (rule.name and not _RULE_NAME.match(rule.name)):
    raise _fail(policy, where, f"rule name {rule.name!r} must use letters, digits, '_' or '-'")
  if rule.name in ("default", "uncredentialed"):
    raise _fail(
      policy,
      where,
      f"rule name {rule.name!r} is reserved for the {rule.name} route; choose another",
    )
  if not isinstance(rule.when, str):
    raise _fail(
      policy, where, f"'when' must be a string expression, got {type(rule.when).__name__}"
    )
  try:
    when = expressions.canonical_text(rule.when)
  except PolicyError as exc:
    raise _fail(policy, where, str(exc)) from None
  route = _route(policy, f"{where}.route", rule.route, groups, aliases)
  try:
    subspace = parse_subspaces(rule.subspace, route)
  except ValueError as exc:
    raise _fail(policy, f"{where}.subspace", str(exc)) from None
  return Rule(when, route, rule.name, subspace)


@dataclasses.dataclass(frozen=True)
class Policy:
  """A validated routing policy in normal form (see the module docstring).

  Fields: `name`; `groups` as ordered `(group, patterns)` pairs (a mapping is accepted, and a
  group may be given as `{"patterns": [...], "visible": "routed"}`); `rules` (tuple of `Rule`);
  `default` and `uncredentialed` routes; `uncovered` weight; `routed_visibility`, the groups
  declared `visible = "routed"` (in declaration order; merged with those the group tables declare);
  `optional_groups`, those declared `optional = true`: allowed to match no parameter (any other
  group that matches nothing is an error when the policy is compiled); `authority`, the authority
  whose key alone may sign it ("" when it names none).
  `dataclasses.replace(policy, ...)` validates the changed policy again.
  """

  name: str
  groups: Any
  rules: Iterable[Any] = ()
  default: Any = None
  uncredentialed: Any = None
  uncovered: Any = 0.0
  routed_visibility: Iterable[str] = ()
  optional_groups: Iterable[str] = ()
  authority: str = ""
  slices: Any = ()  # derived from the group tables: (group, Slice) of each slice group

  def __post_init__(self):
    name = self.name
    if not isinstance(name, str) or not _POLICY_NAME.match(name):
      raise PolicyError(f"policy name {name!r} must use letters, digits, '_', '-' or '.'")
    if not isinstance(self.authority, str) or (
      self.authority and not _POLICY_NAME.match(self.authority)
    ):
      raise PolicyError(
        f'policy {name!r}: authority {self.authority!r} must be an authority\'s name, e.g. "acme-data"'
      )
    norm = _groups(name, self.groups)
    norm_groups, routed, optional, aliases = norm.groups, norm.routed, norm.optional, norm.aliases
    names = [g for g, _ in norm_groups]
    declared = set(routed) | set(self.routed_visibility)
    if declared - set(names):
      raise _fail(
        name,
        "groups",
        f"routed_visibility names undeclared group(s) {sorted(declared - set(names))}",
      )
    rules = self.rules
    if isinstance(rules, (str, bytes, Mapping)) or not isinstance(rules, Iterable):
      raise _fail(name, "rules", "expected a list of rules")
    norm_rules = tuple(_rule(name, i, r, names, aliases) for i, r in enumerate(rules))
    labels = [r.name for r in norm_rules if r.name]
    if len(set(labels)) != len(labels):
      raise _fail(name, "rules", f"rule names must be unique, got {labels}")
    object.__setattr__(self, "groups", norm_groups)
    object.__setattr__(self, "rules", norm_rules)
    object.__setattr__(self, "slices", norm.slices)
    object.__setattr__(self, "default", _route(name, "default.route", self.default, names, aliases))
    object.__setattr__(
      self,
      "uncredentialed",
      _route(name, "uncredentialed.route", self.uncredentialed, names, aliases),
    )
    object.__setattr__(self, "uncovered", _weight(name, "uncovered", "(uncovered)", self.uncovered))
    object.__setattr__(self, "routed_visibility", tuple(g for g in names if g in declared))
    optional = set(optional) | set(self.optional_groups)
    if optional - set(names):
      raise _fail(
        name, "groups", f"optional_groups names undeclared group(s) {sorted(optional - set(names))}"
      )
    object.__setattr__(self, "optional_groups", tuple(g for g in names if g in optional))

  def _group_options(self, group: str) -> dict[str, Any]:
    """A group's non-default options as its table form writes them (absent when default, so ids
    of policies without them do not change)."""
    sl = self.slice_of(group)
    return {
      **({"visible": "routed"} if group in self.routed_visibility else {}),
      **({"optional": True} if group in self.optional_groups else {}),
      **(sl.to_dict() if sl is not None else {}),
    }

  def slice_of(self, group: str) -> Slice | None:
    """The slice a slice group takes of each leaf it matches; None for a whole-leaf group."""
    return dict(self.slices).get(group)

  @classmethod
  def create(
    cls,
    name: str,
    groups: Any,
    rules: Iterable[Any] = (),
    default: Any = None,
    uncredentialed: Any = None,
    uncovered: float = 0.0,
    routed_visibility: Iterable[str] = (),
    optional_groups: Iterable[str] = (),
    authority: str = "",
  ) -> Policy:
    """Same as `Policy(...)`."""
    return cls(
      name,
      groups,
      rules,
      default,
      uncredentialed,
      uncovered,
      routed_visibility,
      optional_groups,
      authority,
    )

  # -- views -----------------------------------------------------------------------------------

  @property
  def group_names(self) -> tuple[str, ...]:
    return tuple(g for g, _ in self.groups)

  def patterns(self, group: str) -> tuple[str, ...]:
    for g, pats in self.groups:
      if g == group:
        return pats
    raise PolicyError(
      f"policy {self.name!r} has no group {group!r}; groups: {', '.join(self.group_names)}"
    )

  def group_of_path(self, path: str) -> str | None:
    """The first group whose patterns match `path`, or None if no group covers it."""
    for g, pats in self.groups:
      if any(paths.glob_match(p, path) for p in pats):
        return g
    return None

  @property
  def class_names(self) -> tuple[str, ...]:
    """Route classes in index order: one per rule, then `default`, then `uncredentialed`."""
    return tuple(r.name or f"rule{i + 1}" for i, r in enumerate(self.rules)) + (
      "default",
      "uncredentialed",
    )

  def routes(self) -> tuple[Route, ...]:
    """Routes in route-class order."""
    return tuple(r.route for r in self.rules) + (self.default, self.uncredentialed)

  # -- forms -----------------------------------------------------------------------------------

  def to_dict(self) -> dict:
    """Canonical dict form (what is hashed and signed)."""
    return {
      "format": FORMAT,
      "name": self.name,
      **({"authority": self.authority} if self.authority else {}),
      "groups": [
        {"name": g, "patterns": list(p), **self._group_options(g)} for g, p in self.groups
      ],
      "rules": [
        {
          "name": r.name,
          "when": r.when,
          "route": dict(r.route),
          **({"subspace": {g: s.to_dict() for g, s in r.subspace.items()}} if r.subspace else {}),
        }
        for r in self.rules
      ],
      "default": dict(self.default),
      "uncredentialed": dict(self.uncredentialed),
      "uncovered": float(self.uncovered),
    }

  @classmethod
  def from_dict(cls, doc: Mapping[str, Any]) -> Policy:
    """Inverse of `to_dict`."""
    if not isinstance(doc, Mapping) or doc.get("format") != FORMAT:
      raise PolicyError(
        f"not a canonical routing policy (expected format {FORMAT!r}); "
        "write policies as TOML and sign them with `aqgov policy sign`"
      )
    try:
      groups = [(g["name"], {k: v for k, v in g.items() if k != "name"}) for g in doc["groups"]]
      return cls(
        doc["name"],
        groups,
        doc["rules"],
        doc["default"],
        doc["uncredentialed"],
        doc["uncovered"],
        authority=doc.get("authority", ""),
      )
    except (KeyError, TypeError) as exc:
      raise PolicyError(
        f"canonical routing policy lacks or mangles {exc}; re-create it from its TOML"
      ) from None

  @classmethod
  def from_toml(cls, text: str) -> Policy:
    """Parse and validate the TOML form from `text` (read a file with `Policy.read`)."""
    if not isinstance(text, str):
      raise PolicyError(
        f"Policy.from_toml takes TOML text, got {type(text).__name__}; read a file with Policy.read"
      )
    doc = loads_toml(text, PolicyError, "policy")
    name = doc.get("name")
    unknown = sorted(set(doc) - set(_TOP_KEYS))
    if unknown:
      raise PolicyError(
        f"policy {name!r} has unknown top-level key(s) {unknown}; allowed: {', '.join(_TOP_KEYS)}"
      )
    if "name" not in doc:
      raise PolicyError('policy needs a top-level name = "..."')
    routes = {}
    for section in ("default", "uncredentialed"):
      table = doc.get(section, {})
      if not isinstance(table, Mapping) or set(table) - {"route"}:
        raise _fail(str(name), section, f"expected a [{section}] table with only 'route = {{...}}'")
      routes[section] = table.get("route", {})
    rules = doc.get("rules", [])
    if not isinstance(rules, list):
      raise _fail(str(name), "rules", "write rules as [[rules]] tables")
    return cls(
      name,
      doc.get("groups", {}),
      rules,
      routes["default"],
      routes["uncredentialed"],
      doc.get("uncovered", 0.0),
      authority=doc.get("authority", ""),
    )

  @classmethod
  def read(cls, path: str | os.PathLike) -> Policy:
    """Parse and validate the TOML file at `path`."""
    return cls.from_toml(read_text(path, PolicyError, "policy"))

  def to_toml(self) -> str:
    """TOML text that `from_toml` reads back to an equal policy."""
    rules = [
      {
        **({"name": r.name} if r.name else {}),
        "when": r.when,
        "route": InlineTable(r.route),
        **(
          {"subspace": InlineTable({g: InlineTable(s.to_dict()) for g, s in r.subspace.items()})}
          if r.subspace
          else {}
        ),
      }
      for r in self.rules
    ]
    return dumps_toml(
      {
        "name": self.name,
        **({"authority": self.authority} if self.authority else {}),
        "uncovered": self.uncovered,
        "groups": {
          g: InlineTable({"patterns": list(p), **self._group_options(g)})
          if self._group_options(g)
          else list(p)
          for g, p in self.groups
        },
        "rules": rules,
        "default": {"route": InlineTable(self.default)},
        "uncredentialed": {"route": InlineTable(self.uncredentialed)},
      }
    )

  @property
  def id(self) -> str:
    """Hex SHA-256 of the canonical form."""
    return canonical.digest_hex(self.to_dict())


# ---------------------------------------------------------------------------------------------
# Composition


class PolicySet(NamedTuple):
  """Policies that govern together; each parameter's weight is the minimum over them."""

  policies: tuple[Policy, ...]

  @property
  def id(self) -> str:
    """Order-independent id of the composition (the minimum is commutative)."""
    return canonical.digest_hex({"compose": sorted(p.id for p in self.policies)})

  @property
  def policy_ids(self) -> tuple[str, ...]:
    return tuple(p.id for p in self.policies)

  @property
  def group_names(self) -> tuple[str, ...]:
    """Ordered union of the policies' group names."""
    out: list[str] = []
    for p in self.policies:
      out += [g for g in p.group_names if g not in out]
    return tuple(out)

  def patterns(self, group: str) -> tuple[str, ...]:
    for p in self.policies:
      if group in p.group_names:
        return p.patterns(group)
    raise PolicyError(
      f"no composed policy declares group {group!r}; groups: {', '.join(self.group_names)}"
    )

  def slice_of(self, group: str) -> Slice | None:
    """The slice of a slice group (the same in every policy declaring it), else None."""
    for p in self.policies:
      if group in p.group_names:
        return p.slice_of(group)
    return None


def compose(policies: Policy | PolicySet | Iterable[Policy]) -> PolicySet:
  """Policies composed so the most restrictive wins (leaf weight = minimum over policies).

  A group name may appear in several policies only with the same patterns; the same policy
  given twice counts once; two different policies may not share a name.
  """
  if isinstance(policies, PolicySet):
    items = list(policies.policies)
  elif isinstance(policies, Policy):
    items = [policies]
  else:
    items = list(policies)
  unique: list[Policy] = []
  for p in items:
    if not isinstance(p, Policy):
      raise PolicyError(
        f"compose expects Policy objects, got {type(p).__name__}; verify signed policies first "
        "with aqgov.documents.verify(POLICY, signed, trust)"
      )
    if p.id not in {q.id for q in unique}:
      unique.append(p)
  if not unique:
    raise PolicyError("compose needs at least one policy")
  names = [p.name for p in unique]
  for n in set(names):
    if names.count(n) > 1:
      raise PolicyError(
        f"two different policies are both named {n!r}; rename one so route classes stay unambiguous"
      )
  declared: dict[str, tuple[str, tuple[str, ...], Any]] = {}
  for p in unique:
    for g, pats in p.groups:
      if g in declared and declared[g][1:] != (pats, p.slice_of(g)):
        other, other_pats, other_slice = declared[g]
        what = lambda pats, sl: str(list(pats)) + ("" if sl is None else f" sliced {sl.to_dict()}")  # noqa: E731
        raise PolicyError(
          f"group {g!r} means {what(other_pats, other_slice)} in policy {other!r} but "
          f"{what(pats, p.slice_of(g))} in policy {p.name!r}; "
          f"rename one of them (e.g. '{p.name}-{g}') or give both the same patterns"
        )
      declared.setdefault(g, (p.name, pats, p.slice_of(g)))
  return PolicySet(tuple(unique))


# ---------------------------------------------------------------------------------------------
# Signed documents


POLICY: DocumentType[Policy] = register(
  DocumentType(
    name="policy",
    kind=KIND,
    noun="routing policy",
    to_payload=Policy.to_dict,
    from_payload=Policy.from_dict,
    error=PolicyError,
    from_text=Policy.from_toml,
    on_verified=signed_by_named_authority("routing policy", PolicyError),
  )
)
