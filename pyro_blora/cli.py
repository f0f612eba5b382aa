"""The ``pyro-blora`` command line: each command module registers its commands on one Typer app.

Commands call the same functions as the Python API; nothing here computes anything itself.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="pyro-blora",
    no_args_is_help=True,
    add_completion=False,
    help="Bayesian low-rank adaptation of Whisper with Pyro.",
)

COMMAND_MODULES = (
    "pyro_blora.commands.testbed",
    "pyro_blora.commands.experiment",
    "pyro_blora.commands.sequential",
    "pyro_blora.commands.interop",
    "pyro_blora.commands.analysis",
    "pyro_blora.commands.transcribe",
)

for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(app)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
