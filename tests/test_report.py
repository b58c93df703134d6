"""The HTML audit report: its sections and inline plots, verification shown with the auditor's
trust, the CLI, and a real headless Chromium loading it."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from click.testing import CliRunner

from aqgov.cli import main
from aqgov.report import build_report, write_report

import lineage_helpers as lh

SECTIONS = ("verification", "run", "routing", "entropy", "admission", "checkpoints", "attestation")
PLOTS = ("plot-loss", "plot-heatmap", "plot-reach", "plot-contribution")


class _Page(HTMLParser):
  """Ids, tags and external references of an HTML page."""

  def __init__(self):
    super().__init__()
    self.ids, self.svgs, self.external, self.scripts, self.text = {}, 0, [], 0, []
    self._stack = []

  def handle_starttag(self, tag, attrs):
    a = dict(attrs)
    if "id" in a:
      self.ids[a["id"]] = tag
    self.svgs += tag == "svg"
    self.scripts += tag == "script"
    for k in ("src", "href"):
      if a.get(k) and not a[k].startswith(("#", "data:")):
        self.external.append(a[k])

  def handle_data(self, data):
    self.text.append(data)


def _parse(html: str) -> _Page:
  p = _Page()
  p.feed(html)
  return p


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("report")
  data = lh.examples_file(tmp / "data.jsonl", n=32)
  lh.make_run(tmp / "run", data, 4, checkpoint_every=2)
  return tmp / "run"


def test_report_has_every_section_and_plot(run_dir):
  page = _parse(build_report(run_dir, lh.trust_of(run_dir)))
  for s in SECTIONS:
    assert page.ids.get(s) == "section", s
  for p in PLOTS:
    assert page.ids.get(p) == "figure", p
  assert page.svgs >= len(PLOTS)
  assert page.scripts == 0 and page.external == []  # self-contained: nothing to fetch
  text = " ".join(page.text)
  assert "VERIFIED" in text and "route class" in text
  for step in (0, 2, 4):
    assert f"checkpoints/{step}" in text


def test_report_shows_a_failed_verification(run_dir, tmp_path):
  other = lh.examples_file(tmp_path / "d.jsonl", n=16)
  lh.make_run(tmp_path / "other", other, 1)
  page = _parse(build_report(run_dir, lh.trust_of(tmp_path / "other")))
  assert "VERIFICATION FAILED" in " ".join(page.text)
  result = CliRunner().invoke(
    main,
    [
      "report",
      str(run_dir),
      "-o",
      str(tmp_path / "r.html"),
      "--trust",
      *map(str, sorted((tmp_path / "other" / "keys").glob("*.pub"))),
    ],
  )
  assert result.exit_code == 1 and "does NOT verify" in result.output
  assert "VERIFICATION FAILED" in (tmp_path / "r.html").read_text()


def test_cli_takes_the_verify_trust_options(run_dir, tmp_path):
  out = tmp_path / "report.html"
  keys = [str(p) for p in sorted((run_dir / "keys").glob("*.pub"))]
  result = CliRunner().invoke(
    main, ["report", str(run_dir), "-o", str(out), "--trust", *keys, "--allow-open"]
  )
  assert result.exit_code == 0, result.output
  assert out.stat().st_mode & 0o044  # shareable, unlike a key
  result = CliRunner().invoke(main, ["report", str(run_dir), "-o", str(out)])
  assert result.exit_code != 0 and "--trust" in result.output


def test_report_records_an_attestation_digest(run_dir, tmp_path):
  att = tmp_path / "attestation.intoto.json"
  result = CliRunner().invoke(main, ["lineage", "export", str(run_dir), "--intoto", str(att)])
  assert result.exit_code == 0, result.output
  import hashlib

  html = build_report(run_dir, lh.trust_of(run_dir), attestation=att)
  assert hashlib.sha256(att.read_bytes()).hexdigest() in html and "signed by a trusted key" in html


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
  CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium)"
)
def test_report_loads_in_headless_chromium(run_dir, tmp_path):
  report = tmp_path / "report.html"
  write_report(run_dir, report, lh.trust_of(run_dir))
  flags = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    f"--user-data-dir={tmp_path / 'profile'}",
    "--enable-logging=stderr",
    "--v=0",
  ]
  dom = subprocess.run(
    [CHROMIUM, *flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120
  )
  assert dom.returncode == 0, dom.stderr[-2000:]
  page = _parse(dom.stdout)
  for p in PLOTS:
    assert p in page.ids
  assert page.svgs == _parse(report.read_text()).svgs >= len(PLOTS)
  console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
  assert not console, console
  shot = tmp_path / "shot.png"
  subprocess.run(
    [CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1280,2000", report.as_uri()],
    capture_output=True,
    timeout=120,
    check=True,
  )
  assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
