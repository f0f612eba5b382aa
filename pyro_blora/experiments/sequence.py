"""Sequential adaptation to several domains in turn, and how much each strategy forgets.

A sequence trains on domains d1 -> d2 -> ... -> dT, one run folder per step, and evaluates every
domain after every step (and the start model as step 0). Strategies:

* ``lora``: one peft LoRA adapter, trained on each domain in turn (``init_from`` the previous step);
* ``lora-replay``: the same, with ``replay_size`` utterances of every earlier domain mixed in;
* ``blora-fresh``: BLoRA with a fresh N(0, sigma_p) prior each step, on the previous step's
  posterior mean merged into the base (``model_source`` = the previous run folder);
* ``blora-prior``: BLoRA whose prior at each step is the previous step's posterior, per entry
  (``prior_from``: variational continual learning on the adapters);
* ``map-anchor``: MAP whose prior at each step is an isotropic Gaussian centred on the previous
  step's adapters, as strong as blora-prior's prior at that step on average (one scale s with
  1/s^2 = the mean of 1/sigma^2 over blora-prior's previous posterior). It separates "anchored to
  the previous weights" from "uses the posterior's per-entry uncertainty"; it needs blora-prior's
  steps of the same order (run that strategy first).

``prior_scale_floor`` puts a floor under the copied prior scales of blora-prior, map-anchor and laplace-prior (a
posterior can end narrower than the prior it started from); those runs go to
``<strategy>-floor<value>/`` so floored and unfloored sequences share one ``out``.

Layout under ``out``: ``<order>/<strategy>/step<i>-<domain>/`` (run folders), with ``sequence.json``
(the config), ``matrix.json``, ``matrix.md`` and ``heatmap.png`` in ``<order>/<strategy>/``;
``<order>`` names the domain order (``zh-en_es-en_ar-en``), so both orders share one ``out``.
Steps that are the same run are trained once: the first step of ``blora-prior`` is the first step
of ``blora-fresh`` (plain BLoRA from the base), as is that of ``map-anchor``; that of ``lora-replay``
is the first step of ``lora``; laplace-prior's Laplace posteriors go to ``step<i>-<domain>-laplace/``
beside its runs;
the start model's evaluation (``start/``) is shared by every order and strategy. A finished step
(weights and evaluation present) is skipped, and a step killed mid-training resumes from its last
checkpoint, so running the same command again continues a killed sequence.

The matrices and the pages that compare strategies: :mod:`pyro_blora.experiments.sequence_results`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from pyro_blora.checkpoint import atomic_write_json
from pyro_blora.config import BLoRAConfig, TrainConfig
from pyro_blora.data import PreparedSpeechDataset
from pyro_blora.evaluation.scoring import EvalOptions, EvalSet, load_eval_sets
from pyro_blora.experiments.step import ensure_evaluated, ensure_trained, run_evaluation
from pyro_blora.data.training_data import TrainingData, load_training_data
from pyro_blora.model.encoder_window import FULL_WINDOW_SECONDS
from pyro_blora.runs import base_model_of, finished, is_run_folder
from pyro_blora.training.continual import PriorTransfer
from pyro_blora.training.laplace import laplace_posterior
from pyro_blora.training.methods import run_training
from pyro_blora.experiments.sequence_results import (INTERVALS_FILE, SequenceResult, comparison_intervals,
                                                     comparison_page, matrix_page, write_comparison, write_matrix)
from pyro_blora.base_models.loading import load_processor

# SequenceResult and the pages live in sequence_results; re-exported here, where they were first imported from.
__all__ = [
    "COPIED_PRIOR",
    "INTERVALS_FILE",
    "STRATEGIES",
    "SequenceConfig",
    "SequenceResult",
    "SequenceStep",
    "comparison_intervals",
    "comparison_page",
    "matrix_page",
    "order_name",
    "plan_sequence",
    "run_sequence",
    "with_replay",
    "order_results",
    "write_comparison",
]

# In the order they can run: map-anchor reads blora-prior's posteriors.
STRATEGIES = ("lora", "blora-fresh", "blora-prior", "lora-replay", "map-anchor", "laplace-prior")
METHOD_OF = {"lora": "lora", "lora-replay": "lora", "blora-fresh": "blora", "blora-prior": "blora",
             "map-anchor": "map", "laplace-prior": "map"}
# Strategies whose first step is another strategy's first step: the same run, trained once.
FIRST_STEP_OF = {"blora-prior": "blora-fresh", "lora-replay": "lora", "map-anchor": "blora-fresh"}
# Strategies whose prior is copied from the previous step (the ones prior_scale_floor acts on).
COPIED_PRIOR = ("blora-prior", "map-anchor", "laplace-prior")
# Between a strategy and its floor in the name of a floored sequence (``blora-prior-floor0.001``).
FLOOR_TAG = "-floor"
# After a laplace-prior step's folder name, the folder of the Laplace posterior around it.
LAPLACE_TAG = "-laplace"


@dataclass(frozen=True)
class SequenceConfig:
    """One strategy on one order of domains, and how each step is trained and evaluated."""

    strategy: str
    # Domains trained on, in this order (testbed folder names with a train split).
    domains: tuple[str, ...]
    # Domains the start model already knows, evaluated after every step as well (learned at step 0).
    original_domains: tuple[str, ...] = ("en",)
    # The start model: bundled name, folder or hub id.
    model: str = "base"
    blora: BLoRAConfig = BLoRAConfig()
    # Every step runs this (steps per domain, batch, lr, precision, ...); its seed is ``seed``.
    train: TrainConfig = TrainConfig()
    # lora-replay: utterances of every earlier domain mixed into a step's training data.
    replay_size: int = 8
    # Test utterances per domain (None: the whole test split).
    eval_limit: int | None = None
    evaluation: EvalOptions = EvalOptions(language_id=False)
    seed: int = 0
    # blora-prior, map-anchor, laplace-prior: lower bound on every copied prior scale (None: none).
    prior_scale_floor: float | None = None

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose among {', '.join(STRATEGIES)}")
        if self.prior_scale_floor is not None:
            if self.strategy not in COPIED_PRIOR:
                raise ValueError(f"prior_scale_floor acts on the copied priors of {', '.join(COPIED_PRIOR)}; "
                                 f"leave it None for {self.strategy!r}")
            PriorTransfer(scale_floor=self.prior_scale_floor)  # validates the value
        object.__setattr__(self, "domains", tuple(self.domains))
        object.__setattr__(self, "original_domains", tuple(self.original_domains))
        if not self.domains:
            raise ValueError("a sequence needs at least one domain to train on")
        columns = self.columns
        if len(set(columns)) != len(columns):
            raise ValueError(f"every domain may appear once among the trained and original domains, got {list(columns)}")
        if self.replay_size < 1:
            raise ValueError(f"replay_size must be >= 1, got {self.replay_size}")
        object.__setattr__(self, "train", self.train.replace(seed=self.seed))

    @property
    def name(self) -> str:
        """The strategy's folder and label: ``blora-prior``, or ``blora-prior-floor0.001`` with a floor."""
        return self.strategy if self.prior_scale_floor is None else f"{self.strategy}{FLOOR_TAG}{self.prior_scale_floor:g}"

    def prior_transfer(self, strategy: str) -> PriorTransfer:
        """How ``strategy``'s steps after the first copy the previous posterior into the prior."""
        scales = "mean-precision" if strategy == "map-anchor" else "posterior"
        return PriorTransfer(scales=scales, scale_floor=self.prior_scale_floor)

    @property
    def columns(self) -> tuple[str, ...]:
        """The evaluated domains: the original ones, then the trained ones in order."""
        return (*self.original_domains, *self.domains)

    @property
    def learned_at(self) -> tuple[int, ...]:
        """For each column, the step after which it is learned (0: known by the start model)."""
        return tuple(0 if d in self.original_domains else self.domains.index(d) + 1 for d in self.columns)

    def evaluation_settings(self) -> dict[str, Any]:
        """What an evaluation's numbers depend on (the progress bar aside)."""
        options = {k: v for k, v in asdict(self.evaluation).items() if k != "progress"}
        settings = {"domains": list(self.columns), "split": "test", "limit": self.eval_limit, "options": options}
        if self.start_window is not None:  # evaluations of full-window sequences keep their earlier names
            settings["encoder_window_seconds"] = self.start_window
        return settings

    @property
    def start_window(self) -> float | None:
        """The encoder window the start model is scored with: the runs' window when they are cut
        (every step's run keeps its own), None for the full window."""
        window = self.train.encoder_window_seconds
        return None if window == FULL_WINDOW_SECONDS else window

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["evaluation"] = self.evaluation_settings()
        if values["prior_scale_floor"] is None:  # sequences recorded before the option existed stay valid
            del values["prior_scale_floor"]
        return json.loads(json.dumps(values, default=str))


