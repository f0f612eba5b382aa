"""A grid over BLoRA's prior (β, σp, KL normalisation) and the adapter rank, resumable.

Every grid point is one run folder ``<out>/runs/<point name>``, trained and evaluated with the
experiment's own functions (:func:`~pyro_blora.methods.run_training`,
:func:`~pyro_blora.experiment.run_evaluation`). A point with ``result.json`` and ``eval.json`` is
finished and skipped on a rerun; an interrupted one resumes from its last checkpoint. After every
point ``results.csv`` and ``results.json`` are rewritten with one row per finished point.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from pyro_blora.analysis import run_summary
from pyro_blora.checkpoint import atomic_write_json
from pyro_blora.config import KL_NORMALIZATIONS, BLoRAConfig, TrainConfig
from pyro_blora.evaluation import EvalOptions, EvalSet
from pyro_blora.experiment import read_eval, run_evaluation
from pyro_blora.methods import METHODS, TrainingData, run_training
from pyro_blora.report import write_rows

__all__ = ["PRIOR_METHODS", "SweepConfig", "SweepPoint", "read_results", "run_sweep", "sweep_points"]

# Methods whose objective has the prior: β, σp and the KL normalisation act only on these.
PRIOR_METHODS = ("blora", "map")


@dataclass(frozen=True)
class SweepPoint:
    """One grid point; ``beta``, ``prior_scale`` and ``kl_normalization`` are None for methods without a prior."""

    method: str
    rank: int
    beta: float | None = None
    prior_scale: float | None = None
    kl_normalization: str | None = None

    @property
    def name(self) -> str:
        parts = [self.method, f"r{self.rank}"]
        if self.method in PRIOR_METHODS:
            parts += [f"beta{self.beta:g}", f"sp{self.prior_scale:g}", str(self.kl_normalization)]
        return "-".join(parts)

    def adapter(self, template: BLoRAConfig) -> BLoRAConfig:
        """``template`` (targets, alpha, init scales) with this point's settings."""
        changes: dict[str, Any] = {"rank": self.rank}
        if self.method in PRIOR_METHODS:
            changes.update(beta=self.beta, prior_scale=self.prior_scale, kl_normalization=self.kl_normalization)
        return template.replace(**changes)


@dataclass(frozen=True)
class SweepConfig:
    """The grid. Methods without a prior (lora, full) get one point per rank as baselines."""

    betas: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.0)
    prior_scales: tuple[float, ...] = (0.01,)
    ranks: tuple[int, ...] = (32,)
    kl_normalizations: tuple[str, ...] = ("parameter",)
    methods: tuple[str, ...] = ("blora",)

    def __post_init__(self) -> None:
        for name in ("betas", "prior_scales", "ranks", "kl_normalizations", "methods"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
            if not getattr(self, name):
                raise ValueError(f"{name} is empty; give at least one value")
        checks = [
            (all(b > 0 for b in self.betas), f"every beta must be > 0, got {self.betas}"),
            (all(s > 0 for s in self.prior_scales), f"every prior scale must be > 0, got {self.prior_scales}"),
            (all(isinstance(r, int) and r > 0 for r in self.ranks), f"ranks must be positive integers, got {self.ranks}"),
            (set(self.kl_normalizations) <= set(KL_NORMALIZATIONS),
             f"kl_normalizations must be among {KL_NORMALIZATIONS}, got {self.kl_normalizations}"),
            (set(self.methods) <= set(METHODS), f"methods must be among {METHODS}, got {self.methods}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def sweep_points(config: SweepConfig) -> list[SweepPoint]:
    """Every distinct point of the grid, in a stable order (methods, then ranks, then the prior)."""
    points: list[SweepPoint] = []
    for method, rank in itertools.product(config.methods, config.ranks):
        if method in PRIOR_METHODS:
            points += [SweepPoint(method, rank, beta, scale, norm) for beta, scale, norm in
                       itertools.product(config.betas, config.prior_scales, config.kl_normalizations)]
        else:
            points.append(SweepPoint(method, rank))
    return list(dict.fromkeys(points))


def _finished(run_dir: Path) -> bool:
    return (run_dir / "result.json").is_file() and (run_dir / "eval.json").is_file()


def run_sweep(
    config: SweepConfig,
    model: str | Path,
    data: TrainingData,
    eval_sets: Mapping[str, EvalSet],
    out: str | Path,
    *,
    adapter: BLoRAConfig = BLoRAConfig(),
    train: TrainConfig = TrainConfig(),
    eval_options: EvalOptions = EvalOptions(),
    in_domain: str | None = None,
    echo: Callable[[str], Any] = print,
) -> list[dict[str, Any]]:
    """Train and evaluate every unfinished point into ``<out>/runs``; return the results rows.

    ``adapter`` and ``train`` are the settings every point shares; each point overrides the rank and
    the prior. The base model is evaluated once (``<out>/base/eval.json``) and every point's changes
    are relative to it. ``in_domain`` names the trained domain among ``eval_sets`` (default: the
    training data folder's name)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    points = sweep_points(config)
    atomic_write_json(out / "sweep-config.json", {
        "grid": asdict(config), "model": str(model), "train_data": data.source, "domains": list(eval_sets),
        "adapter": adapter.to_dict(), "train": train.to_dict(), "points": [p.name for p in points]})
    base_path = out / "base" / "eval.json"
    base = read_eval(base_path) if base_path.is_file() else run_evaluation(model, eval_sets, options=eval_options,
                                                                            out=base_path)
    domain = in_domain or (Path(data.source).name if Path(data.source).name in eval_sets else next(iter(eval_sets)))
    rows: list[dict[str, Any]] = []
    for number, point in enumerate(points, 1):
        run_dir = out / "runs" / point.name
        prefix = f"[{number}/{len(points)}] {point.name}"
        if _finished(run_dir):
            echo(f"{prefix}: finished, skipped")
        else:
            if not (run_dir / "result.json").is_file():
                echo(f"{prefix}: training")
                run_training(point.method, model, data, run_dir, point.adapter(adapter), train,
                             resume=(run_dir / "checkpoints").is_dir(), run_info={"sweep": str(out), "point": asdict(point)})
            echo(f"{prefix}: evaluating")
            run_evaluation(run_dir, eval_sets, options=eval_options, base=base)
        rows.append({"point": point.name, **run_summary(run_dir, base=base, in_domain=domain)})
        write_rows(rows, out / "results")
    echo(f"results: {out / 'results.csv'} ({len(rows)} points)")
    return rows


def read_results(out: str | Path) -> list[dict[str, Any]]:
    """The rows of a sweep's ``results.json``."""
    path = Path(out) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `pyro-blora sweep --out {out}` first")
    return json.loads(path.read_text())
