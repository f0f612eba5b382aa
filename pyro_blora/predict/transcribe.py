"""Transcription of audio files, folders or datasets under S posterior samples, with confidences.

Every utterance gets the chosen hypothesis (posterior mean or minimum Bayes risk), the S sample
hypotheses, an utterance-level uncertainty and a confidence per word of the chosen hypothesis:
the fraction of samples whose hypothesis contains that word at the aligned position. Words are
the scoring tokens of :mod:`pyro_blora.metrics` (CJK characters one by one, other text by
whitespace) and are compared after normalisation, so case and punctuation do not count.

Recordings longer than 30 s are decoded long-form (:mod:`pyro_blora.predict.longform`): Whisper's own
sequential 30 s windows with timestamps, for the posterior mean and for every posterior draw; word
confidences are computed per window and stitched. Shorter clips take the batched short-form pass.

The records and their JSON lines file are :mod:`pyro_blora.predict.transcripts`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import pyro
from tqdm.auto import tqdm

from pyro_blora.data import AudioDecodeError, load_audio, load_speech_dataset
from pyro_blora.data.labels import check_language
from pyro_blora.features import N_SAMPLES, SAMPLING_RATE, log_mel_features, long_form_features
from pyro_blora.model.guide import BLoRAGuide
from pyro_blora.model.whisper import BLoRAWhisper
from pyro_blora.predict.longform import LongFormMonteCarlo, monte_carlo_long_form, window_texts
from pyro_blora.predict.monte_carlo import MonteCarloTranscript, monte_carlo_transcribe
from pyro_blora.predict.transcripts import SegmentTranscript, UtteranceTranscript, segment_word_confidences, word_confidences

__all__ = [
    "AUDIO_SUFFIXES",
    "ClipTooLongError",
    "TranscribeOptions",
    "UnreadableInput",
    "Utterance",
    "collect_utterances",
    "transcribe",
    "transcribe_utterances",
]

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


@dataclass(frozen=True)
class TranscribeOptions:
    """How utterances are decoded and how their confidences are reported."""

    # S, the number of posterior samples per utterance.
    num_samples: int = 8
    # "mean": the posterior-mean hypothesis; "mbr": the sample with minimum Bayes risk.
    choose: Literal["mean", "mbr"] = "mean"
    # Utterances per batch (the vectorised pass decodes S x batch_size rows at once).
    batch_size: int = 4
    # Language given to Whisper; None uses each dataset row's language, or detection for files.
    language: str | None = None
    # Decode the S samples in one batched pass (True) or one after another (False).
    vectorized: bool = True
    # Seed of the posterior draws.
    seed: int = 0
    # Words with a confidence below this are marked in the table.
    low_confidence: float = 0.5
    # Decode recordings over 30 s long-form (Whisper's sequential windows); False refuses them.
    long_form: bool = True
    # Scale of the posterior's standard deviations when drawing (1: the posterior itself). Wider draws
    # (2) made MBR over 16 draws markedly better than the posterior mean in our measurements (RESULTS.md).
    posterior_temperature: float = 1.0
    # Extra keyword arguments for ``generate`` (e.g. {"max_new_tokens": 128}; per window in long-form).
    generate_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}; use --samples 8 or similar")
        if self.choose not in ("mean", "mbr"):
            raise ValueError(f"choose must be 'mean' or 'mbr', got {self.choose!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.low_confidence <= 1.0:
            raise ValueError(f"low_confidence must lie in [0, 1], got {self.low_confidence}")
        if not self.posterior_temperature > 0:
            raise ValueError(f"posterior_temperature must be > 0, got {self.posterior_temperature}; "
                             "use 1 for the posterior itself, 2 for draws twice as wide")


class ClipTooLongError(ValueError):
    """A recording over 30 s was given with long-form decoding turned off."""


@dataclass(frozen=True)
class Utterance:
    """One input: an audio file path or a ``datasets`` audio value, with what is known about it."""

    id: str
    audio: Any
    source: str | None = None
    language: str | None = None
    reference: str | None = None


@dataclass(frozen=True)
class UnreadableInput:
    """An input skipped because its audio cannot be read; ``reason`` is the decoder's message, which names the fix."""

    source: str
    reason: str


