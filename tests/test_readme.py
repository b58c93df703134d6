"""The README's code runs as written: every command after `aqgov demo --out demo-out`, and the
"Record your own loop" example."""

import glob
import re
import shlex
import shutil
from pathlib import Path

from click.testing import CliRunner

from aqgov.cli import main
from aqgov.documents import TrustStore
from aqgov.lineage import verify_lineage

ROOT = Path(__file__).resolve().parents[1]


def _post_demo_commands() -> list[str]:
  readme = (ROOT / "README.md").read_text()
  section = readme[readme.index("## What the demo does") : readme.index("## Concepts and API")]
  block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
  return [line for line in block.splitlines() if line.strip()]


def test_the_readme_commands_after_the_demo_run_as_written(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "aqgov" / "data").mkdir(parents=True)
  shutil.copy(ROOT / "aqgov" / "data" / "examples.jsonl", tmp_path / "aqgov" / "data")
  demo = CliRunner().invoke(main, ["demo", "--out", "demo-out"])
  assert demo.exit_code == 0, demo.output
  commands = _post_demo_commands()
  # the commands use the environment the README's first command made, so they run as written
  assert [c.split()[:3] for c in commands] == [
    [".venv/bin/aqgov", "keys", "fingerprint"],
    [".venv/bin/aqgov", "lineage", "verify"],
    [".venv/bin/aqgov", "lineage", "export"],
    [".venv/bin/aqgov", "lineage", "replay"],
  ]
  for command in commands:
    argv = [
      a
      for arg in shlex.split(command)[1:]
      for a in (sorted(glob.glob(arg)) if "*" in arg else [arg])
    ]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, f"{command}\n{result.output}"
    assert "warning" not in result.output, command


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
