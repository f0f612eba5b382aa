"""Build the offline code-switching testbed: text, speech, splits, `DatasetDict`s, manifest and card.

Domains written under the output folder:
- `<pair>` for each code-switched pair (e.g. `zh-en`, `es-en`, `ar-en`): eSpeak, train/dev/test;
- `en`: English read speech with the Piper voice, train/dev/test (its test split is the English part
  of the backward suite);
- `backward-<lang>`: monolingual eSpeak speech in other languages the base model knows, test only, for
  word error and language identification with the language not forced.
- `user-<pair>` from `build_from_text` for users' own transcripts.

Splits of generated text never share a template (see `grammar.split_templates`).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from pyro_blora.testbed.grammar import CodeSwitchSpec, GeneratedSentence, generate_sentences, split_templates
from pyro_blora.testbed.languages import LanguagePair, parse_marked_text, switch_stats
from pyro_blora.testbed.manifest import save_domain, write_card, write_manifest
from pyro_blora.testbed.synthesis import SynthesisJob, Voicing, job_seed, run_job
from pyro_blora.testbed.wordlists import BUILTIN_PAIRS, builtin_spec, english_spec

__all__ = ["TestbedConfig", "build_testbed", "build_from_text", "user_sentences", "SPLITS"]

SPLITS = ("train", "dev", "test")


def _check_sizes(name: str, sizes: Sequence[int]) -> None:
    if len(sizes) != 3 or any(int(s) != s or s < 0 for s in sizes):
        raise ValueError(f"{name} must be three non-negative integers (train, dev, test), got {sizes!r}")


def _check_range(name: str, bounds: Sequence[float], low: float, high: float) -> None:
    if len(bounds) != 2 or not low <= bounds[0] <= bounds[1] <= high:
        raise ValueError(f"{name} must be (min, max) with {low} <= min <= max <= {high}, got {bounds!r}")


@dataclass(frozen=True)
class TestbedConfig:
    """What to build. Defaults take a few minutes on 2 CPU cores; `TestbedConfig.small()` is for tests.

    `pairs` are built-in pair names ("zh-en", "es-en", "ar-en", "de-en", "fr-en") or `CodeSwitchSpec`s.
    Sizes are (train, dev, test). Rates: Piper length scales (> 1 slower) and the eSpeak words-per-minute
    range; eSpeak pitch is 0..100 (50 = voice default). Noise is pink noise at one of `noise_snr_db`,
    added to the given fraction of utterances of each group.
    """

    __test__ = False  # not a pytest test class despite the name

    pairs: tuple[str | CodeSwitchSpec, ...] = ("zh-en", "es-en", "ar-en")
    codeswitch_sizes: tuple[int, int, int] = (400, 100, 100)
    english_sizes: tuple[int, int, int] = (100, 50, 400)
    backward_languages: tuple[str, ...] = ("es", "de", "fr", "zh")
    backward_size: int = 100
    piper_length_scales: tuple[float, ...] = (0.8, 0.9, 1.0, 1.1, 1.25)
    espeak_variants: tuple[str, ...] = ("m1", "m2", "m3", "m4", "m7", "f1", "f2", "f3", "f4")
    espeak_rate_wpm: tuple[int, int] = (140, 200)
    espeak_pitch: tuple[int, int] = (35, 65)
    segment_gap_s: tuple[float, float] = (0.04, 0.12)
    noise_snr_db: tuple[float, ...] = (20.0, 10.0, 5.0)
    english_noise_fraction: float = 0.25
    codeswitch_noise_fraction: float = 0.0
    backward_noise_fraction: float = 0.0
    chunk_size: int = 100

    def __post_init__(self):
        _check_sizes("codeswitch_sizes", self.codeswitch_sizes)
        _check_sizes("english_sizes", self.english_sizes)
        if self.backward_size < 0:
            raise ValueError(f"backward_size must be >= 0, got {self.backward_size}")
        for pair in self.pairs:
            if isinstance(pair, str):
                builtin_spec(pair)
            elif not isinstance(pair, CodeSwitchSpec):
                raise TypeError(f"pairs holds {pair!r}; give a built-in pair name or a CodeSwitchSpec")
        if "en" in self.backward_languages:
            raise ValueError("'en' is not a backward language: the English backward set is the test split of domain 'en'")
        if not self.piper_length_scales or any(not 0.3 <= s <= 3.0 for s in self.piper_length_scales):
            raise ValueError(f"piper_length_scales {self.piper_length_scales} must be non-empty and within 0.3..3.0")
        _check_range("espeak_rate_wpm", self.espeak_rate_wpm, 80, 450)
        _check_range("espeak_pitch", self.espeak_pitch, 0, 100)
        _check_range("segment_gap_s", self.segment_gap_s, 0.0, 2.0)
        for name in ("english_noise_fraction", "codeswitch_noise_fraction", "backward_noise_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if not self.noise_snr_db:
            raise ValueError("noise_snr_db must list at least one SNR in dB (e.g. (20.0, 10.0))")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")

    @classmethod
    def small(cls, **overrides) -> "TestbedConfig":
        """A tiny build (seconds) with every domain present, for tests and smoke runs."""
        settings = dict(
            pairs=("zh-en", "es-en", "ar-en"), codeswitch_sizes=(4, 2, 2), english_sizes=(2, 2, 3),
            backward_languages=("es", "zh"), backward_size=2, chunk_size=8, english_noise_fraction=0.5,
        )
        settings.update(overrides)
        return cls(**settings)

    def settings(self) -> dict[str, object]:
        """Field values for the dataset card, with pairs given by name."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["pairs"] = tuple(spec.name for spec in self.specs())
        return values

    def specs(self) -> list[CodeSwitchSpec]:
        return [builtin_spec(p) if isinstance(p, str) else p for p in self.pairs]

    def voicing(self, engine: str, noise_fraction: float) -> Voicing:
        return Voicing(
            engine=engine, piper_length_scales=self.piper_length_scales, espeak_variants=self.espeak_variants,
            espeak_rate_wpm=self.espeak_rate_wpm, espeak_pitch=self.espeak_pitch, segment_gap_s=self.segment_gap_s,
            noise_fraction=noise_fraction, noise_snr_db=self.noise_snr_db,
        )


