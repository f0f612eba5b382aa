"""``pyro-blora transcribe``: Monte Carlo transcription with word confidences."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from pyro_blora.posterior import load_posterior, read_posterior_config
from pyro_blora.transcribe import TranscribeOptions, render_table, transcribe, write_jsonl
from pyro_blora.weights import load_whisper


def transcribe_command(
    inputs: list[Path] = typer.Argument(..., help="audio files, folders of audio files, or one dataset (manifest or saved dataset)"),
    posterior: Path = typer.Option(..., help="posterior folder written by save_posterior / pyro-blora train"),
    model: Optional[str] = typer.Option(None, help="base Whisper (bundled name, folder or hub id); default: the posterior's metadata base_model"),
    samples: int = typer.Option(8, "--samples", "-S", help="posterior samples per utterance"),
    choose: str = typer.Option("mean", help="chosen hypothesis: 'mean' (posterior mean) or 'mbr' (minimum Bayes risk over samples)"),
    language: Optional[str] = typer.Option(None, help="language for Whisper (default: the dataset's column, or detection)"),
    split: Optional[str] = typer.Option(None, help="dataset split, when the dataset has several"),
    limit: Optional[int] = typer.Option(None, help="transcribe only the first N utterances"),
    batch_size: int = typer.Option(4, help="utterances per batch"),
    sequential: bool = typer.Option(False, help="decode the samples one after another instead of in one batched pass"),
    seed: int = typer.Option(0, help="seed of the posterior draws"),
    low_confidence: float = typer.Option(0.5, help="mark words whose confidence is below this"),
    jsonl: Optional[Path] = typer.Option(None, help="write JSON lines here ('-' for standard output)"),
    table: bool = typer.Option(True, help="print a table with low-confidence words in [brackets]"),
) -> None:
    """Transcribe under S posterior samples: chosen hypothesis, samples, uncertainty, word confidences."""
    if choose not in ("mean", "mbr"):
        raise typer.BadParameter("use 'mean' or 'mbr'", param_hint="--choose")
    options = TranscribeOptions(
        num_samples=samples,
        choose=choose,  # type: ignore[arg-type]
        batch_size=batch_size,
        language=language,
        vectorized=not sequential,
        seed=seed,
        low_confidence=low_confidence,
    )
    base = model or read_posterior_config(posterior).get("metadata", {}).get("base_model")
    if not base:
        raise typer.BadParameter("the posterior does not name its base model; pass --model", param_hint="--model")
    whisper, processor = load_whisper(base)
    blora, guide = load_posterior(posterior, whisper)
    results = transcribe(blora, guide, processor, [str(p) for p in inputs], options, split=split, limit=limit)
    if jsonl is not None:
        if str(jsonl) == "-":
            write_jsonl(results, sys.stdout)
        else:
            jsonl.parent.mkdir(parents=True, exist_ok=True)
            with jsonl.open("w", encoding="utf-8") as handle:
                write_jsonl(results, handle)
            typer.echo(f"wrote {len(results)} transcripts to {jsonl}", err=True)
    if table:
        from rich.console import Console

        Console(stderr=str(jsonl) == "-").print(render_table(results, low_confidence))


def register(app: typer.Typer) -> None:
    app.command("transcribe")(transcribe_command)
