"""``pyro-blora testbed``: build the offline code-switching testbed."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pyro_blora.testbed import TestbedConfig, build_from_text, build_testbed


def testbed(
    out: Path = typer.Option(Path("testbed"), help="output folder (must be empty unless --overwrite)"),
    seed: int = typer.Option(0, help="seed for text, voices, rates and noise"),
    overwrite: bool = typer.Option(False, help="replace an existing output folder"),
    small: bool = typer.Option(False, help="tiny sizes, for a smoke test"),
    pairs: Optional[list[str]] = typer.Option(None, help="language pairs, e.g. zh-en es-en ar-en"),
    text_file: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="speak these transcripts (one per line) instead"),
    pair: str = typer.Option("en", help="language pair of --text-file, e.g. es-en, or en"),
) -> None:
    """Synthesise the testbed (English original domain, code-switched domains, backward suite)."""
    overrides = {"pairs": tuple(pairs)} if pairs else {}
    config = TestbedConfig.small(**overrides) if small else TestbedConfig(**overrides)
    if text_file is not None:
        typer.echo(f"wrote {build_from_text(text_file, out, pair, config, seed=seed, overwrite=overwrite)}")
        return
    for domain, path in build_testbed(out, config, seed=seed, overwrite=overwrite).items():
        typer.echo(f"{domain}: {path}")


def register(app: typer.Typer) -> None:
    app.command("testbed")(testbed)
