"""The README's code runs as written: every command after `aqgov demo --out demo-out`, and the
"Record your own loop" example."""

import glob
import os
import re
import shlex
import shutil
from pathlib import Path

import jax.numpy as jnp
import pytest
from click.testing import CliRunner

from aqgov.cli import main
from aqgov.documents import TrustStore
from aqgov.lineage import verify_lineage

ROOT = Path(__file__).resolve().parents[1]


def _bash_block(start: str, end: str) -> list[str]:
  """The command lines of the first bash block between two README headings."""
  readme = (ROOT / "README.md").read_text()
  section = readme[readme.index(start) : readme.index(end)]
  block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
  return [line for line in block.splitlines() if line.strip()]


def _run_as_written(command: str):
  """Run one `.venv/bin/aqgov ...` line in-process, its globs expanded as a shell would."""
  argv = [
    a for arg in shlex.split(command)[1:] for a in (sorted(glob.glob(arg)) if "*" in arg else [arg])
  ]
  return CliRunner().invoke(main, argv)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
  """Where the README's first command leaves the demo run (`demo-out`, `demo-out-keys`)."""
  root = tmp_path_factory.mktemp("clone")
  (root / "aqgov" / "data").mkdir(parents=True)
  for name in ("examples.jsonl", "probe.jsonl"):
    shutil.copy(ROOT / "aqgov" / "data" / name, root / "aqgov" / "data")
  cwd = os.getcwd()
  os.chdir(root)
  try:
    demo = CliRunner().invoke(main, ["demo", "--out", "demo-out"])
  finally:
    os.chdir(cwd)
  assert demo.exit_code == 0, demo.output
  return root


def test_the_readme_commands_after_the_demo_run_as_written(demo_dir, monkeypatch):
  monkeypatch.chdir(demo_dir)
  commands = _bash_block("## What the demo does", "## Quickstart")
  # the commands use the environment the README's first command made, so they run as written
  assert [c.split()[:3] for c in commands] == [
    [".venv/bin/aqgov", "keys", "fingerprint"],
    [".venv/bin/aqgov", "lineage", "verify"],
    [".venv/bin/aqgov", "lineage", "export"],
    [".venv/bin/aqgov", "lineage", "replay"],
  ]
  for command in commands:
    result = _run_as_written(command)
    assert result.exit_code == 0, f"{command}\n{result.output}"
    assert "warning" not in result.output, command


def test_the_auditors_path_answers_each_question_with_one_command(demo_dir, monkeypatch):
  monkeypatch.chdir(demo_dir)
  commands = _bash_block("## The auditor's path", "## Command line")
  assert all(c.startswith(".venv/bin/aqgov ") for c in commands)
  outputs = {}
  for command in commands:
    result = _run_as_written(command)
    assert result.exit_code == 0, f"{command}\n{result.output}"
    outputs[" ".join(command.split()[1:3])] = (
      outputs.get(" ".join(command.split()[1:3]), "") + result.output
    )
  assert "none" in outputs["lineage query"]  # no sensitive example reached the core
  assert "ex-0173" in outputs["lineage attribute"]  # the probe is the text of ex-0173
  assert "PASS" in outputs["gate demo-out"].upper()
  for name in ("gate.intoto.json", "report.html", "bom.cdx.json", "bom.spdx.json"):
    assert (demo_dir / name).is_file(), name


def _section_code(title: str, lang: str = "python") -> str:
  """The first `lang` code block of the README section headed `## title`."""
  readme = (ROOT / "README.md").read_text()
  start = readme.index(f"## {title}\n")
  end = readme.find("\n## ", start + 1)
  return re.search(rf"```{lang}\n(.*?)```", readme[start:end], re.S).group(1)


def test_the_readme_own_loop_example_runs_and_its_lineage_verifies(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  code = _section_code("Record your own loop")
  assert "GovernedRun.open" in code and "run.record(" in code and "verify_lineage" in code
  exec(compile(code, "README.md: Record your own loop", "exec"), {"__name__": "__readme__"})
  assert "content-hash-mismatch" in capsys.readouterr().out
  trust = TrustStore.from_paths(
    [*sorted((tmp_path / "authorities" / "keys").glob("*.pub")), tmp_path / "run-keys" / "run.pub"]
  )
  report = verify_lineage(tmp_path / "RUN", trust)
  assert report.closed and report.size == 6  # run-start, 3 steps, the final checkpoint, run-end
  assert not any((tmp_path / "RUN").rglob("*.key"))


def test_the_readme_quickstart_routes_your_model_in_your_optax_chain(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  code = _section_code("Quickstart: your model, your optax chain")
  namespace = {"__name__": "__readme__"}
  exec(compile(code, "README.md: Quickstart", "exec"), namespace)
  assert "content-hash-mismatch" in capsys.readouterr().out
  assert bool(jnp.isfinite(namespace["loss"])) and len(namespace["batch"].ids) == 15
