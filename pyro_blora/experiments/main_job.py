"""The paper's experiment end to end: testbed, training, forward and backward evaluation, report.

:func:`run_main_job` is ``pyro-blora main``: build (or reuse) a testbed, train LoRA and BLoRA on one
code-switched domain, evaluate both against the base model and write ``report.md``. Each method is
one :mod:`~pyro_blora.experiments.step`: trained unless finished, evaluated unless evaluated.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from pyro_blora.base_models.loading import load_processor
from pyro_blora.checkpoint import atomic_write_json, atomic_write_text
from pyro_blora.config import ALL_LINEAR_TARGETS, BLoRAConfig, TrainConfig
from pyro_blora.data.training_data import load_training_data
from pyro_blora.evaluation.scoring import EvalOptions, EvalSet, load_eval_sets
from pyro_blora.experiments.step import ensure_evaluated, ensure_trained, run_evaluation
from pyro_blora.runs import METHODS, eval_file_name, read_eval, read_log
from pyro_blora.testbed import TestbedConfig, build_testbed
from pyro_blora.report.pages import main_job_page, main_job_table
from pyro_blora.training.methods import run_training

__all__ = [
    "ALL_LINEAR_TARGETS",
    "MAIN_TESTBED",
    "MainJobConfig",
    "ensure_testbed",
    "load_curve_sets",
    "run_main_job",
]

# The main job's testbed: one code-switched domain, English and one backward language, sized so that
# the whole job fits in about 45 minutes on 2 CPU cores.
MAIN_TESTBED = TestbedConfig(
    pairs=("zh-en",),
    codeswitch_sizes=(200, 40, 40),
    english_sizes=(10, 40, 40),
    backward_languages=("es",),
    backward_size=30,
)


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
    """What ``pyro-blora main`` runs. Defaults fit in about 45 minutes on 2 CPU cores."""

    out: Path = Path("main-job")
    # The base model: the multilingual Whisper base shipped in PyPI packages.
    model: str = "base"
    # The code-switched domain adapted to, and the domains evaluated (in-domain first).
    domain: str = "zh-en"
    eval_domains: tuple[str, ...] = ("zh-en", "en", "backward-es")
    methods: tuple[str, ...] = ("lora", "blora")
    testbed: TestbedConfig = MAIN_TESTBED
    testbed_seed: int = 0
    # LoRA r=32, alpha=64 on every linear layer (both methods use these adapters).
    blora: BLoRAConfig = BLoRAConfig(target_modules=ALL_LINEAR_TARGETS)
    train: TrainConfig = TrainConfig(
        steps=80, batch_size=4, lr=1e-3, warmup_steps=5, precision="bf16", eval_every=20, checkpoint_every=20
    )
    # Curves during training: CE on this many dev utterances per domain, greedy error on the first few.
    curve_utterances: int = 16
    curve_decoded: int = 4
    # Test utterances per domain (None: the whole test split).
    eval_limit: int | None = None

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose among {METHODS}")
        if self.domain not in self.eval_domains:
            raise ValueError(f"the trained domain {self.domain!r} must be among eval_domains {self.eval_domains}")

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


def run_main_job(config: MainJobConfig = MainJobConfig(), echo=print) -> dict[str, Any]:
    """Testbed, base evaluation, training and evaluation of each method, comparison table and report."""
    start = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "main-config.json", config.to_dict())
    cache = out / "cache"
    echo(f"[1/4] testbed -> {out / 'testbed'}")
    testbed = ensure_testbed(out / "testbed", config.testbed, config.testbed_seed)
    echo(f"[2/4] base model {config.model!r}: evaluation on {', '.join(config.eval_domains)}")
    processor = load_processor(config.model)
    sets = load_eval_sets(testbed, config.eval_domains, processor, limit=config.eval_limit, cache_dir=cache)
    curve_sets = load_curve_sets(testbed, config.eval_domains, processor, config.curve_utterances, cache)
    base_path = out / "base" / "eval.json"
    base = read_eval(base_path) if base_path.is_file() else run_evaluation(config.model, sets, out=base_path)
    evaluations = {"base": base}
    data = load_training_data(testbed / config.domain, processor, cache_dir=cache)
    for number, method in enumerate(config.methods, 1):
        run_dir = out / "runs" / method
        echo(f"[3/4] training {method} ({number}/{len(config.methods)}) -> {run_dir}")
        ensure_trained(run_dir, lambda resume: run_training(
            method, config.model, data, run_dir, config.blora, config.train,
            curve_sets=curve_sets, curve_options=EvalOptions(decode_limit=config.curve_decoded),
            resume=resume, run_info={"main_job": str(out)},
        ))
        echo(f"[4/4] evaluating {method}")
        evaluations[method] = ensure_evaluated(run_dir / eval_file_name(),
                                               lambda: run_evaluation(run_dir, sets, base=base))
    table = main_job_table(evaluations, config.eval_domains)
    minutes = (time.perf_counter() - start) / 60
    atomic_write_json(out / "comparison.json", {name: e["results"] for name, e in evaluations.items()})
    logs = {method: read_log(out / "runs" / method) for method in config.methods}
    atomic_write_text(out / "report.md", main_job_page(config.to_dict(), evaluations, logs, minutes=minutes,
                                                      machine=platform.machine(), threads=torch.get_num_threads()))
    echo(table)
    echo(f"report: {out / 'report.md'} ({minutes:.1f} min)")
    return {"evaluations": evaluations, "table": table, "minutes": minutes}
