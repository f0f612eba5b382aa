"""A grid over BLoRA's prior (β, σp, KL normalisation), the adapter rank and the seed, resumable.

Every grid point is one run folder ``<out>/runs/<point name>``, trained and evaluated with the
experiment's own functions (:func:`~pyro_blora.methods.run_training`,
:func:`~pyro_blora.experiment.run_evaluation`). A point with ``result.json`` and ``eval.json`` is
finished and skipped on a rerun; an interrupted one resumes from its last checkpoint. After every
point ``results.csv`` and ``results.json`` are rewritten with one row per finished point, and
``by-setting.csv`` / ``by-setting.json`` / ``by-setting.md`` with the mean and standard deviation over
seeds of each setting, plus the paper's two comparisons of BLoRA against LoRA.
"""

from __future__ import annotations

import itertools
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from pyro_blora.analysis import evaluation_fields, run_summary
from pyro_blora.checkpoint import atomic_write_json
from pyro_blora.config import KL_NORMALIZATIONS, BLoRAConfig, TrainConfig
from pyro_blora.evaluation import EvalOptions, EvalSet
from pyro_blora.experiment import read_eval, run_evaluation
from pyro_blora.methods import METHODS, TrainingData, run_training
from pyro_blora.report import BASE_CURVE_FILE, markdown_table, write_rows

