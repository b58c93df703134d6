"""CompiledPolicy: tables, traced weights vs a Python reference, jit/vmap/sharding, pytree kinds."""

from __future__ import annotations

import dataclasses
import warnings
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from aqgov.credentials._taxonomy import LabelSpace
from aqgov.errors import PolicyError
from aqgov.policy._compile import (
  CompiledPolicy,
  UncoveredParametersWarning,
  compile_policy,
)
from aqgov.policy._explain import explain, explain_table, param_shapes
from aqgov.policy._expressions import to_text
from aqgov.policy._paths import glob_match, tree_paths
from aqgov.policy._policy import UNCOVERED_GROUP, Policy, Rule

from policy_reference import (
  ACME,
  POLICY_TOML,
  SPACE,
  batches,
  expressions,
  leaf_weight,
  routes,
  weights,
)

pytestmark = pytest.mark.filterwarnings("ignore::aqgov.policy.UncoveredParametersWarning")

PARAMS = {
  "embed": {"tokens": np.zeros((8, 4), np.float32)},
  "blocks": {
    str(i): {
      "attn": {"qkv": np.zeros((4, 12), np.float32)},
      "mlp": {"up": np.zeros((4, 16), np.float32)},
    }
    for i in range(2)
  },
  "adapter": {"down": np.zeros((4, 2), np.float32)},
  "head": {"kernel": np.zeros((4, 8), np.float32), "bias": np.zeros((8,), np.float32)},
  "final_norm": {"scale": np.zeros((4,), np.float32)},
}
PATTERNS = (
  "embed/**",
  "blocks/**",
  "blocks/0/**",
  "blocks/*/attn/*",
  "blocks/*/mlp/**",
  "adapter/**",
  "head/*",
  "head/kernel",
  "final_norm/scale",
  "**",
  "nothing/**",
)
POLICY = Policy.from_toml(POLICY_TOML)


@st.composite
def random_policies(draw, prefix: str):
  n = draw(st.integers(1, 4))
  groups = {
    f"{prefix}{i}": draw(st.lists(st.sampled_from(PATTERNS), min_size=1, max_size=2))
    for i in range(n)
  }
  names = tuple(groups)
  rules = [
    Rule(to_text(draw(expressions)), draw(routes(names))) for _ in range(draw(st.integers(0, 3)))
  ]
  # groups may match nothing ("nothing/**"): declared optional, as such a policy must
  return Policy(
    prefix,
    groups,
    rules,
    draw(routes(names)),
    draw(routes(names)),
    draw(weights),
    optional_groups=names,
  )


policy_lists = st.lists(st.sampled_from("ab"), min_size=1, max_size=2, unique=True).flatmap(
  lambda prefixes: st.tuples(*[random_policies(p) for p in prefixes])
)


def reference_leaf_weights(policies, examples):
  return {path: [leaf_weight(policies, path, ex) for ex in examples] for path in tree_paths(PARAMS)}


def leaf_weights_by_path(compiled, labels):
  tree = compiled.leaf_weights(labels)
  return dict(
    zip(tree_paths(tree), (np.asarray(x).tolist() for x in jax.tree_util.tree_leaves(tree)))
  )


# -- agreement with the reference ---------------------------------------------------------------


@given(policy_lists, batches)
def test_leaf_weights_equal_the_python_reference(policies, examples):
  compiled = compile_policy(policies, PARAMS, SPACE)
  assert leaf_weights_by_path(compiled, SPACE.encode(examples)) == reference_leaf_weights(
    policies, examples
  )


@given(policy_lists, batches)
def test_group_weights_are_the_table_rows_of_the_route_classes(policies, examples):
  compiled = compile_policy(policies, PARAMS, SPACE)
  labels = SPACE.encode(examples)
  cls = np.asarray(compiled.route_class(labels))
  assert cls.dtype == np.int32 and cls.shape == (len(examples),)
  assert np.array_equal(np.asarray(compiled.group_weights(labels)), compiled.table[cls])
  assert np.array_equal(
    np.stack(jax.tree_util.tree_leaves(compiled.leaf_weights(labels)), 1), compiled.leaf_table[cls]
  )


@given(random_policies("a"))
def test_with_one_policy_every_leaf_has_its_group_weight(policy):
  compiled = compile_policy(policy, PARAMS, SPACE)
  assert np.array_equal(compiled.leaf_table, compiled.table[:, list(compiled.leaf_group)])


