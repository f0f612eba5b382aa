"""Saving the testbed: `DatasetDict`s per domain, a manifest of every row, and the dataset card.

Audio is stored as WAV bytes in a `datasets.Audio(sampling_rate=16000)` column. Read it with
`ds.cast_column("audio", datasets.Audio(decode=False))` and decode with `soundfile`, so that
torchcodec (which `datasets` uses to decode) is never needed.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Mapping

import numpy as np

from pyro_blora.markdown import markdown_table

__all__ = ["DATASET_COLUMNS", "save_domain", "split_statistics", "testbed_domains", "write_manifest", "write_card"]

# What `save_to_disk` writes into a DatasetDict's folder: how a testbed's domain folders are told apart.
_DATASET_DICT_FILE = "dataset_dict.json"

# Row fields stored in the datasets, in order; `embedded_runs` and `n_tokens` only feed the statistics.
DATASET_COLUMNS = (
    "id", "audio", "text", "language", "languages", "domain", "voice", "rate", "pitch", "noise_snr_db",
    "n_switches", "embedded_fraction", "template_id", "duration_s",
)
_MANIFEST_COLUMNS = ("split",) + tuple(c for c in DATASET_COLUMNS if c != "audio")


def _features():
    import datasets

    return datasets.Features({
        "id": datasets.Value("string"),
        "audio": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
        "text": datasets.Value("string"),
        "language": datasets.Value("string"),
        "languages": datasets.Value("string"),
        "domain": datasets.Value("string"),
        "voice": datasets.Value("string"),
        "rate": datasets.Value("float64"),
        "pitch": datasets.Value("float64"),
        "noise_snr_db": datasets.Value("float64"),
        "n_switches": datasets.Value("int32"),
        "embedded_fraction": datasets.Value("float64"),
        "template_id": datasets.Value("string"),
        "duration_s": datasets.Value("float64"),
    })


def save_domain(folder: Path, splits: Mapping[str, list[dict]]) -> Path:
    """One `DatasetDict` (split -> Dataset) saved with `save_to_disk`."""
    import datasets

    features = _features()
    built = {}
    for split, rows in splits.items():
        columns = {name: [row[name] for row in rows] for name in DATASET_COLUMNS}
        # Built as a plain struct and cast: encoding through `Audio` would need torchcodec.
        dataset = datasets.Dataset.from_dict(columns, features=features)
        built[split] = dataset.cast_column("audio", datasets.Audio(sampling_rate=16_000))
    datasets.DatasetDict(built).save_to_disk(str(folder))
    return folder


def testbed_domains(out_dir: str | Path) -> list[str]:
    """The domains of a built testbed (its folders written by :func:`save_domain`), sorted by name."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"testbed folder {out_dir} does not exist; build one with `pyro-blora testbed --out {out_dir}`")
    return sorted(p.name for p in out_dir.iterdir() if (p / _DATASET_DICT_FILE).is_file())


def split_statistics(rows: list[dict]) -> dict:
    """Size, duration and code-switching statistics of one split."""
    tokens = sum(row["n_tokens"] for row in rows)
    embedded_tokens = sum(sum(row["embedded_runs"]) for row in rows)
    runs = [n for row in rows for n in row["embedded_runs"]]
    switches = [row["n_switches"] for row in rows]
    return {
        "utterances": len(rows),
        "hours": round(sum(row["duration_s"] for row in rows) / 3600.0, 4),
        "mean_duration_s": round(float(np.mean([row["duration_s"] for row in rows])), 2) if rows else 0.0,
        "templates": len({row["template_id"] for row in rows}),
        "voices": len({row["voice"] for row in rows}),
        "noisy_fraction": round(sum(row["noise_snr_db"] is not None for row in rows) / max(1, len(rows)), 3),
        "switches_per_utterance": round(float(np.mean(switches)), 3) if rows else 0.0,
        "words_per_switch": round(float(np.mean(runs)), 3) if runs else 0.0,
        "embedded_token_fraction": round(embedded_tokens / tokens, 4) if tokens else 0.0,
        "embedded_fraction_range": [round(min(r["embedded_fraction"] for r in rows), 3),
                                    round(max(r["embedded_fraction"] for r in rows), 3)] if rows else [0.0, 0.0],
    }


def _statistics(rows: Mapping[tuple[str, str], list[dict]]) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for (domain, split), split_rows in sorted(rows.items()):
        out.setdefault(domain, {})[split] = split_statistics(split_rows)
    return out