def order_name(domains: Sequence[str]) -> str:
    """The folder of one domain order: ``zh-en_es-en_ar-en``."""
    return "_".join(domains)


@dataclass(frozen=True)
class SequenceStep:
    """One training step of a sequence: which run, from what, on which data."""

    number: int
    domain: str
    run_dir: Path
    method: str
    model_source: str
    init_from: Path | None = None
    prior_from: Path | None = None
    prior_transfer: PriorTransfer = PriorTransfer()
    # Earlier domains replayed in this step's data.
    replay: tuple[str, ...] = ()
    # laplace-prior: where the Laplace posterior around this step's adapters goes (the next step's prior).
    laplace_out: Path | None = None


def plan_sequence(config: SequenceConfig, out: str | Path) -> list[SequenceStep]:
    """The steps of ``config``'s strategy, each from the previous one's run folder."""
    order = Path(out) / order_name(config.domains)
    strategy = config.strategy
    anchors = plan_sequence(replace(config, strategy="blora-prior"), out) if strategy == "map-anchor" else []
    steps: list[SequenceStep] = []
    previous: Path | None = None
    for number, domain in enumerate(config.domains, 1):
        shared = number == 1 and strategy in FIRST_STEP_OF
        owner = FIRST_STEP_OF[strategy] if shared else config.name
        step = SequenceStep(number, domain, order / owner / f"step{number}-{domain}",
                            METHOD_OF[FIRST_STEP_OF[strategy] if shared else strategy], str(config.model))
        if previous is not None:
            if strategy in ("lora", "lora-replay"):
                step = replace(step, init_from=previous)
            elif strategy == "blora-fresh":
                step = replace(step, model_source=str(previous))
            else:
                transfer = config.prior_transfer(strategy)
                if anchors:  # as strong as blora-prior's prior at this step
                    transfer = replace(transfer, precision_from=anchors[number - 2].run_dir)
                step = replace(step, prior_from=previous, prior_transfer=transfer)
            if strategy == "lora-replay":
                step = replace(step, replay=config.domains[:number - 1])
        if strategy == "laplace-prior" and number < len(config.domains):
            step = replace(step, laplace_out=step.run_dir.with_name(step.run_dir.name + LAPLACE_TAG))
        steps.append(step)
        previous = step.laplace_out or step.run_dir
    return steps


