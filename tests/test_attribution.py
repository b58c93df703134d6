"""Routing-aware attribution: a probe equal to a training example ranks it first, an example routed
away from a group scores exactly zero there, results are signed against a head, and the fallback
over checkpoints ranks as the sketches do."""

import json

import numpy as np
import pytest
from attribution_helpers import make_sketched_run
from click.testing import CliRunner

from aqgov.cli import main
from aqgov.documents import _keys as keylib
from aqgov.documents._document_type import read, sign
from aqgov.documents._keys import TrustStore
from aqgov.errors import LineageError, SignatureError
from aqgov.examples import sample
from aqgov.lineage import ATTRIBUTION, attribute, self_influence, verify_attribution
from aqgov.lineage._record import view_step
from aqgov.lineage._segments import records


@pytest.fixture(scope="module")
def sketched(tmp_path_factory):
  return make_sketched_run(tmp_path_factory.mktemp("sketched"))


@pytest.fixture
def sketched_run(sketched):
  return sketched[0], sketched[1]


pytestmark = pytest.mark.slow  # one governed run of the tiny LM, shared, and its checkpoints

PROBE = 3  # a training example that reaches the adapter


def test_a_probe_equal_to_a_training_example_ranks_it_first(sketched_run):
  run_dir, trust = sketched_run
  probe = sample.examples()[PROBE]
  result = attribute(run_dir, [probe], trust=trust, top=3)
  assert result.method == "sketches"
  assert result.scores[0][0].key == probe.id
  assert result.scores[0][0].score > result.scores[0][1].score


def test_an_example_routed_away_from_a_group_scores_exactly_zero_there(sketched_run):
  run_dir, trust = sketched_run
  body = next(b for _, _, b in records(run_dir / "lineage", kinds=("step",)))
  view = view_step(body)
  result = attribute(run_dir, [sample.examples()[PROBE]], trust=trust, top=100)
  groups = result.run_groups
  scored = {s.key: s for s in result.scores[0]}
  checked = 0
  for row, ex_id in enumerate(view.row_ids):
    for g, w in enumerate(view.weights[row]):
      if w == 0:
        assert np.float64(scored[ex_id].groups[g]).view(np.uint64) == 0, (ex_id, groups[g])
        checked += 1
  assert checked > 0


def test_self_influence_comes_from_the_sketches_alone(sketched_run):
  run_dir, trust = sketched_run
  scores = self_influence(run_dir, trust=trust)
  assert set(scores) == {e.id for e in sample.examples()[:8]}
  assert all(v.shape == (4,) and (v >= 0).all() for v in scores.values())


def test_the_fallback_over_checkpoints_ranks_as_the_sketches_do(sketched_run):
  """A checkpoint after every step: the fallback projects at the same params the steps used, so
  only the stored sketches' bfloat16 rounding separates the two."""
  run_dir, trust = sketched_run
  probe = [sample.examples()[PROBE]]
  a = attribute(run_dir, probe, trust=trust, top=8)
  b = attribute(
    run_dir, probe, trust=trust, top=8, method="checkpoints", examples=sample.examples()
  )
  assert b.method == "checkpoints"
  assert [s.key for s in a.scores[0]] == [s.key for s in b.scores[0]]
  np.testing.assert_allclose(
    [s.score for s in a.scores[0]], [s.score for s in b.scores[0]], rtol=0.05
  )
  c = attribute(run_dir, probe, trust=trust, top=8, normalize=True)
  d = attribute(
    run_dir,
    probe,
    trust=trust,
    top=8,
    normalize=True,
    method="checkpoints",
    examples=sample.examples(),
  )
  assert c.normalized and c.scores[0][0].key == probe[0].id
  assert [s.key for s in c.scores[0]] == [s.key for s in d.scores[0]]


def test_without_data_the_fallback_says_what_it_needs(sketched_run):
  run_dir, trust = sketched_run
  with pytest.raises(LineageError, match="--data"):
    attribute(run_dir, [sample.examples()[PROBE]], trust=trust, method="checkpoints")


def test_the_signed_result_names_the_head_and_verifies(sketched, tmp_path):
  run_dir, trust, authorities = sketched
  auditor = keylib.generate("auditor", roles=(keylib.GOVERNANCE,))
  result = attribute(run_dir, [sample.examples()[PROBE]], trust=trust, top=2, by="source")
  signed = sign(ATTRIBUTION, result, auditor)
  got = verify_attribution(signed, TrustStore.of([auditor.public]), run_dir)
  assert got == result and got.head_size > 0
  with pytest.raises(SignatureError):
    verify_attribution(signed, trust)  # not signed by any of these keys
  moved = sign(ATTRIBUTION, result.__class__(**{**result.__dict__, "head_size": 1}), auditor)
  with pytest.raises(LineageError, match="not a signed head"):
    verify_attribution(moved, TrustStore.of([auditor.public]), run_dir)


def _probe_file(tmp_path):
  ex = sample.examples()[PROBE]
  path = tmp_path / "probe.jsonl"
  path.write_text(json.dumps({"id": ex.id, "content": ex.content.decode()}) + "\n")
  return path, ex


def _keys_args(run_dir, tmp_path):
  """Every key the run relied on, copied out of the run directory (as if obtained out of band)."""
  args = []
  (tmp_path / "trusted").mkdir(exist_ok=True)
  for p in sorted((run_dir / "keys").glob("*.pub")):
    copy = tmp_path / "trusted" / p.name
    copy.write_bytes(p.read_bytes())
    args += ["--trust", str(copy)]
  return args


def test_the_cli_prints_a_table_and_json_and_writes_a_signed_result(sketched, tmp_path):
  run_dir, trust, authorities = sketched
  probe, ex = _probe_file(tmp_path)
  keylib.write_keypair(keylib.generate("auditor", roles=(keylib.GOVERNANCE,)), tmp_path / "k")
  key = next((tmp_path / "k").glob("*.key"))
  base = ["lineage", "attribute", str(run_dir), "--probe", str(probe), "--top", "3"]
  base += _keys_args(run_dir, tmp_path)
  table = CliRunner().invoke(main, [*base, "--group", "adapter", "--normalize"])
  assert table.exit_code == 0, table.output
  assert ex.id in table.output and "adapter" in table.output and "signed head" in table.output
  out = tmp_path / "result.signed"
  js = CliRunner().invoke(main, [*base, "--json", "--key", str(key), "--out", str(out)])
  assert js.exit_code == 0, js.output
  doc = json.loads(js.output)
  assert doc["result"]["scores"][0][0]["key"] == ex.id
  signed = read(ATTRIBUTION, out)
  assert signed.id == doc["id"]
  bad = CliRunner().invoke(main, [*base, "--steps", "3:1"])
  assert bad.exit_code != 0 and "A <= B" in bad.output


def test_replay_reproduces_the_recorded_sketches_bit_for_bit(sketched_run):
  from aqgov.lineage import replay

  run_dir, trust = sketched_run
  result = replay(run_dir, step=2, examples=sample.examples(), trust=trust, from_checkpoint=0)
  assert result.steps_replayed == 2