@given(policy_lists)
def test_a_leaf_belongs_to_the_first_group_of_the_union_that_matches_it(policies):
  compiled = compile_policy(policies, PARAMS, SPACE)
  union = [(name, p) for p in policies for name in p.group_names]
  for path, g in zip(compiled.leaf_paths, compiled.leaf_group):
    expected = next(
      (name for name, p in union if any(glob_match(q, path) for q in p.patterns(name))),
      UNCOVERED_GROUP,
    )
    assert compiled.group_names[g] == expected


def test_table_shapes_follow_the_contract():
  compiled = compile_policy(POLICY, PARAMS, SPACE)
  assert isinstance(compiled, CompiledPolicy)
  assert (
    compiled.table.shape == (compiled.num_classes, compiled.num_groups)
    and compiled.table.dtype == np.float32
  )
  assert compiled.leaf_table.shape == (compiled.num_classes, len(compiled.leaf_paths))
  assert compiled.leaf_paths == tuple(tree_paths(PARAMS))
  assert compiled.policy_ids == (POLICY.id,)
  assert compiled.leaf_shapes[compiled.leaf_paths.index("embed/tokens")] == (8, 4)


def test_composed_classes_enumerate_each_policys_class_with_uncredentialed_last():
  other = Policy(
    "eu", {"core": ["blocks/**"]}, [Rule("personal_data == 'yes'", {})], default={"core": 1.0}
  )
  compiled = compile_policy([POLICY, other], PARAMS, SPACE)
  assert compiled.class_names == (
    "acme-routing:rule1|eu:rule1",
    "acme-routing:rule1|eu:default",
    "acme-routing:rule2|eu:rule1",
    "acme-routing:rule2|eu:default",
    "acme-routing:default|eu:rule1",
    "acme-routing:default|eu:default",
    "acme-routing:uncredentialed|eu:uncredentialed",
  )


# -- uncovered parameters ---------------------------------------------------------------------------


def test_uncovered_leaves_form_the_last_group_and_get_the_uncovered_weight():
  for uncovered in (0.0, 0.5):
    compiled = compile_policy(dataclasses.replace(POLICY, uncovered=uncovered), PARAMS, SPACE)
    assert compiled.group_names[-1] == UNCOVERED_GROUP
    assert compiled.uncovered_leaves() == ("final_norm/scale",)
    col = compiled.leaf_paths.index("final_norm/scale")
    assert set(compiled.leaf_table[:, col].tolist()) == {uncovered}


def test_compiling_warns_about_uncovered_parameters():
  with pytest.warns(UncoveredParametersWarning, match="final_norm/scale"):
    compile_policy(POLICY, PARAMS, SPACE)


def test_a_fully_covered_tree_has_no_uncovered_group():
  params = {k: v for k, v in PARAMS.items() if k != "final_norm"}
  with warnings.catch_warnings():
    warnings.simplefilter("error", UncoveredParametersWarning)
    compiled = compile_policy(POLICY, params, SPACE)
  assert UNCOVERED_GROUP not in compiled.group_names and compiled.uncovered_leaves() == ()


def test_groups_without_parameters_and_uneven_groups_are_reported():
  other = Policy(
    "eu",
    {"first": ["blocks/0/**"], "ghost": {"patterns": ["nothing/**"], "optional": True}},
    default={"first": 1.0},
  )
  compiled = compile_policy([POLICY, other], PARAMS, SPACE)
  text = " ".join(compiled.warnings)
  assert "group 'ghost' (nothing/**) covers no parameter" in text
  assert "leaves of group 'core' get different weights" in text


def test_a_group_matching_no_parameter_is_an_error_unless_declared_optional():
  other = Policy("eu", {"first": ["blocks/0/**"], "ghost": ["nothing/**"]}, default={"first": 1.0})
  with pytest.raises(PolicyError, match="group 'ghost' .* matches no parameter .* optional = true"):
    compile_policy([POLICY, other], PARAMS, SPACE)
  optional = Policy.from_toml(
    'name = "eu"\n[groups]\nfirst = ["blocks/0/**"]\n'
    'ghost = { patterns = ["nothing/**"], optional = true }\n'
    "[default]\nroute = { first = 1.0 }\n"
  )
  assert optional.optional_groups == ("ghost",) and Policy.from_toml(optional.to_toml()) == optional
  assert Policy.from_dict(optional.to_dict()) == optional
  compile_policy([POLICY, optional], PARAMS, SPACE)


# -- tracing: jit, vmap, sharding ----------------------------------------------------------------------