# ------------------------------------------------------------------ inputs
def collect_utterances(
    inputs: str | os.PathLike | Sequence[str | os.PathLike], split: str | None = None, limit: int | None = None,
    columns: Mapping[str, str] | None = None,
) -> list[Utterance]:
    """Audio files, folders of audio files (searched recursively) or one dataset, as utterances.

    A dataset is anything ``load_speech_dataset`` reads (a manifest, an audiofolder with
    metadata.csv, a ``save_to_disk`` folder); give ``split`` when it has several, and ``columns``
    (canonical name -> yours) when its columns are not called audio, text and language."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths = [Path(item) for item in inputs]
    if not paths:
        raise ValueError("no inputs: give audio files, folders of audio files, or a dataset")
    missing = [str(path) for path in paths if not path.exists()]
    if missing:
        raise FileNotFoundError(f"input(s) not found: {', '.join(missing)}")
    if len(paths) == 1 and _is_dataset(paths[0]):
        utterances = _dataset_utterances(paths[0], split, columns)
    elif columns:
        raise ValueError("column names (columns=, --audio-column ...) describe a dataset input, a manifest or an "
                         "audiofolder; leave them out for audio files")
    else:
        files: list[Path] = []
        for path in paths:
            if path.is_dir():
                found = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
                if not found:
                    raise ValueError(f"folder {path} holds no audio files ({', '.join(AUDIO_SUFFIXES)})")
                files.extend(found)
            else:
                files.append(path)
        utterances = [Utterance(id=path.name, audio=str(path), source=str(path)) for path in files]
    return utterances[:limit] if limit is not None else utterances


def _is_dataset(path: Path) -> bool:
    if path.is_file():
        return path.suffix.lower() in (".csv", ".tsv", ".jsonl", ".json")
    return any((path / marker).exists() for marker in ("dataset_dict.json", "state.json", "metadata.csv"))


def _dataset_utterances(path: Path, split: str | None, columns: Mapping[str, str] | None) -> list[Utterance]:
    loaded = load_speech_dataset(path, split=split, columns=columns)
    if not hasattr(loaded, "column_names") or isinstance(loaded.column_names, dict):
        raise ValueError(f"{path} has several splits ({', '.join(loaded)}); choose one with split= / --split")
    rows = loaded.select_columns([c for c in ("id", "audio", "text", "language") if c in loaded.column_names])
    return [
        Utterance(
            id=str(row["id"]),
            audio=row["audio"],
            source=(row["audio"] or {}).get("path") if isinstance(row["audio"], dict) else None,
            language=row.get("language") or None,
            reference=row.get("text"),
        )
        for row in rows
    ]


# ------------------------------------------------------------------ transcription
def _batches(utterances: Sequence[Utterance], options: TranscribeOptions) -> Iterator[list[Utterance]]:
    """Consecutive utterances of one language, at most batch_size at a time."""
    batch: list[Utterance] = []
    for utterance in utterances:
        if batch and (len(batch) == options.batch_size or _language(batch[0], options) != _language(utterance, options)):
            yield batch
            batch = []
        batch.append(utterance)
    if batch:
        yield batch


def _language(utterance: Utterance, options: TranscribeOptions) -> str | None:
    return options.language or utterance.language


def _transcript(utterance: Utterance, language: str | None, options: TranscribeOptions, duration: float,
                text: str, samples: list[str], uncertainty: float, mean_token_entropy: float,
                mean_log_prob: float | None, segments: list[SegmentTranscript]) -> UtteranceTranscript:
    """One output line; its words are the segments' words in order."""
    return UtteranceTranscript(
        id=utterance.id,
        source=utterance.source,
        language=language,
        text=text,
        chooser=options.choose,
        num_samples=options.num_samples,
        samples=samples,
        uncertainty=uncertainty,
        mean_token_entropy=mean_token_entropy,
        mean_log_prob=mean_log_prob,
        words=[word for segment in segments for word in segment.words],
        reference=utterance.reference,
        duration=duration,
        segments=segments,
    )


def _record(utterance: Utterance, result: MonteCarloTranscript, language: str | None, options: TranscribeOptions,
            duration: float) -> UtteranceTranscript:
    """A clip of 30 s or less: one segment from 0 to its duration."""
    words = word_confidences(result.chosen, result.hypotheses, language)
    segments = [SegmentTranscript(0.0, duration, result.chosen, words)] if result.chosen else []
    return _transcript(utterance, language, options, duration, result.chosen, list(result.hypotheses),
                       result.disagreement, result.mean_token_entropy, result.mean_log_prob, segments)


def _long_form_record(utterance: Utterance, result: LongFormMonteCarlo, language: str | None,
                      options: TranscribeOptions, duration: float) -> UtteranceTranscript:
    """Word confidences per window of the chosen hypothesis, stitched in order."""
    chosen = result.chosen
    per_sample = [window_texts(chosen, sample) for sample in result.samples]  # [S][window]
    windows = sorted({segment.window for segment in chosen.segments})
    segments = []
    for index, window in enumerate(windows):
        members = [segment for segment in chosen.segments if segment.window == window]
        words = segment_word_confidences([m.text for m in members], [texts[index] for texts in per_sample], language)
        segments.extend(SegmentTranscript(m.start, m.end, m.text, w) for m, w in zip(members, words))
    return _transcript(utterance, language, options, duration, chosen.text, [sample.text for sample in result.samples],
                       result.disagreement, result.mean_token_entropy, result.mean_log_prob, segments)