@dataclass
class _DomainPlan:
    name: str
    pair: LanguagePair
    voicing: Voicing
    sentences: dict[str, list[GeneratedSentence]] = field(default_factory=dict)
    description: str = ""


def _generated_splits(spec: CodeSwitchSpec, sizes: Sequence[int], seed: int, monolingual: bool = False):
    """Sentences per split from disjoint template sets; also returns the template split."""
    templates = split_templates(len(spec.templates), dict(zip(SPLITS, sizes)), job_seed(seed, spec.name, "templates"))
    sentences: dict[str, list[GeneratedSentence]] = {}
    seen: set[str] = set()
    for split, size in zip(SPLITS, sizes):
        if size == 0:
            continue
        drawn = generate_sentences(spec, size, job_seed(seed, spec.name, split), templates[split], monolingual, seen)
        seen.update(s.text for s in drawn)
        sentences[split] = drawn
    return sentences, templates


def _backward_spec(language: str, specs: list[CodeSwitchSpec]) -> CodeSwitchSpec:
    """Spec whose matrix language is `language`: a built domain's first, else a built-in one."""
    for spec in [*specs, *BUILTIN_PAIRS.values()]:
        if spec.pair.matrix == language:
            return spec
    known = sorted({s.pair.matrix for s in [*specs, *BUILTIN_PAIRS.values()]})
    raise ValueError(
        f"no sentences for backward language {language!r}; built-in ones are {known}. "
        "Add a CodeSwitchSpec with that matrix language to `pairs`"
    )


def _plan(config: TestbedConfig, seed: int) -> list[_DomainPlan]:
    plans: list[_DomainPlan] = []
    specs = config.specs()
    held_out: dict[str, list[int]] = {}
    cs_voicing = config.voicing("espeak", config.codeswitch_noise_fraction)
    for spec in specs:
        plan = _DomainPlan(spec.name, spec.pair, cs_voicing, description="code-switched, eSpeak NG")
        plan.sentences, templates = _generated_splits(spec, config.codeswitch_sizes, seed)
        held_out[spec.pair.matrix] = templates["test"] or templates["dev"] or templates["train"]
        plans.append(plan)
    english = _DomainPlan("en", english_spec().pair, config.voicing("piper", config.english_noise_fraction),
                          description="English read speech, Piper")
    english.sentences, _ = _generated_splits(english_spec(), config.english_sizes, seed)
    plans.append(english)
    for language in config.backward_languages:
        if config.backward_size == 0:
            break
        spec = _backward_spec(language, specs)
        # Where the language is also a trained matrix language, only its held-out templates are used.
        indices = held_out.get(language)
        mono_pair = LanguagePair(language, None, matrix_voice=spec.pair.matrix_voice)
        plan = _DomainPlan(f"backward-{language}", mono_pair, config.voicing("espeak", config.backward_noise_fraction),
                           description="monolingual backward probe, eSpeak NG")
        plan.sentences = {"test": generate_sentences(
            spec, config.backward_size, job_seed(seed, "backward", language), indices, monolingual=True)}
        plans.append(plan)
    return plans


def _jobs(plans: list[_DomainPlan], config: TestbedConfig, seed: int) -> list[SynthesisJob]:
    jobs = []
    for plan in plans:
        for split, sentences in plan.sentences.items():
            for chunk, start in enumerate(range(0, len(sentences), config.chunk_size)):
                jobs.append(SynthesisJob(
                    domain=plan.name, split=split, chunk=chunk, seed=job_seed(seed, plan.name, split, chunk),
                    pair=plan.pair, voicing=plan.voicing,
                    sentences=tuple(sentences[start : start + config.chunk_size]), first_index=start,
                ))
    return jobs


