"""``pyro-blora transcribe``: Monte Carlo transcription of files of any length, with word confidences."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from pyro_blora.commands.options import AudioColumnOption, LanguageColumnOption, TextColumnOption, column_mapping
from pyro_blora.predict.subtitles import output_paths, write_subtitles
from pyro_blora.predict.transcribe import TranscribeOptions, UnreadableInput, transcribe
from pyro_blora.predict.transcripts import render_table, write_jsonl
from pyro_blora.report.plots import plot_confidence, save_figure
from pyro_blora.runs import load_for_transcription

DEFAULTS = TranscribeOptions()
# The exit status of a run that skipped unreadable inputs: the usage-error code every expected failure exits with.
EXIT_SOME_UNREADABLE = 2


def transcribe_command(
    inputs: list[Path] = typer.Argument(..., exists=True, help="audio files, folders of audio files, or one dataset (manifest or saved dataset)"),
    posterior: Path = typer.Option(..., help="posterior folder written by save_posterior / pyro-blora train (runs/x/posterior)"),
    model: Optional[str] = typer.Option(None, help="base Whisper (bundled name, folder or hub id); default: the posterior's metadata base_model"),
    samples: int = typer.Option(DEFAULTS.num_samples, "--samples", "-S", help="posterior samples per utterance"),
    choose: str = typer.Option(DEFAULTS.choose, help="chosen hypothesis: 'mean' (posterior mean) or 'mbr' (minimum Bayes risk over samples)"),
    posterior_temperature: float = typer.Option(DEFAULTS.posterior_temperature, help="scale of the posterior's "
                                                "standard deviations for the draws (2: twice as wide; pairs with --choose mbr)"),
    language: Optional[str] = typer.Option(None, help="language for Whisper (default: the dataset's column, or detection)"),
    split: Optional[str] = typer.Option(None, help="dataset split, when the dataset has several"),
    audio_column: AudioColumnOption = None, text_column: TextColumnOption = None,
    language_column: LanguageColumnOption = None,
    limit: Optional[int] = typer.Option(None, help="transcribe only the first N utterances"),
    batch_size: int = typer.Option(DEFAULTS.batch_size, help="utterances per batch"),
    sequential: bool = typer.Option(False, help="decode the samples one after another instead of in one batched pass"),
    long_form: bool = typer.Option(DEFAULTS.long_form, help="decode audio over 30 s with Whisper's sequential 30 s windows and timestamps "
                                   "(--no-long-form refuses it)"),
    seed: int = typer.Option(DEFAULTS.seed, help="seed of the posterior draws"),
    low_confidence: float = typer.Option(DEFAULTS.low_confidence, help="mark words whose confidence is below this"),
    jsonl: Optional[Path] = typer.Option(None, help="write JSON lines here ('-' for standard output)"),
    srt: Optional[Path] = typer.Option(None, help="write SubRip subtitles: a .srt file (one input) or a folder (one file per input)"),
    vtt: Optional[Path] = typer.Option(None, help="write WebVTT subtitles: a .vtt file (one input) or a folder (one file per input)"),
    plot: Optional[Path] = typer.Option(None, help="word confidence along time: a .png file (one input) or a folder (one PNG per input)"),
    table: bool = typer.Option(True, help=escape("print a table with low-confidence words in [brackets]")),
) -> None:
    """Transcribe under S posterior samples: chosen hypothesis, samples, uncertainty, word confidences;
    recordings over 30 s long-form, with timed segments (JSON lines, SRT, WebVTT). Inputs that cannot be read
    are skipped and listed at the end, and the command then exits with 2 after writing the others."""
    if choose not in ("mean", "mbr"):
        raise typer.BadParameter("use 'mean' or 'mbr'", param_hint="--choose")
    if not posterior_temperature > 0:
        raise typer.BadParameter("must be > 0 (1: the posterior itself, 2: draws twice as wide)",
                                 param_hint="--posterior-temperature")
    options = TranscribeOptions(
        num_samples=samples,
        choose=choose,  # type: ignore[arg-type]
        batch_size=batch_size,
        language=language,
        vectorized=not sequential,
        seed=seed,
        low_confidence=low_confidence,
        long_form=long_form,
        posterior_temperature=posterior_temperature,
    )
    blora, guide, processor = load_for_transcription(posterior, model)
    skipped: list[UnreadableInput] = []
    results = transcribe(blora, guide, processor, [str(p) for p in inputs], options, split=split, limit=limit,
                         skipped=skipped, columns=column_mapping(audio_column, text_column, language_column))
    if jsonl is not None:
        if str(jsonl) == "-":
            write_jsonl(results, sys.stdout)
        else:
            jsonl.parent.mkdir(parents=True, exist_ok=True)
            with jsonl.open("w", encoding="utf-8") as handle:
                write_jsonl(results, handle)
            typer.echo(f"wrote {len(results)} transcripts to {jsonl}", err=True)
    if srt is not None or vtt is not None or plot is not None:
        for kind, target in (("srt", srt), ("vtt", vtt)):
            if target is not None:
                paths = write_subtitles(results, target, kind, low_confidence)
                typer.echo(f"wrote {len(paths)} {kind.upper()} file(s): {', '.join(map(str, paths[:3]))}"
                           + (" ..." if len(paths) > 3 else ""), err=True)
        if plot is not None:
            for transcript, path in zip(results, output_paths(plot, results, ".png")):
                save_figure(plot_confidence(transcript, low_confidence), path)
            typer.echo(f"wrote {len(results)} confidence plot(s) to {plot}", err=True)
    if table:
        Console(stderr=str(jsonl) == "-").print(render_table(results, low_confidence))
    if skipped:
        typer.echo(f"Error: {len(skipped)} of {len(skipped) + len(results)} inputs could not be read "
                   "(the others were written):", err=True)
        for unreadable in skipped:
            typer.echo(f"  {unreadable.reason}", err=True)
        raise typer.Exit(EXIT_SOME_UNREADABLE)


def register(app: typer.Typer) -> None:
    app.command("transcribe")(transcribe_command)
