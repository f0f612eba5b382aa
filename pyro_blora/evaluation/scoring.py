"""Forward and backward evaluation of a Whisper model on the testbed's domains.

For every domain: greedy error rate with the language forced (WER, or the mixed error rate for CJK
text), teacher-forced cross-entropy per transcript token (a finer measure of forgetting than error
rates), and for the backward sets language-ID accuracy with the language *not* forced (the model's
own detection). Each domain's entry keeps per-utterance records (``per_utterance``) from which
every aggregate is a ratio of sums, so that paired bootstrap intervals
(:mod:`pyro_blora.metrics.bootstrap`) can compare two models on the same utterances. Any model is evaluated as a plain ``WhisperForConditionalGeneration``: the base
model, a merged posterior mean, a merged peft adapter or a fully fine-tuned model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import datasets
import torch
from tqdm.auto import tqdm
from transformers import WhisperForConditionalGeneration

from pyro_blora.data import PreparedSpeechDataset, SpeechCollator, decoder_start_token_id, is_english_only
from pyro_blora.data import load_speech_dataset, prepare_dataset
from pyro_blora.data.manifest import AUDIOFOLDER_METADATA
from pyro_blora.predict.decoding import generate, greedy_generate_kwargs
from pyro_blora.model.encoder_window import encoder_input_frames
from pyro_blora.model.objective import UtteranceNLL, token_nll_per_utterance
from pyro_blora.metrics import corpus_rate, language_error_counts

__all__ = [
    "CE_SCOPE",
    "EvalOptions",
    "EvalSet",
    "all_token_ce",
    "ce_scope",
    "evaluate_whisper",
    "greedy_transcripts",
    "load_eval_sets",
    "load_eval_source",
    "relative_changes",
    "detects_language",
]

# What ``ce`` covers in results written now: the transcript tokens (text and end of text). Results
# without ``ce_scope`` were written before it and their ``ce`` covered every label token ("all").
CE_SCOPE = "transcript"
OLD_CE_SCOPE = "all"

# Decoder positions Whisper has; the forced prompt takes a few of them.
_MAX_DECODER_POSITIONS = 448


@dataclass(frozen=True)
class EvalOptions:
    """How a model is scored."""

    # Utterances decoded together by greedy search.
    batch_size: int = 8
    # Greedy decoding on the first this many utterances of each set (None: all; 0: none, CE only).
    decode_limit: int | None = None
    # Tokens allowed beyond the longest reference of a batch.
    extra_new_tokens: int = 8
    # Language identification (language not forced) on the sets that ask for it.
    language_id: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.decode_limit is not None and self.decode_limit < 0:
            raise ValueError(f"decode_limit must be >= 0 or None, got {self.decode_limit}")
        if self.extra_new_tokens < 0:
            raise ValueError(f"extra_new_tokens must be >= 0, got {self.extra_new_tokens}")


@dataclass
class EvalSet:
    """One domain's split, prepared (features and labels) once for every model evaluated on it."""

    name: str
    prepared: datasets.Dataset
    # Score language-ID accuracy (language not forced) on this set.
    language_id: bool = False
    dataset: PreparedSpeechDataset = field(init=False)

    def __post_init__(self) -> None:
        self.dataset = PreparedSpeechDataset(self.prepared)

    def __len__(self) -> int:
        return len(self.prepared)


def detects_language(domain: str) -> bool:
    """Language ID is scored on the monolingual sets: English and the ``backward-*`` probes."""
    return domain == "en" or domain.startswith("backward-")


def load_eval_sets(
    testbed: str | Path,
    domains: Sequence[str],
    processor,
    split: str = "test",
    limit: int | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, EvalSet]:
    """The given domains' ``split`` (falling back to ``test`` for test-only sets) from a testbed folder,
    each cut to its first ``limit`` utterances and prepared for ``processor``."""
    sets = {}
    for domain in domains:
        folder = Path(testbed) / domain
        if not folder.is_dir():
            raise FileNotFoundError(
                f"domain {domain!r} is not in {testbed} (no folder {folder}); build it with `pyro-blora testbed` "
                f"or choose among {sorted(p.name for p in Path(testbed).iterdir() if p.is_dir())}"
            )
        splits = load_speech_dataset(folder)
        chosen = split if split in splits else "test"
        sets[domain] = _eval_set(domain, splits[chosen], processor, limit, cache_dir)
    return sets