def with_replay(current: TrainingData, earlier: Mapping[str, TrainingData], size: int, seed: int) -> TrainingData:
    """``current`` with ``size`` utterances (a seeded random choice) of each earlier domain appended."""
    import datasets
    import torch

    parts = [current.dataset.prepared]
    for number, data in enumerate(earlier.values()):
        chosen = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed * 1_000 + number))[:size]
        parts.append(data.dataset.prepared.select(sorted(chosen.tolist())))
    mixed = datasets.concatenate_datasets([part.with_format(None) for part in parts])
    names = ", ".join(f"{domain}:{min(size, len(data))}" for domain, data in earlier.items())
    return TrainingData(PreparedSpeechDataset(mixed), current.collate, f"{current.source} + replay({names})", current.split)


def order_results(folder: str | Path, ran: Sequence[SequenceResult] = ()) -> list[SequenceResult]:
    """Every finished strategy of one order's folder: ``ran`` (just run) and those an earlier call left
    there (e.g. map-anchor added to a finished study), in the order of :data:`STRATEGIES`, a strategy's
    floored variants after it."""
    found = {r.strategy: r for r in ran}
    for matrix in sorted(Path(folder).glob("*/matrix.json")):
        found.setdefault(matrix.parent.name, SequenceResult.load(matrix))

    def rank(name: str) -> tuple[int, str]:
        base = name.split(FLOOR_TAG)[0]
        return (STRATEGIES.index(base) if base in STRATEGIES else len(STRATEGIES), name)

    return [found[name] for name in sorted(found, key=rank)]