def _synthesize(jobs: list[SynthesisJob]) -> tuple[dict[tuple[str, str], list[dict]], dict[str, dict[str, float]]]:
    """Rows per (domain, split), and per engine the seconds of audio made and of wall-clock time spent."""
    rows: dict[tuple[str, str], list[dict]] = {}
    timing: dict[str, dict[str, float]] = {}
    with tqdm(total=sum(len(job.sentences) for job in jobs), desc="synthesising", unit="utt") as progress:
        for job in jobs:
            start = time.perf_counter()
            job_rows = run_job(job, progress.update)
            engine = timing.setdefault(job.voicing.engine, {"audio_s": 0.0, "wall_s": 0.0})
            engine["wall_s"] += time.perf_counter() - start
            engine["audio_s"] += sum(row["duration_s"] for row in job_rows)
            rows.setdefault((job.domain, job.split), []).extend(job_rows)
    for engine in timing.values():
        engine["x_real_time"] = engine["audio_s"] / engine["wall_s"] if engine["wall_s"] else 0.0
    return rows, timing


def _save(plans: list[_DomainPlan], synthesized, out_dir: Path, config: TestbedConfig, seed: int) -> dict[str, Path]:
    rows, timing = synthesized
    paths: dict[str, Path] = {}
    for plan in plans:
        splits = {split: rows[(plan.name, split)] for split in plan.sentences if (plan.name, split) in rows}
        paths[plan.name] = save_domain(out_dir / plan.name, splits)
    descriptions = {plan.name: plan.description for plan in plans}
    write_manifest(out_dir, rows, timing)
    write_card(out_dir, rows, descriptions, config.settings(), seed, timing)
    return paths


def _prepare_out_dir(out_dir: str | Path, overwrite: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output folder {out} is not empty; choose another folder or pass overwrite=True")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def build_testbed(
    out_dir: str | Path, config: TestbedConfig = TestbedConfig(), seed: int = 0, overwrite: bool = False
) -> dict[str, Path]:
    """Generate, synthesise and save every domain; returns domain name -> folder of its `DatasetDict`.

    The same config and seed give the same text and the same audio bytes.
    """
    out = _prepare_out_dir(out_dir, overwrite)
    plans = _plan(config, seed)
    return _save(plans, _synthesize(_jobs(plans, config, seed)), out, config, seed)


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"transcript file {path} does not exist; give a UTF-8 text file, one utterance per line")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise ValueError(f"transcript file {path} has no utterances (blank lines and lines starting with # are skipped)")
    return lines


def user_sentences(lines: Sequence[str], pair: LanguagePair) -> list[GeneratedSentence]:
    """Sentences from users' transcripts (markup `[en: words]` marks switches; see `languages`)."""
    out = []
    for number, line in enumerate(lines):
        segments = tuple(parse_marked_text(line, pair))
        out.append(GeneratedSentence(segments, f"user/l{number:05d}", switch_stats(segments, pair.matrix)))
    return out


def _pair_from_name(name: str) -> LanguagePair:
    """"en", a built-in pair, or any "<matrix>-<embedded>" pair of Whisper codes (eSpeak voices by language)."""
    if name in BUILTIN_PAIRS:
        return BUILTIN_PAIRS[name].pair
    parts = name.split("-")
    if len(parts) == 1:
        return LanguagePair(parts[0], None)
    if len(parts) != 2:
        raise ValueError(f"pair {name!r} should look like 'es-en' (matrix-embedded) or 'en'")
    return LanguagePair(parts[0], parts[1])


def build_from_text(
    text_file: str | Path,
    out_dir: str | Path,
    pair: str | LanguagePair = "en",
    config: TestbedConfig = TestbedConfig(),
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Speak a user's transcripts (one per line) for a pair, or for English with Piper; returns the domain folder.

    `pair` is "en", a built-in pair, any "<matrix>-<embedded>" pair eSpeak speaks (e.g. "it-en"), a single
    language for monolingual eSpeak speech (e.g. "de"), or a `LanguagePair` with chosen voices.

    Lines are shared out to train/dev/test in the proportions of the config's sizes for that kind of domain
    (`english_sizes` or `codeswitch_sizes`); each line is its own template, so splits never share a line.
    """
    if isinstance(pair, str):
        pair = _pair_from_name(pair)
    english = pair.matrix == "en" and pair.embedded is None
    lines = _read_lines(Path(text_file))
    sentences = user_sentences(lines, pair)
    sizes = config.english_sizes if english else config.codeswitch_sizes
    assignment = split_templates(len(sentences), dict(zip(SPLITS, sizes)), job_seed(seed, "user", pair.name))
    name = f"user-{pair.name}"
    noise = config.english_noise_fraction if english else config.codeswitch_noise_fraction
    plan = _DomainPlan(name, pair, config.voicing("piper" if english else "espeak", noise),
                       description="user transcripts, " + ("Piper" if english else "eSpeak NG"))
    plan.sentences = {split: [sentences[i] for i in assignment[split]] for split in SPLITS if assignment[split]}
    out = _prepare_out_dir(out_dir, overwrite)
    return _save([plan], _synthesize(_jobs([plan], config, seed)), out, config, seed)[name]
