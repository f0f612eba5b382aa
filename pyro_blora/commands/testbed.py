"""``pyro-blora testbed``: build the offline code-switching testbed."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pyro_blora.commands.options import default_note
from pyro_blora.testbed import BUILTIN_PAIRS, TestbedConfig, build_from_text, build_testbed

DEFAULT_BUILD = TestbedConfig()
SMALL_BUILD = TestbedConfig.small()


def build_default(field: str) -> str:
    """The default of a ``TestbedConfig`` field, and the --small build's where it differs."""
    return default_note(getattr(DEFAULT_BUILD, field), getattr(SMALL_BUILD, field), other_name="--small")


def testbed_config(small: bool, **options) -> TestbedConfig:
    """The build the options describe: the full or the --small sizes, with every option given (not None) over them."""
    overrides = {name: tuple(value) if isinstance(value, (list, tuple)) else value
                 for name, value in options.items() if value is not None}
    return TestbedConfig.small(**overrides) if small else TestbedConfig(**overrides)


def testbed(
    out: Path = typer.Option(Path("testbed"), help="output folder (must be empty unless --overwrite)"),
    seed: int = typer.Option(0, help="seed for text, voices, rates and noise"),
    overwrite: bool = typer.Option(False, help="replace an existing output folder"),
    small: bool = typer.Option(False, help="tiny sizes, for a smoke test"),
    pairs: Optional[list[str]] = typer.Option(None, help=f"language pair to build (repeat): among "
                                              f"{', '.join(BUILTIN_PAIRS)} {build_default('pairs')}"),
    codeswitch_sizes: Optional[tuple[int, int, int]] = typer.Option(
        None, help="utterances of each code-switched pair: TRAIN DEV TEST " + build_default("codeswitch_sizes")),
    english_sizes: Optional[tuple[int, int, int]] = typer.Option(
        None, help="utterances of the English domain: TRAIN DEV TEST " + build_default("english_sizes")),
    backward_languages: Optional[list[str]] = typer.Option(
        None, "--backward-language", help="monolingual backward probe (repeat; none: --backward-size 0) "
        + build_default("backward_languages")),
    backward_size: Optional[int] = typer.Option(None, help="test utterances per backward language "
                                                + build_default("backward_size")),
    english_noise_fraction: Optional[float] = typer.Option(None, help="share of English utterances with added noise "
                                                           + build_default("english_noise_fraction")),
    text_file: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="speak these transcripts (one per line) instead"),
    pair: str = typer.Option("en", help="language pair of --text-file, e.g. es-en, or en"),
) -> None:
    """Synthesise the testbed (English original domain, code-switched domains, backward suite)."""
    config = testbed_config(small, pairs=pairs, codeswitch_sizes=codeswitch_sizes, english_sizes=english_sizes,
                            backward_languages=backward_languages, backward_size=backward_size,
                            english_noise_fraction=english_noise_fraction)
    if text_file is not None:
        typer.echo(f"wrote {build_from_text(text_file, out, pair, config, seed=seed, overwrite=overwrite)}")
        return
    for domain, path in build_testbed(out, config, seed=seed, overwrite=overwrite).items():
        typer.echo(f"{domain}: {path}")


def register(app: typer.Typer) -> None:
    app.command("testbed")(testbed)
