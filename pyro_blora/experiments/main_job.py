"""The library's whole answer end to end: testbed, LoRA and BLoRA, forgetting on synthetic and real
English, frontier, forgetting budget, Monte Carlo transcripts, posterior, report.

:func:`run_main_job` is ``pyro-blora main``. Every stage is done unless its output exists (a run
trains unless finished, an evaluation is read back when its file exists; :mod:`~pyro_blora.experiments.step`),
so the job resumes after a crash where it stopped. The pieces live in their own modules: the post-hoc
λ in :mod:`~pyro_blora.experiments.post_hoc`, transcripts and posterior in
:mod:`~pyro_blora.experiments.posterior_outputs`, the page in :mod:`~pyro_blora.experiments.main_job_report`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import datasets

from pyro_blora.base_models.loading import load_processor
from pyro_blora.checkpoint import atomic_write_json
from pyro_blora.config import ALL_LINEAR_TARGETS, BLoRAConfig, RetentionBudget, TrainConfig
from pyro_blora.data.training_data import load_training_data
from pyro_blora.evaluation.scoring import EvalOptions, EvalSet, load_eval_sets, load_eval_source
from pyro_blora.experiments.main_job_report import write_main_job_report
from pyro_blora.experiments.post_hoc import ensure_budget_export, ensure_frontier
from pyro_blora.experiments.posterior_outputs import ensure_posterior_summary, ensure_transcripts
from pyro_blora.experiments.step import ensure_evaluated, ensure_trained, run_evaluation
from pyro_blora.model.encoder_window import window_frames
from pyro_blora.predict.transcribe import TranscribeOptions
from pyro_blora.runs import METHODS, eval_file_name
from pyro_blora.testbed import TestbedConfig, build_testbed
from pyro_blora.training.methods import run_training

__all__ = [
    "ALL_LINEAR_TARGETS",
    "MAIN_TESTBED",
    "REAL_ENGLISH",
    "REAL_SPEECH",
    "MainJobConfig",
    "ensure_testbed",
    "load_curve_sets",
    "load_real_english",
    "run_main_job",
]

# The main job's testbed: one code-switched domain, English and one backward language.
MAIN_TESTBED = TestbedConfig(
    pairs=("zh-en",),
    codeswitch_sizes=(200, 40, 40),
    english_sizes=(10, 40, 40),
    backward_languages=("es",),
    backward_size=30,
)
# Real recordings that travel with the project (data/real-speech/README.md: sources and licences).
REAL_SPEECH = Path(__file__).resolve().parents[2] / "data" / "real-speech"
# The evaluation domain the real English recordings are scored as.
REAL_ENGLISH = "real-en"


def ensure_testbed(folder: str | Path, config: TestbedConfig, seed: int = 0) -> Path:
    """Build the testbed into ``folder``, or reuse it when it was built with the same config and seed."""
    folder = Path(folder)
    stamp = folder / "build-config.json"
    wanted = json.loads(json.dumps({"settings": config.settings(), "seed": seed}, default=str))
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return folder
    build_testbed(folder, config, seed=seed, overwrite=True)
    atomic_write_json(stamp, wanted)
    return folder


@dataclass(frozen=True)
class MainJobConfig:
    """What ``pyro-blora main`` runs. Defaults are sized to fit in 30 minutes on 2 CPU cores (README's
    command table gives the estimate)."""

    out: Path = Path("main-job")
    # The base model: the multilingual Whisper base shipped in PyPI packages.
    model: str = "base"
    # The code-switched domain adapted to, and the testbed domains evaluated (in-domain first).
    domain: str = "zh-en"
    eval_domains: tuple[str, ...] = ("zh-en", "en", "backward-es")
    methods: tuple[str, ...] = ("lora", "blora")
    testbed: TestbedConfig = MAIN_TESTBED
    testbed_seed: int = 0
    # BLoRA: the converged preset (the paper's prior, KL per matrix, on every linear layer; rank 32,
    # alpha 64). LoRA uses the same adapters.
    blora: BLoRAConfig = BLoRAConfig.converged()
    # BLoRA's training: the converged preset (the paper's AdamW, flipout; scales at 30x the rate).
    # Trained at a 10 s encoder window (every testbed clip is shorter), about 5x cheaper than 30 s.
    # LoRA: the same with the paper's scale rate (it has no scales), i.e. TrainConfig.paper (train_for).
    train: TrainConfig = TrainConfig.converged(
        steps=100, batch_size=4, warmup_steps=10, precision="bf16", eval_every=50, checkpoint_every=25,
        encoder_window_seconds=10,
    )
    # Curves during training: CE on this many dev utterances per domain, greedy error on the first few.
    curve_utterances: int = 16
    curve_decoded: int = 4
    # Test utterances per testbed domain (None: the whole test split).
    eval_limit: int | None = None
    # The window every model is scored at (None: the training window), as scoring at 30 s costs about 3x as
    # much (a CE pass over base: 1.2 s against 0.36 s per utterance on one thread) and would not fit
    # the 30 minutes; real clips longer than it are left out of the scores. The budget's choice is
    # exported, and the posterior transcribes, at use_window_seconds (30: Whisper's own).
    eval_window_seconds: float | None = None
    use_window_seconds: float = 30.0
    # Real English (folders under data/real-speech, or any audiofolder): (folder, first N clips or None).
    real_english: tuple[tuple[str, int | None], ...] = (("en-spontaneous", None), ("en-digits", 30))
    # The frontier: each run's update scaled by these λ, scored by teacher-forced CE only.
    frontier_scales: tuple[float, ...] = (0.25, 0.5, 0.75)
    # The sets the frontier scores beside the domain learnt: the English kept (synthetic and real).
    frontier_kept: tuple[str, ...] = ("en", REAL_ENGLISH)
    # The forgetting budget choosing each run's λ after training, on the dev split of retain_domain: its
    # bound on the first 24 utterances, λ on a coarse grid refined three times (nine CE passes a run).
    budget: RetentionBudget = RetentionBudget(0.03, utterances=24, scale_grid=5, scale_refine=3)
    retain_domain: str = "en"
    # Monte Carlo transcripts: the first clips of the domain's test split and of the first real set.
    transcript_clips: int = 2
    transcript_samples: int = 8

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose among {METHODS}")
        if self.domain not in self.eval_domains:
            raise ValueError(f"the trained domain {self.domain!r} must be among eval_domains {self.eval_domains}")
        if not self.train.encoder_window_seconds <= self.scoring_window <= self.use_window_seconds:
            raise ValueError(f"the windows must widen from training ({self.train.encoder_window_seconds:g} s) to scoring "
                             f"(eval_window_seconds, {self.scoring_window:g}) to use (use_window_seconds, "
                             f"{self.use_window_seconds:g}): a run is used at its window or a wider one")

    @property
    def scoring_window(self) -> float:
        """The window every model is scored at: eval_window_seconds, else the training window."""
        return self.train.encoder_window_seconds if self.eval_window_seconds is None else self.eval_window_seconds

    def train_for(self, method: str) -> TrainConfig:
        """The training settings of ``method``: LoRA has no posterior scales, so it takes the paper's
        scale rate (1x) and is otherwise trained as BLoRA is (TrainConfig.paper with these steps)."""
        return self.train.replace(scale_lr_multiplier=TrainConfig.paper().scale_lr_multiplier) if method == "lora" else self.train

    def real_folders(self) -> list[tuple[Path, int | None]]:
        """The real English folders (relative ones under data/real-speech), each with its clip limit."""
        return [(Path(name) if Path(name).is_absolute() else REAL_SPEECH / name, limit) for name, limit in self.real_english]

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["testbed"] = self.testbed.settings()
        return json.loads(json.dumps(values, default=str))


def load_curve_sets(testbed: str | Path, domains: Sequence[str], processor, limit: int,
                    cache_dir: str | Path | None = None) -> dict[str, EvalSet]:
    """The dev sets of the forgetting curves: every domain of ``domains`` with a dev split (backward
    sets have only a test split), ``limit`` utterances each."""
    curve_domains = [d for d in domains if not d.startswith("backward-")]
    return load_eval_sets(testbed, curve_domains, processor, split="dev", limit=limit, cache_dir=cache_dir)


def load_real_english(folders: Sequence[tuple[Path, int | None]], processor, window_seconds: float = 30.0,
                      cache_dir: str | Path | None = None) -> EvalSet:
    """The real English recordings as one set (:data:`REAL_ENGLISH`), language ID scored on it; clips
    longer than ``window_seconds`` are left out (an encoder window refuses them)."""
    parts = []
    for folder, limit in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"real English folder {folder} does not exist; it ships in the repository's "
                                    "data/real-speech (clone the repository), or set MainJobConfig.real_english")
        [part] = load_eval_source(folder, processor, limit=limit, cache_dir=cache_dir).values()
        parts.append(part.prepared.with_format(None))
    frames = window_frames(window_seconds)
    rows = datasets.concatenate_datasets(parts).filter(lambda row: len(row["input_features"]) <= frames)
    return EvalSet(REAL_ENGLISH, rows, language_id=True)


def run_main_job(config: MainJobConfig = MainJobConfig(), echo=print) -> dict[str, Any]:
    """Testbed, base evaluation, each method trained, evaluated, traced over λ and budgeted, BLoRA's
    transcripts and posterior, then ``report.md``; what was measured is returned and written."""
    start = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "main-config.json", config.to_dict())
    cache, window = out / "cache", config.scoring_window
    stages = 8
    echo(f"[1/{stages}] testbed -> {out / 'testbed'}")
    testbed = ensure_testbed(out / "testbed", config.testbed, config.testbed_seed)
    processor = load_processor(config.model)
    sets = load_eval_sets(testbed, config.eval_domains, processor, limit=config.eval_limit, cache_dir=cache)
    sets[REAL_ENGLISH] = load_real_english(config.real_folders(), processor, window, cache)
    curve_sets = load_curve_sets(testbed, config.eval_domains, processor, config.curve_utterances, cache)
    echo(f"[2/{stages}] base model {config.model!r}: {', '.join(f'{n} ({len(s)})' for n, s in sets.items())} "
         f"at a {window:g} s window")
    base = ensure_evaluated(out / "base" / eval_file_name(),
                            lambda: run_evaluation(config.model, sets, out=out / "base" / eval_file_name(),
                                                   encoder_window_seconds=window))
    evaluations, frontiers, budgets = {"base": base}, {}, {}
    data = load_training_data(testbed / config.domain, processor, cache_dir=cache)
    for number, method in enumerate(config.methods, 1):
        run_dir, of = out / "runs" / method, f"({number}/{len(config.methods)})"
        echo(f"[3/{stages}] training {method} {of}: {config.train_for(method).steps} steps -> {run_dir}")
        ensure_trained(run_dir, lambda resume: run_training(
            method, config.model, data, run_dir, config.blora, config.train_for(method),
            curve_sets=curve_sets, curve_options=EvalOptions(decode_limit=config.curve_decoded),
            resume=resume, run_info={"main_job": str(out)},
        ))
        echo(f"[4/{stages}] evaluating {method} {of}")
        evaluations[method] = ensure_evaluated(run_dir / eval_file_name(), lambda: run_evaluation(
            run_dir, sets, base=base, encoder_window_seconds=window))
        echo(f"[5/{stages}] frontier of {method} {of}: update scaled by {', '.join(map(str, config.frontier_scales))}"
             " (CE only)")
        frontier_sets = {name: s for name, s in sets.items() if name in (config.domain, *config.frontier_kept)}
        frontiers[method] = ensure_frontier(run_dir, frontier_sets, config.frontier_scales, base,
                                            encoder_window_seconds=window, cache_dir=cache)
        export = out / "export" / method
        echo(f"[6/{stages}] forgetting budget of {method} {of} ({config.budget.describe()}) -> {export}")
        budgets[method] = ensure_budget_export(run_dir, export, testbed / config.retain_domain, config.budget,
                                               encoder_window_seconds=window,
                                               export_window_seconds=config.use_window_seconds, cache_dir=cache)
        evaluations[f"{method} (budget)"] = ensure_evaluated(out / "budgeted" / f"{method}.json", lambda: run_evaluation(
            export, sets, base=base, out=out / "budgeted" / f"{method}.json", encoder_window_seconds=window))
    bayesian = [m for m in config.methods if m == "blora"]
    transcripts = []
    if bayesian:
        echo(f"[7/{stages}] Monte Carlo transcripts of {bayesian[0]}: {config.transcript_samples} posterior draws")
        first_real, _ = config.real_folders()[0]
        sources = [(testbed / config.domain, "test", config.transcript_clips), (first_real, "train", config.transcript_clips)]
        options = TranscribeOptions(num_samples=config.transcript_samples, generate_kwargs={"max_new_tokens": 96})
        transcripts = ensure_transcripts(out / "runs" / bayesian[0], sources, out / "transcripts", options=options,
                                         encoder_window_seconds=config.use_window_seconds)
    echo(f"[8/{stages}] posterior and report")
    posteriors = {m: ensure_posterior_summary(out / "runs" / m, out / "posterior" / f"{m}.json") for m in config.methods}
    minutes = (time.perf_counter() - start) / 60
    outcome = {"evaluations": evaluations, "frontiers": frontiers, "budgets": budgets, "transcripts": transcripts,
               "posteriors": posteriors, "minutes": minutes}
    atomic_write_json(out / "comparison.json", {name: e["results"] for name, e in evaluations.items()})
    page, table, recommendation = write_main_job_report(config, outcome, out)
    echo(table)
    echo(recommendation)
    echo(f"report: {page} ({minutes:.1f} min)")
    return {**outcome, "table": table, "recommendation": recommendation}
