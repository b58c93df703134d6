"""Every model of the zoo (Flax Linen, Flax NNX, Equinox, Haiku) routes exactly like brute force.

Each zoo model runs under the benchmarks' three-class policy (some examples routed away from some
groups, one class at half weight) with every strategy; gradients and per-example per-group norms
are held to a float64 loop over examples. Training-mode BatchNorm variants mix the examples of a
batch and are refused. The zoo script itself runs end to end on two models.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import aqgov

import routed_models as rm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import zoo  # noqa: E402
import zoo_models  # noqa: E402

pytestmark = [
  pytest.mark.filterwarnings("ignore::aqgov.policy.UncoveredParametersWarning"),
  pytest.mark.filterwarnings("ignore::UserWarning"),
]

STRATEGIES = ("cotangent", "per_example", "auto")
# one model per framework runs by default; the whole zoo takes minutes on one core
FAST = {"linen_vae", "nnx_vae", "eqx_mlp", "hk_mlp"}
MODELS = [
  pytest.param(name, marks=() if name in FAST else pytest.mark.slow) for name in zoo_models.MODELS
]


@pytest.mark.parametrize("name", MODELS)
def test_every_zoo_model_routes_exactly_under_every_strategy(name):
  s = zoo.setup(zoo_models.build(name, "quick"))
  params, batch = s.case.params, s.case.batch
  weights = np.asarray(s.compiled.group_weights(s.labels))
  assert (weights == 0).any() and (weights == 0.5).any(), "the policy routes some examples away"
  want, want_norms = rm.brute_force(s.case.loss, s.compiled, params, batch, s.labels)
  for strategy in STRATEGIES:
    fn = aqgov.routed_value_and_grad(s.case.loss, s.compiled, strategy, with_norms=True)
    loss, grads, norms = jax.jit(fn)(params, batch, s.labels)
    rm.assert_matches(s.compiled, grads, want, rtol=1e-4)
    np.testing.assert_allclose(
      norms, want_norms, rtol=1e-4, atol=1e-5 * float(np.max(want_norms)), err_msg=strategy
    )
    plain = jax.vmap(s.case.loss, (None, 0))(params, batch).mean()
    np.testing.assert_allclose(loss, plain, rtol=1e-5)


@pytest.mark.parametrize("strategy", ("cotangent", "per_example"))
@pytest.mark.parametrize("name", list(zoo_models.COUPLED))
def test_a_training_mode_batchnorm_model_is_refused_as_batch_coupled(name, strategy):
  s = zoo.setup(zoo_models.build(name, "quick"))
  fn = aqgov.routed_value_and_grad(s.case.loss, s.compiled, strategy, with_norms=True)
  with pytest.raises(aqgov.BatchCouplingError):
    fn(s.case.params, s.case.batch, s.labels)


def test_the_zoo_script_checks_and_measures_two_models_and_prints_its_table(capsys):
  rows = zoo.main(["--size", "quick", "--reps", "1", "--models", "eqx_mlp,hk_mlp"])
  assert [r.key for r in rows] == ["eqx_mlp", "hk_mlp"]
  assert all(r.error < 1e-4 and r.auto == "cotangent" for r in rows)
  out = capsys.readouterr().out
  assert out.startswith("backend: cpu")
  measured, methods = [block.splitlines() for block in out.split("\n\n")[1:3]]
  for column in ("max rel err", "cotangent time", "cotangent+norms mem", "governed time"):
    assert f"| {column} |" in measured[0]
  cells = [[c.strip() for c in line.strip("|").split("|")] for line in measured[2:]]
  assert [c[:3] for c in cells] == [["MLP", "equinox", "cotangent"], ["MLP", "haiku", "cotangent"]]
  assert all(re.fullmatch(r"\d+\.\d\dx", cell) for row in cells for cell in row[6:9])
  assert all(re.fullmatch(r"(\d+\.\d\dx|n/a) \(\d+\.\d\dx\)", c) for row in cells for c in row[9:])
  assert methods[0] == "| model | framework | norms by (leaves per method) |"
  assert all("ghost" in line for line in methods[2:]) and len(methods) == 4


def test_the_readme_section_between_the_zoo_markers_is_rewritten_and_the_rest_kept(tmp_path):
  readme = tmp_path / "README.md"
  readme.write_text(f"# title\n\n{zoo.BEGIN}\nold table\n{zoo.END}\n\n## next\n")
  zoo.write_readme("new table", readme)
  assert readme.read_text() == f"# title\n\n{zoo.BEGIN}\nnew table\n{zoo.END}\n\n## next\n"
  readme.write_text("# no markers\n")
  with pytest.raises(SystemExit, match="no <!-- zoo:begin -->"):
    zoo.write_readme("new table", readme)


@pytest.mark.slow
def test_every_size_builds_every_model_shape_without_running_it():
  """The accelerator sizes trace (abstractly) like the quick one: shapes fit at every size."""
  for size in ("small", "large"):
    for name in zoo_models.MODELS:
      case = jax.eval_shape(lambda n=name, sz=size: _abstract_case(n, sz))
      assert case.shape == (zoo_models.SIZES[size].batch,), (name, size)


def _abstract_case(name: str, size: str):
  case = zoo_models.build(name, size)
  return jax.vmap(case.loss, (None, 0))(case.params, case.batch)