@settings(max_examples=10)
@given(policy_lists, batches)
def test_weights_are_the_same_under_jit_and_vmap(policies, examples):
  compiled = compile_policy(policies, PARAMS, SPACE)
  labels = SPACE.encode(examples)
  eager = leaf_weights_by_path(compiled, labels)
  for fn in (jax.jit(compiled.leaf_weights), jax.vmap(compiled.leaf_weights)):
    tree = fn(labels)
    assert (
      dict(zip(tree_paths(tree), (np.asarray(x).tolist() for x in jax.tree_util.tree_leaves(tree))))
      == eager
    )
  assert np.array_equal(jax.jit(compiled.group_weights)(labels), compiled.group_weights(labels))


def test_weights_of_a_batch_sharded_over_eight_devices_match_one_device():
  examples = [
    None
    if i % 7 == 0
    else {
      "acme-data": {
        "license_class": ACME.field("license_class").values[i % 4],
        "sensitivity_tier": i % 4,
        "jurisdictions": [],
        "source": "wiki",
      }
    }
    for i in range(16)
  ]
  labels = SPACE.encode(examples)
  compiled = compile_policy(POLICY, PARAMS, SPACE)
  mesh = jax.make_mesh((8,), ("data",))
  sharded = jax.device_put(labels, NamedSharding(mesh, P("data")))
  got = jax.jit(compiled.leaf_weights)(sharded)
  for a, b in zip(
    jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(compiled.leaf_weights(labels))
  ):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  assert len(jax.tree_util.tree_leaves(got)[0].sharding.device_set) == 8


def test_labels_of_a_single_taxonomy_are_accepted():
  labels = ACME.encode(
    [
      {"license_class": "unknown", "sensitivity_tier": 0, "jurisdictions": [], "source": "x"},
      {"license_class": "cc-by", "sensitivity_tier": 0, "jurisdictions": [], "source": "x"},
    ]
  )
  compiled = compile_policy(POLICY, PARAMS, ACME)
  assert compiled.route_class(labels).tolist() == [0, 2]


def test_compiling_without_taxonomies_builds_tables_but_refuses_to_classify():
  compiled = compile_policy(POLICY, PARAMS, None)
  assert compiled.table.shape == (4, 5)
  with pytest.raises(PolicyError, match="without taxonomies"):
    compiled.route_class(SPACE.encode([None]))


def test_an_ill_typed_rule_fails_at_compile_time():
  bad = Policy("p", {"core": ["blocks/**"]}, [Rule("license_class == 'mystery'", {})])
  with pytest.raises(PolicyError, match="'mystery' is not a value"):
    compile_policy(bad, PARAMS, SPACE)


def test_an_empty_parameter_tree_is_refused():
  with pytest.raises(PolicyError, match="no array leaves"):
    compile_policy(POLICY, {}, SPACE)


# -- parameter pytree kinds ----------------------------------------------------------------------------


class Tiny(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(10, 4, rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(2)])
    self.head = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    return self.head(x)


NNX_POLICY = Policy(
  "nnx",
  {"embed": ["embed/*"], "core": ["blocks/*/kernel"], "head": ["head/*"]},
  [Rule("sensitivity_tier >= 2", {"head": 1.0})],
  {"embed": 1.0, "core": 1.0, "head": 0.5},
)


def test_nnx_state_patterns_match_with_or_without_the_value_attribute():
  state = nnx.state(Tiny(nnx.Rngs(0)), nnx.Param)
  compiled = compile_policy(NNX_POLICY, state, SPACE)
  groups = dict(zip(compiled.leaf_paths, (compiled.group_names[g] for g in compiled.leaf_group)))
  assert groups["head/kernel/value"] == "head" and groups["embed/embedding/value"] == "embed"
  assert (
    groups["blocks/0/kernel/value"] == "core" and groups["blocks/0/bias/value"] == UNCOVERED_GROUP
  )


def test_nnx_leaf_weights_have_the_structure_of_nnx_gradients():
  model = Tiny(nnx.Rngs(0))
  compiled = compile_policy(NNX_POLICY, nnx.state(model, nnx.Param), SPACE)
  labels = SPACE.encode(
    [
      {
        "acme-data": {
          "license_class": "cc-by",
          "sensitivity_tier": 3,
          "jurisdictions": [],
          "source": "x",
        }
      }
    ]
  )
  grads = nnx.grad(lambda m: m(jnp.array([1, 2])).sum())(model)
  routed = jax.tree.map(lambda g, w: g * w[0], grads, compiled.leaf_weights(labels))
  assert jax.tree_util.tree_structure(routed) == jax.tree_util.tree_structure(grads)
  assert float(jnp.abs(routed["head"]["kernel"].value).sum()) > 0
  assert float(jnp.abs(routed["embed"]["embedding"].value).sum()) == 0
  assert jax.tree_util.tree_leaves(compiled.group_of(grads)) == list(compiled.leaf_group)


