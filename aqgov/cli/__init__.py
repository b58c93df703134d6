"""The `aqgov` command line. Each concept registers its own command group here."""

from __future__ import annotations

import sys

import click

from aqgov.errors import AqgovError


class _Main(click.Group):
  """Turns aqgov's typed errors into one clear line and a non-zero exit, never a traceback."""

  def invoke(self, ctx: click.Context):
    try:
      return super().invoke(ctx)
    except AqgovError as exc:
      click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
      sys.exit(1)
    except (
      OSError
    ) as exc:  # a file the command reads or writes: unwritable, missing, a directory, a full disk
      where = f" {exc.filename}" if exc.filename else ""
      click.echo(
        f"error: cannot access{where}: {exc.strerror or exc}; check the path and its permissions",
        err=True,
      )
      sys.exit(1)


@click.group(cls=_Main)
@click.version_option(package_name="aqgov")
def main() -> None:
  """aqgov: governed training for JAX/Optax."""


from aqgov.cli import keys as _keys  # noqa: E402

main.add_command(_keys.keys)

from aqgov.cli import credentials as _credentials  # noqa: E402

main.add_command(_credentials.credentials)

from aqgov.cli import policy as _policy  # noqa: E402

main.add_command(_policy.policy)

from aqgov.cli import demo as _demo  # noqa: E402

main.add_command(_demo.demo)

from aqgov.cli import lineage as _lineage  # noqa: E402

main.add_command(_lineage.lineage)

from aqgov.cli import profile as _profile  # noqa: E402

main.add_command(_profile.profile)
main.add_command(_profile.override)

from aqgov.cli import witness as _witness  # noqa: E402

main.add_command(_witness.witness)

from aqgov.cli import report as _report  # noqa: E402

main.add_command(_report.report)

from aqgov.cli import wandb as _wandb  # noqa: E402

main.add_command(_wandb.wandb)

from aqgov.cli import gate as _gate  # noqa: E402

main.add_command(_gate.gate)