def load_eval_source(
    source: str | Path,
    processor,
    split: str | None = None,
    name: str | None = None,
    columns: Mapping[str, str] | None = None,
    limit: int | None = None,
    cache_dir: str | Path | None = None,
    language_id: bool | None = None,
) -> dict[str, EvalSet]:
    """One set from any source ``load_speech_dataset`` reads (an audiofolder or its metadata file, a
    manifest, a saved dataset, a Hub id), so a user's own test data is scored like a testbed domain.

    ``split`` None takes the source's only split, or its ``test`` split; the set is called ``name``, or
    after the source (a folder's or file's name, an audiofolder metadata file's folder, a Hub id).
    ``language_id``: whether each utterance's detected language is scored against its language (a
    monolingual set); None decides by the name, as for testbed domains."""
    loaded = load_speech_dataset(source, split=split, columns=columns)
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) == 1:
            loaded = next(iter(loaded.values()))
        elif "test" in loaded:
            loaded = loaded["test"]
        else:
            raise ValueError(f"{source} has the splits {', '.join(loaded)} and none is called test; choose one "
                             "with split= (--split)")
    name = name or _source_name(source)
    return {name: _eval_set(name, loaded, processor, limit, cache_dir, language_id)}


def _eval_set(name: str, rows: datasets.Dataset, processor, limit: int | None, cache_dir,
              language_id: bool | None = None) -> EvalSet:
    """``rows`` cut to the first ``limit`` and prepared for ``processor``."""
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    prepared, _ = prepare_dataset(rows, processor, cache_dir=cache_dir)
    return EvalSet(name, prepared, language_id=detects_language(name) if language_id is None else language_id)


def _source_name(source: str | Path) -> str:
    path = Path(source).expanduser()
    if path.is_file():
        return path.resolve().parent.name if path.name in AUDIOFOLDER_METADATA else path.stem
    return path.resolve().name if path.exists() else str(source)