# ----------------------------------------------------------------------------------- runner
def _settings_tag(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def _evaluation_file(folder: Path, config: SequenceConfig) -> Path:
    return folder / f"eval-{_settings_tag(config.evaluation_settings())}.json"


def _evaluated(source: str | Path, folder: Path, sets: Mapping[str, EvalSet], config: SequenceConfig) -> dict[str, Any]:
    """The evaluation of ``source`` under ``config``'s settings, read from ``folder`` if already there.
    A run folder is scored with its own encoder window, the start model with the runs' window."""
    path = _evaluation_file(folder, config)
    window = None if is_run_folder(source) else config.start_window
    return ensure_evaluated(path, lambda: run_evaluation(source, sets, options=config.evaluation, out=path,
                                                         encoder_window_seconds=window))


def _record_config(path: Path, config: SequenceConfig) -> None:
    wanted = config.to_dict()
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != json.loads(json.dumps(wanted, sort_keys=True)):
            raise ValueError(f"{path.parent} holds a sequence with other settings (its sequence.json differs); "
                             "choose another output folder, or delete that one to start over")
        return
    atomic_write_json(path, wanted)


def _check_domains(testbed: Path, config: SequenceConfig) -> None:
    available = sorted(p.name for p in testbed.iterdir() if p.is_dir()) if testbed.is_dir() else []
    unknown = [d for d in config.columns if d not in available]
    if unknown:
        raise ValueError(f"unknown domains {unknown}: not in the testbed {testbed}; choose among {available}")


def _check_anchors(steps: Sequence[SequenceStep]) -> None:
    """Refuse, before any training, a map-anchor sequence whose blora-prior runs are missing."""
    own = {step.run_dir for step in steps}
    missing = [str(p) for step in steps if (p := step.prior_transfer.precision_from) is not None
               and p not in own and not finished(p)]
    if missing:
        raise ValueError(f"map-anchor takes its strength at each step from blora-prior's runs, and {', '.join(missing)} "
                         "are not finished: run the blora-prior strategy on this order first, with the same options "
                         "(the sequence command runs the strategies in that order)")


def run_sequence(
    config: SequenceConfig,
    testbed: str | Path,
    out: str | Path,
    *,
    echo: Callable[[str], None] = print,
    after_step: Callable[[SequenceStep], None] | None = None,
) -> SequenceResult:
    """Train ``config.strategy`` on ``config.domains`` in turn from ``testbed``, evaluate every domain
    after every step, and write ``matrix.json``, ``matrix.md`` and ``heatmap.png``. Finished steps
    are reused, so calling it again continues a killed sequence. ``after_step`` is called with each
    step once it is trained and evaluated."""
    testbed, out = Path(testbed), Path(out)
    _check_domains(testbed, config)
    steps = plan_sequence(config, out)
    _check_anchors(steps)
    folder = out / order_name(config.domains) / config.name
    _record_config(folder / "sequence.json", config)
    processor = load_processor(base_model_of(config.model))
    cache = out / "cache"
    sets = load_eval_sets(testbed, config.columns, processor, limit=config.eval_limit, cache_dir=cache)
    label = f"{order_name(config.domains)}/{config.name}"
    echo(f"[{label}] step 0: evaluating the start model {config.model}")
    files = [_evaluation_file(out / "start", config)]
    evaluations = [_evaluated(config.model, out / "start", sets, config)]
    data: dict[str, TrainingData] = {}

    def training_data(domain: str) -> TrainingData:
        if domain not in data:
            data[domain] = load_training_data(testbed / domain, processor, cache_dir=cache)
        return data[domain]

    for step in steps:
        def train_step(resume: bool, step: SequenceStep = step) -> None:
            echo(f"[{label}] step {step.number}/{len(steps)}: {step.method} on {step.domain} -> {step.run_dir}")
            train_data = training_data(step.domain)
            if step.replay:
                train_data = with_replay(train_data, {d: training_data(d) for d in step.replay},
                                         config.replay_size, config.seed)
            run_training(step.method, step.model_source, train_data, step.run_dir, config.blora, config.train,
                         resume=resume, run_info={"sequence_step": step.number},
                         init_from=step.init_from, prior_from=step.prior_from, prior_transfer=step.prior_transfer)

        ensure_trained(step.run_dir, train_step)
        echo(f"[{label}] step {step.number}/{len(steps)}: evaluating on {', '.join(config.columns)}")
        evaluations.append(_evaluated(step.run_dir, step.run_dir, sets, config))
        files.append(_evaluation_file(step.run_dir, config))
        if step.laplace_out is not None and not finished(step.laplace_out):
            echo(f"[{label}] step {step.number}/{len(steps)}: Laplace posterior around it -> {step.laplace_out}")
            laplace_posterior(step.run_dir, training_data(step.domain), step.laplace_out, prior=config.blora,
                              batches=config.train.curvature_batches, batch_size=config.train.batch_size,
                              seed=config.seed)
        if after_step is not None:
            after_step(step)
    rows = ["start", *(f"step{s.number}-{s.domain}" for s in steps)]
    result = SequenceResult.from_evaluations(config, evaluations, rows, [str(s.run_dir) for s in steps],
                                             [str(f) for f in files])
    echo(f"[{label}] matrix: {write_matrix(result, folder)}")
    return result
