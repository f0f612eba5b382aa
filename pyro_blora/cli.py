"""The ``pyro-blora`` command line: each command module registers its commands on one Typer app.

Commands call the same functions as the Python API; nothing here computes anything itself.

Expected failures (a path that does not exist, a bad option value, a language the model does not
know, a model that does not fit the posterior, audio too long with long-form off, ...) print one
``Error:`` line that says what is wrong and how to fix it, and exit with code 2, as usage errors do.
Anything else is a bug and keeps its traceback; ``--debug`` (or ``PYRO_BLORA_DEBUG=1``) shows the
traceback of expected failures too.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import typer
from typer.core import TyperGroup

try:  # typer vendors its own click since 0.2x; its exceptions are not click's
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer on plain click
    from click import exceptions as click_exceptions

from pyro_blora.commands import analysis, experiment, interop, laplace, sequential, testbed, transcribe
from pyro_blora.offline import HubUnavailableError

EXIT_USAGE = 2
DEBUG_ENV = "PYRO_BLORA_DEBUG"
_PACKAGE_ROOT = Path(__file__).resolve().parent

# Raised by this library's checks and file handling; their messages name the fix.
_EXPECTED = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)


def _raised_by_this_library(error: BaseException) -> bool:
    """Whether the innermost frame of the traceback lies in pyro_blora: a deliberate check (whose message
    names the fix), not a failure deep inside a dependency."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(_PACKAGE_ROOT)


def expected_failure(error: BaseException) -> bool:
    """Errors shown as one line: missing files and folders, the library's own ValueError/KeyError/OSError checks."""
    if isinstance(error, (*_EXPECTED, HubUnavailableError)):
        return True
    return isinstance(error, (ValueError, KeyError, OSError, ModuleNotFoundError)) and _raised_by_this_library(error)


def _message(error: BaseException) -> str:
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(str(text).split()) if "\n" not in str(text).strip() else str(text).strip()


class CleanErrorsGroup(TyperGroup):
    """Turns expected failures and usage errors into one ``Error:`` line and exit code 2."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort):
            raise
        except click_exceptions.UsageError as error:
            if ctx.params.get("debug"):
                raise
            command = error.ctx.command_path if error.ctx is not None else ctx.command_path
            hint = f" (see `{command} --help`)" if error.ctx is not None else ""
            typer.echo(f"Error: {error.format_message()}{hint}", err=True)
            ctx.exit(EXIT_USAGE)
        except click_exceptions.ClickException:
            raise
        except Exception as error:  # noqa: BLE001 - sorted into expected failures and bugs here
            if ctx.params.get("debug") or not expected_failure(error):
                raise
            typer.echo(f"Error: {_message(error)}", err=True)
            ctx.exit(EXIT_USAGE)


app = typer.Typer(
    name="pyro-blora",
    cls=CleanErrorsGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    help="Bayesian low-rank adaptation of Whisper with Pyro.",
)


@app.callback()
def _options(
    debug: bool = typer.Option(
        False, "--debug", envvar=DEBUG_ENV, help="show the full traceback of expected failures too"
    ),
) -> None:
    """Bayesian low-rank adaptation of Whisper with Pyro."""


# In the order `--help` lists their commands.
COMMAND_MODULES = (testbed, experiment, sequential, interop, laplace, analysis, transcribe)

for _module in COMMAND_MODULES:
    _module.register(app)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