def _batches(items: Sequence[int], size: int) -> list[list[int]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def _language_names(whisper) -> dict[int, str]:
    lang_to_id = getattr(whisper.generation_config, "lang_to_id", None) or {}
    return {int(token_id): token.strip("<|>") for token, token_id in lang_to_id.items()}


@torch.no_grad()
def _decode(whisper, processor, eval_set: EvalSet, indices: list[int], options: EvalOptions) -> dict[str, Any]:
    """Greedy transcripts with the language forced, and detected languages where asked."""
    collate = SpeechCollator(decoder_start_token_id(processor.tokenizer), n_frames=encoder_input_frames(whisper))
    multilingual = not is_english_only(processor.tokenizer)
    names = _language_names(whisper) if multilingual else {}
    hypotheses, detected = [], []
    rows = eval_set.prepared.select(indices)
    languages, texts = rows["language"], rows["text"]
    order = _batches(indices, options.batch_size)
    for batch_indices in tqdm(order, desc=f"decode {eval_set.name}", disable=not options.progress, leave=False):
        batch = collate([eval_set.dataset[i] for i in batch_indices])
        labels = batch["labels"]
        # Labels hold the forced prompt after <|startoftranscript|> (language, task, no-timestamps), which
        # is not generated.
        longest = int((labels != -100).sum(1).max()) - (3 if multilingual else 1)
        new_tokens = min(max(1, longest) + options.extra_new_tokens, _MAX_DECODER_POSITIONS - 4)
        kwargs = greedy_generate_kwargs(whisper, multilingual, new_tokens)
        batch_languages = {languages[indices.index(i)] for i in batch_indices}
        features = batch["input_features"].to(next(whisper.parameters()).device, next(whisper.parameters()).dtype)
        if multilingual:
            if len(batch_languages) == 1:
                kwargs.update(language=batch_languages.pop(), task="transcribe")
            else:
                kwargs.update(language=[languages[indices.index(i)] for i in batch_indices], task="transcribe")
        ids = generate(whisper, features, **kwargs)
        hypotheses.extend(t.strip() for t in processor.tokenizer.batch_decode(ids, skip_special_tokens=True))
        if multilingual and eval_set.language_id and options.language_id:
            found = whisper.detect_language(features)
            detected.extend(names.get(int(token), "?") for token in found.flatten().tolist())
    return {"hypotheses": hypotheses, "references": list(texts), "languages": list(languages), "detected": detected}


def greedy_transcripts(whisper, processor, eval_set: EvalSet, batch_size: int = 8) -> list[str]:
    """Greedy transcripts of every utterance of ``eval_set`` with each row's language forced."""
    was_training = whisper.training
    whisper.eval()
    try:
        options = EvalOptions(batch_size=batch_size, language_id=False, progress=False)
        return _decode(whisper, processor, eval_set, list(range(len(eval_set))), options)["hypotheses"]
    finally:
        whisper.train(was_training)


def _teacher_forced_ce(whisper, processor, eval_set: EvalSet, options: EvalOptions) -> UtteranceNLL:
    collate = SpeechCollator(decoder_start_token_id(processor.tokenizer), n_frames=encoder_input_frames(whisper))
    chunks = _batches(list(range(len(eval_set))), options.batch_size)
    bar = tqdm(chunks, desc=f"CE {eval_set.name}", disable=not options.progress, leave=False)
    return token_nll_per_utterance(whisper, (collate([eval_set.dataset[i] for i in chunk]) for chunk in bar))


def _ce_fields(scored: UtteranceNLL) -> dict[str, Any]:
    """``ce`` per transcript token, ``prompt_ce`` per prompt token and ``ce_all_tokens`` over both."""
    fields: dict[str, Any] = {"ce_scope": CE_SCOPE, "ce_all_tokens": scored.mean("all")}
    for name, tokens in (("ce", "transcript"), ("prompt_ce", "prompt")):
        if scored.totals(tokens)[1]:
            fields[name] = scored.mean(tokens)
    return fields


def evaluate_whisper(
    whisper: WhisperForConditionalGeneration,
    processor,
    sets: Mapping[str, EvalSet],
    options: EvalOptions = EvalOptions(),
    keep_transcripts: bool = False,
) -> dict[str, dict[str, Any]]:
    """Per domain: ``ce`` (teacher-forced, nats per transcript token; ``ce_all_tokens`` and
    ``prompt_ce`` beside it), ``error_rate`` with its ``unit`` and the number of ``decoded``
    utterances, ``language_id`` accuracy where the set asks for it, and ``per_utterance`` records:
    ``ids``, ``ce_sum``/``ce_tokens`` and ``prompt_ce_sum``/``prompt_tokens`` for every utterance,
    ``errors``/``ref_tokens`` and ``language_id_hit`` (0/1) for the first ``decoded`` ones."""
    was_training = whisper.training
    whisper.eval()
    results: dict[str, dict[str, Any]] = {}
    try:
        for name, eval_set in sets.items():
            scored = _teacher_forced_ce(whisper, processor, eval_set, options)
            entry: dict[str, Any] = {"utterances": len(eval_set), **_ce_fields(scored)}
            records: dict[str, list] = {"ids": scored.ids, "ce_sum": scored.ce_sum, "ce_tokens": scored.ce_tokens,
                                        "prompt_ce_sum": scored.prompt_ce_sum, "prompt_tokens": scored.prompt_tokens}
            limit = len(eval_set) if options.decode_limit is None else min(options.decode_limit, len(eval_set))
            if limit:
                decoded = _decode(whisper, processor, eval_set, list(range(limit)), options)
                language = decoded["languages"][0]
                counts, entry["unit"] = language_error_counts(decoded["references"], decoded["hypotheses"], language)
                entry["error_rate"] = corpus_rate(counts)
                entry["decoded"] = limit
                records["errors"] = [c.errors for c in counts]
                records["ref_tokens"] = [c.reference_length for c in counts]
                if decoded["detected"]:
                    hits = [int(d == ref) for d, ref in zip(decoded["detected"], decoded["languages"])]
                    entry["language_id"] = sum(hits) / len(hits)
                    entry["detected"] = dict(sorted(_count(decoded["detected"]).items(), key=lambda kv: -kv[1]))
                    records["language_id_hit"] = hits
                if keep_transcripts:
                    entry["transcripts"] = [
                        {"reference": r, "hypothesis": h} for r, h in zip(decoded["references"], decoded["hypotheses"])
                    ]
            entry["per_utterance"] = records
            results[name] = entry
    finally:
        whisper.train(was_training)
    return results


def _count(values: Sequence[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


METRICS = ("error_rate", "ce", "ce_all_tokens", "language_id")


def ce_scope(entry: Mapping) -> str:
    """What an entry's ``ce`` covers: "transcript", or "all" (every label token) for older results."""
    return entry.get("ce_scope", OLD_CE_SCOPE)


def all_token_ce(entry: Mapping) -> float | None:
    """CE over every label token, which results of either scope have."""
    if "ce_all_tokens" in entry:
        return float(entry["ce_all_tokens"])
    return float(entry["ce"]) if "ce" in entry and ce_scope(entry) == OLD_CE_SCOPE else None


def _metric(entry: Mapping, metric: str) -> float | None:
    if metric == "ce_all_tokens":
        return all_token_ce(entry)
    return float(entry[metric]) if metric in entry else None


def relative_changes(result: Mapping[str, Mapping], reference: Mapping[str, Mapping]) -> dict[str, dict[str, float]]:
    """(value - reference) / reference for every metric both results have, per domain. ``ce`` is
    compared only between results of the same CE scope; ``ce_all_tokens`` between any two."""
    changes: dict[str, dict[str, float]] = {}
    for domain, entry in result.items():
        other = reference.get(domain, {})
        for metric in METRICS:
            if metric == "ce" and ce_scope(entry) != ce_scope(other):
                continue
            value, base = _metric(entry, metric), _metric(other, metric)
            if value is not None and base is not None:
                change = (value - base) / base if base else (0.0 if value == base else math.inf)
                changes.setdefault(domain, {})[metric] = change
    return changes