class LinenTiny(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2, name="head")(nn.Dense(4, name="body")(x))


def test_linen_params_are_addressed_by_their_module_paths():
  params = LinenTiny().init(jax.random.key(0), jnp.ones((1, 3)))
  policy = Policy(
    "linen", {"body": ["params/body/**"], "head": ["params/head/kernel"]}, default={"body": 1.0}
  )
  compiled = compile_policy(policy, params, SPACE)
  w = compiled.leaf_weights(
    SPACE.encode(
      [
        {
          "acme-data": {
            "license_class": "cc-by",
            "sensitivity_tier": 0,
            "jurisdictions": [],
            "source": "x",
          }
        }
      ]
    )
  )
  assert w["params"]["body"]["kernel"].tolist() == [1.0] and w["params"]["head"][
    "kernel"
  ].tolist() == [0.0]
  assert compiled.uncovered_leaves() == ("params/head/bias",)


class Pair(NamedTuple):
  body: dict
  head: np.ndarray


@dataclasses.dataclass
class Module:
  """A module-like pytree (the way Equinox modules flatten: attribute keys)."""

  body: jax.Array
  head: jax.Array


jax.tree_util.register_dataclass(Module, data_fields=["body", "head"], meta_fields=[])


@pytest.mark.parametrize(
  "params",
  [
    Pair({"w": np.zeros(3)}, np.zeros(2)),
    Module(jnp.zeros(3), jnp.zeros(2)),
  ],
)
def test_namedtuple_and_module_like_pytrees_are_addressed_by_attribute(params):
  policy = Policy("p", {"body": ["body/**"], "head": ["head"]}, default={"head": 1.0})
  compiled = compile_policy(policy, params, SPACE)
  w = compiled.leaf_weights(SPACE.encode([{}]))
  assert type(w) is type(params)
  assert np.asarray(w.head).tolist() == [1.0]
  assert compiled.uncovered_leaves() == ()


def test_group_of_refuses_a_tree_of_another_structure():
  compiled = compile_policy(POLICY, PARAMS, SPACE)
  with pytest.raises(PolicyError, match="does not match"):
    compiled.group_of({"embed": {"tokens": 0}})


def test_group_of_maps_leaves_to_group_indices():
  compiled = compile_policy(POLICY, PARAMS, SPACE)
  groups = compiled.group_of(PARAMS)
  assert compiled.group_names[groups["head"]["bias"]] == "head"
  assert compiled.group_names[groups["blocks"]["1"]["mlp"]["up"]] == "core"


# -- explain and parameter shapes ----------------------------------------------------------------------


def test_explain_lists_classes_groups_sizes_and_warnings():
  compiled = compile_policy(POLICY, PARAMS, SPACE)
  text = explain(compiled)
  for name in compiled.class_names + compiled.group_names:
    assert name in text
  assert "final_norm/scale" in text and "head (2 leaves, 40 params)" in text
  table = explain_table(compiled)
  assert table.rows[2] == ("acme-routing:default", (1.0, 1.0, 0.0, 1.0, 0.0))


def test_param_shapes_nest_keys_and_split_slashes():
  shapes = param_shapes({"blocks": {"0": {"kernel": [4, 8]}}, "head/bias": [8]})
  assert tree_paths(shapes) == ["blocks/0/kernel", "head/bias"]
  assert shapes["head"]["bias"].shape == (8,)


@pytest.mark.parametrize(
  "doc, message",
  [
    ({}, "non-empty"),
    ({"head": [4, -1]}, "shape list"),
    ({"head": "4x4"}, "shape list"),
    ({"head/": [4]}, "empty segment"),
    ({"head/bias": [4], "head": {"bias": [4]}}, "given twice"),
  ],
)
def test_malformed_param_shapes_raise_policy_errors(doc, message):
  with pytest.raises(PolicyError, match=message):
    param_shapes(doc)


def test_a_label_space_is_built_from_a_list_of_taxonomies():
  compiled = compile_policy(POLICY, PARAMS, list(SPACE.taxonomies))
  assert compiled.route_class(LabelSpace.of(list(SPACE.taxonomies)).encode([None])).tolist() == [3]
