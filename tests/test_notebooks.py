"""Every notebook in notebooks/ executes top to bottom without error, and each starts with the
Colab install cell: it does nothing where aqgov is importable, installs `aqgov[report,wandb]` from
the source it is given (a git URL or a wheel) and otherwise says what to do."""

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from packaging.requirements import Requirement

ROOT = Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
IDS = [p.stem for p in NOTEBOOKS]
EXTRAS = {"report", "wandb"}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_executes(path, tmp_path):
  nb = nbformat.read(path, as_version=4)
  NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
  ).execute()
  errors = [
    o
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.get("outputs", [])
    if o.output_type == "error"
  ]
  assert not errors


def test_there_are_notebooks():
  assert {"quickstart", "audit"} <= set(IDS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebooks_are_committed_with_their_outputs_cleared(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code)


def install_cell(path: Path) -> str:
  nb = nbformat.read(path, as_version=4)
  return next(c.source for c in nb.cells if c.cell_type == "code")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_every_notebook_starts_with_the_same_install_cell(path):
  cell = install_cell(path)
  assert cell == install_cell(ROOT / "notebooks" / "quickstart.ipynb")
  assert 'AQGOV_SOURCE = ""' in cell


def run_cell(python: str, cwd: Path, *, source: str | None = None, pythonpath: str | None = None):
  """Run the install cell as a script under `python`, printing the pip command instead of
  installing (AQGOV_DRY_RUN=1)."""
  env = {k: v for k, v in os.environ.items() if k not in ("AQGOV_SOURCE", "PYTHONPATH")}
  env["AQGOV_DRY_RUN"] = "1"
  if source is not None:
    env["AQGOV_SOURCE"] = source
  if pythonpath is not None:
    env["PYTHONPATH"] = pythonpath
  script = cwd / "install_cell.py"
  script.write_text(install_cell(NOTEBOOKS[0]))
  return subprocess.run(
    [python, str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
  )


@pytest.fixture
def bare_python(tmp_path) -> str:
  """An interpreter that cannot import aqgov (the system python3, where it has no aqgov)."""
  python = shutil.which("python3")
  if python is None:
    pytest.skip("no python3 on PATH")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  probe = subprocess.run([python, "-c", "import aqgov"], cwd=tmp_path, env=env, capture_output=True)
  if probe.returncode == 0:
    pytest.skip(f"{python} can import aqgov")
  return python


def pip_requirement(stdout: str) -> Requirement:
  """The requirement of the pip command the cell printed (its last argument)."""
  command = stdout.strip().splitlines()[-1]
  assert " -m pip install " in command
  return Requirement(command.split(" install -q ", 1)[1])


def test_the_install_cell_does_nothing_where_aqgov_is_importable(tmp_path):
  done = run_cell(
    sys.executable, tmp_path, source="git+https://example.org/aqgov.git", pythonpath=str(ROOT)
  )
  assert done.returncode == 0, done.stderr
  assert done.stdout == ""


def test_without_aqgov_or_a_source_the_install_cell_says_what_to_do(bare_python, tmp_path):
  done = run_cell(bare_python, tmp_path)
  assert done.returncode != 0
  assert "RuntimeError: aqgov is not installed here" in done.stderr
  assert "AQGOV_SOURCE" in done.stderr and "pip wheel --no-deps -w dist ." in done.stderr
  assert done.stdout == ""


def test_the_install_cell_installs_the_extras_from_a_git_url(bare_python, tmp_path):
  done = run_cell(bare_python, tmp_path, source="git+https://example.org/aqgov.git@v0.1.0")
  assert done.returncode == 0, done.stderr
  req = pip_requirement(done.stdout)
  assert (req.name, req.extras, req.url) == (
    "aqgov",
    EXTRAS,
    "git+https://example.org/aqgov.git@v0.1.0",
  )


def test_the_install_cell_installs_the_first_wheel_in_the_working_directory(bare_python, tmp_path):
  for name in ("aqgov-0.2.0-py3-none-any.whl", "aqgov-0.1.0-py3-none-any.whl", "other-1.0.whl"):
    (tmp_path / name).touch()
  req = pip_requirement(run_cell(bare_python, tmp_path).stdout)
  assert (req.name, req.extras) == ("aqgov", EXTRAS)
  assert req.url == (tmp_path / "aqgov-0.1.0-py3-none-any.whl").resolve().as_uri()


def test_a_wheel_path_given_as_the_source_is_installed_by_its_file_uri(bare_python, tmp_path):
  (tmp_path / "dist").mkdir()
  done = run_cell(bare_python, tmp_path, source="dist/aqgov-0.1.0-py3-none-any.whl")
  req = pip_requirement(done.stdout)
  assert req.url == (tmp_path / "dist" / "aqgov-0.1.0-py3-none-any.whl").resolve().as_uri()


def test_the_extras_the_install_cell_names_are_defined():
  pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert EXTRAS <= set(pyproject["project"]["optional-dependencies"])
  assert "aqgov[report,wandb] @ " in install_cell(NOTEBOOKS[0])