def _too_long(utterance: Utterance, seconds: float) -> ClipTooLongError:
    return ClipTooLongError(
        f"{utterance.source or utterance.id} is {seconds:.1f} s long and long-form decoding is off; "
        "turn it on (--long-form, TranscribeOptions(long_form=True)) or cut the audio into clips of 30 s or less"
    )


def transcribe_utterances(
    model: BLoRAWhisper,
    guide: BLoRAGuide,
    processor,
    utterances: Sequence[Utterance],
    options: TranscribeOptions = TranscribeOptions(),
    progress: bool = True,
    skipped: list[UnreadableInput] | None = None,
) -> Iterator[UtteranceTranscript]:
    """Transcribe utterances batch by batch under ``options.num_samples`` posterior draws; clips over
    30 s long-form (one after another within the batch's language), shorter ones in one batched pass.

    Given a ``skipped`` list, an utterance whose audio is missing or cannot be decoded goes there and the
    others are still transcribed (one bad file among many costs only itself); without it, it stops the run."""
    if options.language is not None:
        options = replace(options, language=check_language(processor, options.language))
    pyro.set_rng_seed(options.seed)
    device = next(model.whisper.parameters()).device
    dtype = next(model.whisper.parameters()).dtype
    bar = tqdm(total=len(utterances), disable=not progress, desc="transcribe", unit="utt")
    try:
        for given in _batches(utterances, options):
            batch, waveforms = _readable(given, skipped)
            language = _language(batch[0], options) if batch else None
            durations = [round(w.shape[0] / SAMPLING_RATE, 3) for w in waveforms]
            long = [i for i, w in enumerate(waveforms) if w.shape[0] > N_SAMPLES]
            if long and not options.long_form:
                raise _too_long(batch[long[0]], durations[long[0]])
            short = [i for i in range(len(batch)) if i not in long]
            records: dict[int, UtteranceTranscript] = {}
            if short:
                features = log_mel_features(processor.feature_extractor, [waveforms[i] for i in short])
                results = monte_carlo_transcribe(
                    model, guide, features.to(device=device, dtype=dtype), processor.tokenizer,
                    num_samples=options.num_samples, choose=options.choose, vectorized=options.vectorized,
                    language=language, generate_kwargs=options.generate_kwargs,
                    posterior_temperature=options.posterior_temperature,
                )
                records.update({i: _record(batch[i], r, language, options, durations[i]) for i, r in zip(short, results)})
            if long:
                features, mask = long_form_features(processor.feature_extractor, [waveforms[i] for i in long])
                results = monte_carlo_long_form(
                    model, guide, features.to(device=device, dtype=dtype), mask.to(device), processor.tokenizer,
                    num_samples=options.num_samples, choose=options.choose, language=language,
                    generate_kwargs=options.generate_kwargs, posterior_temperature=options.posterior_temperature,
                )
                records.update({i: _long_form_record(batch[i], r, language, options, durations[i]) for i, r in zip(long, results)})
            for i in range(len(batch)):
                yield records[i]
            bar.update(len(given))
    finally:
        bar.close()


def _readable(batch: list[Utterance], skipped: list[UnreadableInput] | None) -> tuple[list[Utterance], list]:
    """The utterances whose audio decodes, with their waveforms; the others go to ``skipped`` (None: raise)."""
    kept, waveforms = [], []
    for utterance in batch:
        try:
            waveforms.append(load_audio(utterance.audio))
        except (AudioDecodeError, FileNotFoundError) as error:
            if skipped is None:
                raise
            skipped.append(UnreadableInput(utterance.source or utterance.id, str(error)))
            continue
        kept.append(utterance)
    return kept, waveforms


def transcribe(
    model: BLoRAWhisper,
    guide: BLoRAGuide,
    processor,
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    options: TranscribeOptions = TranscribeOptions(),
    split: str | None = None,
    limit: int | None = None,
    progress: bool = True,
    skipped: list[UnreadableInput] | None = None,
    columns: Mapping[str, str] | None = None,
) -> list[UtteranceTranscript]:
    """Transcribe audio files, folders or a dataset (see :func:`collect_utterances`); unreadable
    inputs go to ``skipped`` when it is given (see :func:`transcribe_utterances`)."""
    utterances = collect_utterances(inputs, split=split, limit=limit, columns=columns)
    return list(transcribe_utterances(model, guide, processor, utterances, options, progress, skipped))