__all__ = [
    "PRIOR_METHODS", "SweepConfig", "SweepPoint", "by_setting_markdown", "domain_table", "write_domain_table", "paper_comparisons", "read_results", "run_sweep", "summarize_seeds",
    "sweep_points",
]

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
    seed: int = 0

    @property
    def setting(self) -> str:
        """The name without the seed: the runs of one setting over several seeds share it."""
        parts = [self.method, f"r{self.rank}"]
        if self.method in PRIOR_METHODS:
            parts += [f"beta{self.beta:g}", f"sp{self.prior_scale:g}", str(self.kl_normalization)]
        return "-".join(parts)

    @property
    def name(self) -> str:
        """Seed 0 carries no suffix, so a sweep widened to more seeds reuses its seed-0 runs."""
        return self.setting + (f"-s{self.seed}" if self.seed else "")

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
    seeds: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        for name in ("betas", "prior_scales", "ranks", "kl_normalizations", "methods", "seeds"):
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
            (all(isinstance(x, int) and x >= 0 for x in self.seeds), f"seeds must be integers >= 0, got {self.seeds}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def sweep_points(config: SweepConfig) -> list[SweepPoint]:
    """Every distinct point of the grid, in a stable order (seeds, then methods, ranks and the prior):
    the first seed's whole grid finishes before the next seed starts."""
    points: list[SweepPoint] = []
    for seed, method, rank in itertools.product(config.seeds, config.methods, config.ranks):
        if method in PRIOR_METHODS:
            points += [SweepPoint(method, rank, beta, scale, norm, seed) for beta, scale, norm in
                       itertools.product(config.betas, config.prior_scales, config.kl_normalizations)]
        else:
            points.append(SweepPoint(method, rank, seed=seed))
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
    full_lr: float | None = None,
    curve_sets: Mapping[str, EvalSet] | None = None,
    curve_options: EvalOptions = EvalOptions(decode_limit=4, progress=False),
    echo: Callable[[str], Any] = print,
) -> list[dict[str, Any]]:
    """Train and evaluate every unfinished point into ``<out>/runs``; return the results rows.

    ``adapter`` and ``train`` are the settings every point shares; each point overrides the rank,
    the prior and the seed (the point's seed replaces ``train.seed``). The base model is evaluated once (``<out>/base/eval.json``) and every point's changes
    are relative to it. ``in_domain`` names the trained domain among ``eval_sets`` (default: the
    training data folder's name). ``full_lr`` replaces ``train.lr`` for full fine-tuning, which
    diverges at the learning rates adapters take (Whisper's own recipe fine-tunes at 1e-5). With
    ``train.eval_every`` every point scores ``curve_sets`` (dev sets) during training: the
    forgetting curves of :func:`pyro_blora.report.write_report`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    points = sweep_points(config)
    atomic_write_json(out / "sweep-config.json", {
        "grid": asdict(config), "model": str(model), "train_data": data.source, "domains": list(eval_sets),
        "adapter": adapter.to_dict(), "train": train.to_dict(), "full_lr": full_lr,
        "curve_domains": list(curve_sets or {}), "points": [p.name for p in points]})
    base_path = out / "base" / "eval.json"
    base = read_eval(base_path) if base_path.is_file() else run_evaluation(model, eval_sets, options=eval_options,
                                                                            out=base_path)
    curve_start = out / "base" / BASE_CURVE_FILE
    if curve_sets and train.eval_every and not curve_start.is_file():
        run_evaluation(model, curve_sets, options=curve_options, out=curve_start)  # step 0 of the curves
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
                settings = train.replace(seed=point.seed)
                if point.method == "full" and full_lr is not None:
                    settings = settings.replace(lr=full_lr)
                run_training(point.method, model, data, run_dir, point.adapter(adapter), settings,
                             curve_sets=curve_sets, curve_options=curve_options,
                             resume=(run_dir / "checkpoints").is_dir(), run_info={"sweep": str(out), "point": asdict(point)})
            echo(f"{prefix}: evaluating")
            run_evaluation(run_dir, eval_sets, options=eval_options, base=base)
        rows.append({"point": point.name, "setting": point.setting, "seed": point.seed,
                     **run_summary(run_dir, base=base, in_domain=domain)})
        write_rows(rows, out / "results")
        _write_by_setting(rows, out)
    echo(f"results: {out / 'results.csv'} ({len(rows)} points), {out / 'by-setting.md'}")
    return rows


# Columns summarised over seeds: errors, CE, their changes against the base model, sparsity of dW.
SUMMARY_COLUMNS = (
    "in_domain_error", "backward_error", "in_domain_error_change", "backward_error_change",
    "in_domain_ce", "backward_ce", "backward_language_id", "dW_thresh_fraction", "dW_hoyer_index",
)


def summarize_seeds(rows: list[Mapping[str, Any]], columns: tuple[str, ...] = SUMMARY_COLUMNS) -> list[dict[str, Any]]:
    """One row per setting: ``<column>_mean``, ``<column>_std`` (sample standard deviation; 0 for one
    seed) and the seeds it covers."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["setting"], []).append(row)
    summary = []
    for setting, members in groups.items():
        entry: dict[str, Any] = {"setting": setting, "method": members[0]["method"], "rank": members[0]["rank"],
                                 "seeds": ",".join(str(m["seed"]) for m in members)}
        for column in columns:
            values = [float(m[column]) for m in members if m.get(column) is not None]
            if values:
                entry[f"{column}_mean"] = statistics.fmean(values)
                entry[f"{column}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(entry)
    return summary


def paper_comparisons(summary: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The paper's two numbers for every BLoRA setting against the LoRA baseline of the same rank, on
    the means over seeds: backward gain = (LoRA's backward error - BLoRA's) / LoRA's (positive: BLoRA
    forgets less) and in-domain drop = (BLoRA's in-domain error - LoRA's) / LoRA's (positive: BLoRA
    adapts less)."""
    lora = {row["rank"]: row for row in summary if row["method"] == "lora"}
    out = []
    for row in summary:
        baseline = lora.get(row["rank"])
        if row["method"] != "blora" or baseline is None:
            continue
        if "backward_error_mean" not in row or "backward_error_mean" not in baseline:
            continue
        out.append({
            "setting": row["setting"], "against": baseline["setting"],
            "backward_gain": (baseline["backward_error_mean"] - row["backward_error_mean"]) / baseline["backward_error_mean"],
            "in_domain_drop": (row["in_domain_error_mean"] - baseline["in_domain_error_mean"]) / baseline["in_domain_error_mean"],
        })
    return out


def _mean_std(row: Mapping[str, Any], column: str, percent: bool = True) -> str:
    if f"{column}_mean" not in row:
        return "-"
    mean, std = row[f"{column}_mean"], row[f"{column}_std"]
    if len(str(row.get("seeds", "")).split(",")) == 1:  # one seed: no spread to show
        return f"{100 * mean:.1f}%" if percent else f"{mean:.3f}"
    return f"{100 * mean:.1f} ± {100 * std:.1f}%" if percent else f"{mean:.3f} ± {std:.3f}"


def by_setting_markdown(summary: list[Mapping[str, Any]], comparisons: list[Mapping[str, Any]]) -> str:
    """The table of :func:`summarize_seeds` (mean ± std over seeds) and the paper's comparisons."""
    headers = {"in_domain_error": "in-domain error", "backward_error": "backward error",
               "in_domain_error_change": "in-domain change", "backward_error_change": "backward change",
               "dW_thresh_fraction": "dW below 1e-3"}
    rows = [{"setting": row["setting"], "seeds": row["seeds"],
             **{header: _mean_std(row, column) for column, header in headers.items()},
             "dW Hoyer": _mean_std(row, "dW_hoyer_index", percent=False)} for row in summary]
    page = markdown_table(rows) + "\n"
    if comparisons:
        page += "\n" + markdown_table([
            {"BLoRA setting": c["setting"], "against": c["against"], "backward gain": f"{100 * c['backward_gain']:+.1f}%",
             "in-domain drop": f"{100 * c['in_domain_drop']:+.1f}%"} for c in comparisons]) + "\n"
    return page