def write_manifest(out_dir: Path, rows: Mapping[tuple[str, str], list[dict]], timing: Mapping[str, dict] | None = None) -> None:
    """`manifest.csv` (one line per utterance, no audio) and `manifest.json` (statistics, synthesis speed
    per engine, and the same rows)."""
    records = [
        {"split": split, **{c: row[c] for c in _MANIFEST_COLUMNS if c != "split"}}
        for (_, split), split_rows in sorted(rows.items()) for row in split_rows
    ]
    with open(out_dir / "manifest.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=_MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(records)
    (out_dir / "manifest.json").write_text(
        json.dumps({"statistics": _statistics(rows), "synthesis_speed": dict(timing or {}), "rows": records}, ensure_ascii=False, indent=1), encoding="utf-8"
    )


_CARD_HEAD = """# Offline code-switching testbed

Synthetic speech for adapting Whisper to code-switched speech and measuring what it forgets.
Built offline by `pyro_blora.testbed.build_testbed` (seed {seed}). Every folder below is a
`datasets.DatasetDict` saved with `save_to_disk`.

## How it was made
- **Text.** Sentences are drawn from hand-written templates with word slots. English read speech uses
  {n_en_templates} templates, hand-written word lists and vocabulary taken from `wordfreq`'s frequency
  list by suffix. Code-switched sentences are matrix-language templates (Chinese, Spanish, Egyptian Arabic)
  whose slots are filled either in the matrix language or with English words and short phrases; sentences
  whose English token fraction or number of switch points falls outside the configured ranges are redrawn.
  Transcripts use simplified Chinese characters or Arabic script plus English words in Latin letters.
- **Held-out structure.** The template inventory of each domain is split between train, dev and test:
  no `template_id` appears in two splits, so dev and test sentences have structures never seen in training.
  Monolingual backward sets of a language that is also a matrix language use only its test templates.
- **Speech.** English: Piper {piper_version} with the `en_US-joe-medium` voice (one male US speaker), length scale drawn
  from {length_scales}. Everything else: eSpeak NG {espeak_version} through its C API, voice variant drawn
  from {variants}, rate {rates} words per minute, pitch {pitches} (0-100). Code-switched utterances are spoken
  segment by segment, each with its language's eSpeak voice (same variant, rate and pitch) and joined with
  gaps of {gaps} s (random in that range). Audio is 16 kHz mono 16-bit WAV.
- **Noise.** Pink noise at an SNR drawn from {snrs} dB on a fraction of utterances (column `noise_snr_db`).
- **Determinism.** The same configuration and seed give the same text and the same audio bytes.

## Loading
`datasets` 5 decodes `Audio` columns with torchcodec, so a plain `load_from_disk(...)["test"][0]` raises
`ImportError` wherever torchcodec does not load (its PyPI wheel needs CUDA libraries). Read the WAV bytes
instead, with `soundfile` (its wheel bundles libsndfile); nothing else is needed:
```python
import datasets, io, soundfile
ds = datasets.load_from_disk("<this folder>/zh-en")["test"].cast_column("audio", datasets.Audio(decode=False))
audio, rate = soundfile.read(io.BytesIO(ds[0]["audio"]["bytes"]))
```
Columns: `id`, `audio`, `text`, `language` (the language to give Whisper: the matrix language), `languages`
(e.g. `zh+en`), `domain`, `voice`, `rate` (relative to the engine's default speed), `pitch` (eSpeak 0-100;
empty for Piper), `noise_snr_db` (empty when clean), `n_switches` (language changes in the utterance),
`embedded_fraction` (share of tokens in the embedded language; Chinese counts one token per character),
`template_id`, `duration_s`. `manifest.csv` lists every utterance without audio; `manifest.json` adds the
statistics below.

## Domains and statistics
`words/switch` is the mean length in tokens of an embedded stretch; `English tokens` is the token-weighted
share of embedded (English) tokens.

"""

_CARD_TAIL = """
The backward suite is the `test` split of `en` (English, Piper, with rate variation and noise) plus the
`backward-*` folders (monolingual eSpeak speech). Their `language` column holds the true language, for
language-identification accuracy with the language not forced.

## Limits
- eSpeak NG is a formant synthesiser: robotic, far from human code-switched speech. Error rates on it
  measure adaptation to this synthetic domain, not to SEAME, Fisher or ArzEn.
- One Piper voice is one speaker; English results say nothing about speaker variation.
- Sentences are template-generated: grammatical but often odd in meaning, with a small vocabulary per slot,
  no disfluencies, and English insertions only where a template has a slot.
- Switch points sit at slot boundaries and each segment is spoken by a separate voice, so prosody across a
  switch is discontinuous.

## Configuration
```
{config}
```
"""


def write_card(
    out_dir: Path,
    rows: Mapping[tuple[str, str], list[dict]],
    descriptions: Mapping[str, str],
    settings: Mapping[str, object],
    seed: int,
    timing: Mapping[str, dict] | None = None,
) -> None:
    """README.md: how the data was made, its switch statistics, and its limits."""
    from pyro_blora.testbed.tts import espeak_engine
    from pyro_blora.testbed.wordlists import english_spec

    head = _CARD_HEAD.format(
        seed=seed, n_en_templates=len(english_spec().templates), espeak_version=espeak_engine().version,
        piper_version=_package_version("piper-tts"), length_scales=settings["piper_length_scales"],
        variants=", ".join(settings["espeak_variants"]), rates=settings["espeak_rate_wpm"],
        pitches=settings["espeak_pitch"], gaps=settings["segment_gap_s"], snrs=settings["noise_snr_db"],
    )
    config_text = "TestbedConfig(" + ", ".join(f"{k}={v!r}" for k, v in settings.items()) + ")"
    table = [
        {"domain": domain, "split": split, "what": descriptions.get(domain, ""), "utterances": s["utterances"],
         "hours": f"{s['hours']:.3f}", "templates": s["templates"], "voices": s["voices"],
         "noisy": f"{s['noisy_fraction']:.2f}", "switches/utt": f"{s['switches_per_utterance']:.2f}",
         "words/switch": f"{s['words_per_switch']:.2f}", "English tokens": f"{s['embedded_token_fraction']:.3f}"}
        for domain, splits in _statistics(rows).items() for split, s in splits.items()
    ]
    lines = [markdown_table(table)]
    speed = "".join(
        f"\n- {engine}: {t['audio_s']:.0f} s of audio in {t['wall_s']:.0f} s ({t['x_real_time']:.0f}x real time)"
        for engine, t in sorted((timing or {}).items())
    )
    if speed:
        lines.append("\nSynthesis speed when this copy was built (including resampling and noise):" + speed)
    text = head + "\n".join(lines) + "\n" + _CARD_TAIL.format(config=config_text)
    (out_dir / "README.md").write_text(text, encoding="utf-8")


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "(not installed)"