def _write_by_setting(rows: list[Mapping[str, Any]], out: Path) -> None:
    summary = summarize_seeds(rows)
    write_rows(summary, out / "by-setting")
    (out / "by-setting.md").write_text(by_setting_markdown(summary, paper_comparisons(summary)))


def read_results(out: str | Path) -> list[dict[str, Any]]:
    """The rows of a sweep's ``results.json``."""
    path = Path(out) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `pyro-blora sweep --out {out}` first")
    return json.loads(path.read_text())


def _change(value: float | None, sign: float = 1.0) -> str:
    return "-" if value is None else f"{100 * sign * value:+.0f}%"


def _formatted(value: float | None, style: str) -> str:
    return "-" if value is None else style.format(value)


def domain_table(sweeps: Sequence[str | Path]) -> list[dict[str, Any]]:
    """The paper's table over domains: for every sweep folder (one trained domain each) a base row and
    one row per setting with the mean ± std over its seeds: in-domain and backward error, their
    relative changes against the base model (improvement: positive = better; degradation: positive =
    worse), backward CE, BLoRA's backward gain / in-domain drop against LoRA, and dW's sparsity."""
    rows: list[dict[str, Any]] = []
    for folder in map(Path, sweeps):
        results = read_results(folder)
        if not results:
            continue
        domain = results[0]["in_domain"]
        base = evaluation_fields(read_eval(folder / "base" / "eval.json")["results"], domain)
        rows.append({"domain": domain, "method": "base", "seeds": "-",
                     "in-domain error": _formatted(base["in_domain_error"], "{:.1%}"),
                     "backward error": _formatted(base["backward_error"], "{:.1%}"),
                     "backward CE": _formatted(base["backward_ce"], "{:.3f}"),
                     "backward language ID": _formatted(base["backward_language_id"], "{:.0%}")})
        summary = summarize_seeds(results)
        comparisons = {c["setting"]: c for c in paper_comparisons(summary)}
        for row in summary:
            comparison = comparisons.get(row["setting"], {})
            rows.append({
                "domain": domain, "method": row["setting"], "seeds": row["seeds"],
                "in-domain error": _mean_std(row, "in_domain_error"),
                "backward error": _mean_std(row, "backward_error"),
                "in-domain improvement vs base": _change(row.get("in_domain_error_change_mean"), -1.0),
                "backward degradation vs base": _change(row.get("backward_error_change_mean")),
                "backward CE": _mean_std(row, "backward_ce", percent=False),
                "backward language ID": _mean_std(row, "backward_language_id"),
                "backward gain vs LoRA": _change(comparison.get("backward_gain")),
                "in-domain drop vs LoRA": _change(comparison.get("in_domain_drop")),
                "dW below 1e-3": _mean_std(row, "dW_thresh_fraction"),
                "dW Hoyer": _mean_std(row, "dW_hoyer_index", percent=False),
            })
    return rows


def write_domain_table(sweeps: Sequence[str | Path], out: str | Path) -> Path:
    """:func:`domain_table` as ``<out>.md``, ``<out>.csv`` and ``<out>.json``; returns the Markdown file."""
    rows = domain_table(sweeps)
    if not rows:
        raise ValueError(f"none of {[str(s) for s in sweeps]} has finished points; run `pyro-blora sweep` first")
    out = Path(out)
    write_rows(rows, out)
    page = out.with_suffix(".md")
    page.write_text(markdown_table(rows) + "\n")
    return page
