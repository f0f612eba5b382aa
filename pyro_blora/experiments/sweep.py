"""A grid over BLoRA's prior (β, σp, KL normalisation), the adapter rank and the seed, resumable.

Every grid point is one run folder ``<out>/runs/<point name>``, trained and evaluated with the
experiment's own functions (:func:`~pyro_blora.training.methods.run_training`,
:func:`~pyro_blora.experiments.step.run_evaluation`), one :mod:`~pyro_blora.experiments.step` each: a
finished and evaluated point is skipped on a rerun; an interrupted one resumes from its last checkpoint. After every
point ``results.csv`` and ``results.json`` are rewritten with one row per finished point, and
``by-setting.csv`` / ``by-setting.json`` / ``by-setting.md`` with the mean and standard deviation over
seeds of each setting, paired bootstrap intervals of its differences against the base model and
LoRA, and the paper's comparisons of BLoRA (and MAP) against LoRA. With delta scales every finished
point is also evaluated with its update scaled (``eval-scale<λ>.json``): the interpolation curves of
the report's frontier.
"""

from __future__ import annotations

import itertools
import json
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from pyro_blora.report.summaries import PRIOR_METHODS, evaluation_fields, paired_intervals, run_summary, setting_name
from pyro_blora.checkpoint import atomic_write_json, atomic_write_text
from pyro_blora.config import KL_NORMALIZATIONS, BLoRAConfig, TrainConfig
from pyro_blora.model.encoder_window import FULL_WINDOW_SECONDS
from pyro_blora.evaluation.scoring import EvalOptions, EvalSet
from pyro_blora.experiments.step import ensure_evaluated, ensure_trained, run_evaluation
from pyro_blora.metrics import Interval, backward_gain, degradation_reduction, relative_change
from pyro_blora.data.training_data import TrainingData
from pyro_blora.runs import METHODS, eval_file_name, evaluated, read_eval
from pyro_blora.training.methods import run_training
from pyro_blora.report.pages import BASE_CURVE_FILE
from pyro_blora.report.tables import BASE_INTERVALS, INTERVAL_NOTE, LORA_INTERVALS, change_cell, formatted_cell
from pyro_blora.report.tables import interval_cell, markdown_table, mean_std_cell, write_rows

__all__ = [
    "PRIOR_METHODS", "SweepConfig", "SweepPoint", "by_setting_markdown", "domain_table", "paired_intervals",
    "paper_comparisons", "read_results", "run_sweep", "summarize_seeds", "sweep_points", "write_domain_table",
]


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
        return setting_name(**asdict(self))

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


def _base_evaluation(path: Path, model: str | Path, eval_sets: Mapping[str, EvalSet], options: EvalOptions,
                     window: float) -> dict[str, Any]:
    """The base model's evaluation at ``path``, reused when it was scored with the runs' encoder window."""
    if path.is_file():
        existing = read_eval(path)
        if existing.get("encoder_window_seconds", FULL_WINDOW_SECONDS) == window:
            return existing
    return run_evaluation(model, eval_sets, options=options, out=path, encoder_window_seconds=window)


def _scale_plan(delta_scales: Sequence[float], ce_only_scales: Sequence[float],
                options: EvalOptions) -> list[tuple[float, EvalOptions]]:
    """(λ, options) of every delta scale; the CE-only ones skip greedy decoding. λ = 1 is eval.json."""
    both = sorted(set(delta_scales) & set(ce_only_scales))
    if both:
        raise ValueError(f"delta scales {both} are in both lists; give each scale once (--delta-scales decodes too, "
                         "--ce-only-scales scores teacher-forced CE only)")
    plan = [(scale, options) for scale in delta_scales] + \
        [(scale, replace(options, decode_limit=0)) for scale in ce_only_scales]
    return [(scale, opts) for scale, opts in plan if scale != 1]


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
    delta_scales: Sequence[float] = (),
    ce_only_scales: Sequence[float] = (),
    echo: Callable[[str], Any] = print,
) -> list[dict[str, Any]]:
    """Train and evaluate every unfinished point into ``<out>/runs``; return the results rows.

    ``adapter`` and ``train`` are the settings every point shares; each point overrides the rank,
    the prior and the seed (the point's seed replaces ``train.seed``). The base model is evaluated once
    (``<out>/base/eval.json``, with the runs' encoder window) and every point's changes are relative to
    it. ``in_domain`` names the trained domain among ``eval_sets`` (default: the
    training data folder's name). ``full_lr`` replaces ``train.lr`` for full fine-tuning, which
    diverges at the learning rates adapters take (Whisper's own recipe fine-tunes at 1e-5). With
    ``train.eval_every`` every point scores ``curve_sets`` (dev sets) during training: the
    forgetting curves of :func:`pyro_blora.report.pages.write_report`. Every finished point is evaluated
    at each of ``delta_scales`` (its update scaled by λ; ``eval-scale<λ>.json``) and, teacher-forced
    CE only, at each of ``ce_only_scales``; existing files are kept."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    points = sweep_points(config)
    scales = _scale_plan(delta_scales, ce_only_scales, eval_options)
    atomic_write_json(out / "sweep-config.json", {
        "grid": asdict(config), "model": str(model), "train_data": data.source, "domains": list(eval_sets),
        "adapter": adapter.to_dict(), "train": train.to_dict(), "full_lr": full_lr,
        "curve_domains": list(curve_sets or {}), "points": [p.name for p in points],
        "delta_scales": list(delta_scales), "ce_only_scales": list(ce_only_scales)})
    window = train.encoder_window_seconds
    base = _base_evaluation(out / "base" / "eval.json", model, eval_sets, eval_options, window)
    curve_start = out / "base" / BASE_CURVE_FILE
    if curve_sets and train.eval_every and not curve_start.is_file():  # step 0 of the curves
        run_evaluation(model, curve_sets, options=curve_options, out=curve_start, encoder_window_seconds=window)
    domain = in_domain or (Path(data.source).name if Path(data.source).name in eval_sets else next(iter(eval_sets)))
    rows: list[dict[str, Any]] = []
    for number, point in enumerate(points, 1):
        run_dir = out / "runs" / point.name
        prefix = f"[{number}/{len(points)}] {point.name}"
        settings = train.replace(seed=point.seed)
        if point.method == "full" and full_lr is not None:
            settings = settings.replace(lr=full_lr)

        def train_point(resume: bool, point=point, run_dir=run_dir, settings=settings) -> None:
            echo(f"{prefix}: training")
            run_training(point.method, model, data, run_dir, point.adapter(adapter), settings,
                         curve_sets=curve_sets, curve_options=curve_options,
                         resume=resume, run_info={"sweep": str(out), "point": asdict(point)})

        if not ensure_trained(run_dir, train_point) and evaluated(run_dir):
            echo(f"{prefix}: finished, skipped")
        for scale, options in [(1.0, eval_options), *scales]:
            def evaluate(scale=scale, options=options, run_dir=run_dir) -> dict[str, Any]:
                echo(f"{prefix}: evaluating" + (f" at delta scale {scale:g}" if scale != 1 else "")
                     + (" (CE only)" if options.decode_limit == 0 else ""))
                return run_evaluation(run_dir, eval_sets, options=options, base=base,
                                      delta_scale=None if scale == 1 else scale)

            ensure_evaluated(run_dir / eval_file_name(scale), evaluate)
        rows.append({"point": point.name, "setting": point.setting, "seed": point.seed,
                     **run_summary(run_dir, base=base, in_domain=domain)})
        write_rows(rows, out / "results")
        _write_by_setting(rows, out, base)
    echo(f"results: {out / 'results.csv'} ({len(rows)} points), {out / 'by-setting.md'}")
    return rows


# Columns summarised over seeds: errors, CE, their changes against the base model, sparsity of dW.
SUMMARY_COLUMNS = (
    "in_domain_error", "backward_error", "in_domain_error_change", "backward_error_change",
    "in_domain_ce", "backward_ce", "backward_language_id", "dW_thresh_fraction", "dW_hoyer_index",
)
# Columns whose meaning depends on the CE scope of the eval.json they come from.
CE_COLUMNS = ("in_domain_ce", "backward_ce")


def _scope_of(members: Sequence[Mapping[str, Any]]) -> str | None:
    """The CE scope rows share, ``mixed: ...`` when they differ, None without evaluations."""
    scopes = sorted({m["ce_scope"] for m in members if m.get("ce_scope")})
    return None if not scopes else scopes[0] if len(scopes) == 1 else "mixed: " + ", ".join(scopes)


def _mixes_scopes(scopes: Sequence[str | None]) -> bool:
    """Whether a table's CE values come from eval.json files of more than one CE scope."""
    found = {s for s in scopes if s}
    return len(found) > 1 or any(s.startswith("mixed") for s in found)


def summarize_seeds(rows: list[Mapping[str, Any]], columns: tuple[str, ...] = SUMMARY_COLUMNS) -> list[dict[str, Any]]:
    """One row per setting: ``<column>_mean``, ``<column>_std`` (sample standard deviation; 0 for one
    seed), the seeds it covers and the CE scope. CE is not averaged over seeds whose eval.json files
    differ in CE scope (older files scored every label token)."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["setting"], []).append(row)
    summary = []
    for setting, members in groups.items():
        entry: dict[str, Any] = {"setting": setting, "method": members[0]["method"], "rank": members[0]["rank"],
                                 "seeds": ",".join(str(m["seed"]) for m in members), "ce_scope": _scope_of(members)}
        for column in columns:
            if column in CE_COLUMNS and _mixes_scopes([entry["ce_scope"]]):
                continue
            values = [float(m[column]) for m in members if m.get(column) is not None]
            if values:
                entry[f"{column}_mean"] = statistics.fmean(values)
                entry[f"{column}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(entry)
    return summary


def paper_comparisons(summary: list[Mapping[str, Any]], base: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The paper's numbers for every BLoRA and MAP setting against the LoRA baseline of the same rank,
    on the means over seeds: backward gain = (LoRA's backward error - M's) / LoRA's (positive: M
    forgets less) and in-domain drop = (M's in-domain error - LoRA's) / LoRA's (positive: M adapts
    less); with ``base`` (evaluation_fields of the base model) also degradation reduction =
    1 - (M - base) / (LoRA - base) on the backward error (1: M keeps the base's backward error)."""
    lora = {row["rank"]: row for row in summary if row["method"] == "lora"}
    out = []
    for row in summary:
        baseline = lora.get(row["rank"])
        if row["method"] not in PRIOR_METHODS or baseline is None:
            continue
        if "backward_error_mean" not in row or "backward_error_mean" not in baseline:
            continue
        values = np.array([[baseline["backward_error_mean"], row["backward_error_mean"]],
                           [baseline["in_domain_error_mean"], row["in_domain_error_mean"]]])
        comparison = {"setting": row["setting"], "against": baseline["setting"],
                      "backward_gain": float(backward_gain(values[0])),
                      "in_domain_drop": float(relative_change(values[1]))}
        if base is not None and base.get("backward_error") is not None:
            comparison["degradation_reduction"] = float(degradation_reduction(np.array(
                [base["backward_error"], *values[0]])))
        out.append(comparison)
    return out


def by_setting_markdown(summary: list[Mapping[str, Any]], comparisons: list[Mapping[str, Any]],
                        intervals: Mapping[str, Mapping[str, Interval]] | None = None) -> str:
    """The table of :func:`summarize_seeds` (mean ± std over seeds) with the paired intervals of each
    setting against the base model, and the paper's comparisons against LoRA with theirs."""
    intervals = intervals or {}
    headers = {"in_domain_error": "in-domain error", "backward_error": "backward error",
               "in_domain_error_change": "in-domain change", "backward_error_change": "backward change",
               "dW_thresh_fraction": "dW below 1e-3"}
    mixed = _mixes_scopes([row.get("ce_scope") for row in summary])
    rows = [{"setting": row["setting"], "seeds": row["seeds"],
             **{header: mean_std_cell(row, column) for column, header in headers.items()},
             "dW Hoyer": mean_std_cell(row, "dW_hoyer_index", percent=False),
             **{header: interval_cell(intervals.get(row["setting"], {}).get(name), style)
                for name, header, style in BASE_INTERVALS},
             **({"CE scope": row.get("ce_scope")} if mixed else {})} for row in summary]
    page = markdown_table(rows) + "\n"
    if comparisons:
        page += "\n" + markdown_table([
            {"setting": c["setting"], "against": c["against"], "backward gain": change_cell(c["backward_gain"], digits=1),
             "degradation reduction": change_cell(c.get("degradation_reduction"), digits=1),
             "in-domain drop": change_cell(c["in_domain_drop"], digits=1),
             **{header: interval_cell(intervals.get(c["setting"], {}).get(name), style)
                for name, header, style in LORA_INTERVALS}} for c in comparisons]) + "\n"
    return page + "\n" + INTERVAL_NOTE + "\n"


def _with_intervals(summary: list[dict[str, Any]], intervals: Mapping[str, Mapping[str, Interval]]) -> None:
    """Each interval into its setting's row as ``<name>``, ``<name>_low`` and ``<name>_high`` (CSV/JSON)."""
    for row in summary:
        for name, interval in intervals.get(row["setting"], {}).items():
            row.update({name: interval.estimate, f"{name}_low": interval.low, f"{name}_high": interval.high})


def _evaluated(rows: Sequence[Mapping[str, Any]], runs: Path) -> list[tuple[Mapping[str, Any], dict[str, Any]]]:
    """(row, eval.json) of every evaluated point, read from ``runs/<point>``."""
    return [(row, read_eval(runs / row["point"])) for row in rows if row.get("in_domain")]


def _base_fields(rows: Sequence[Mapping[str, Any]], base: Mapping[str, Any]) -> dict[str, Any] | None:
    """evaluation_fields of the base model on the rows' in-domain set (None before any evaluation)."""
    domain = next((row["in_domain"] for row in rows if row.get("in_domain")), None)
    return None if domain is None else evaluation_fields(base["results"], domain)


def _write_by_setting(rows: list[Mapping[str, Any]], out: Path, base: Mapping[str, Any]) -> None:
    summary = summarize_seeds(rows)
    intervals = paired_intervals(_evaluated(rows, out / "runs"), base)
    comparisons = paper_comparisons(summary, _base_fields(rows, base))
    _with_intervals(summary, intervals)
    write_rows(summary, out / "by-setting")
    atomic_write_text(out / "by-setting.md", by_setting_markdown(summary, comparisons, intervals))


def read_results(out: str | Path) -> list[dict[str, Any]]:
    """The rows of a sweep's ``results.json``."""
    path = Path(out) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `pyro-blora sweep --out {out}` first")
    return json.loads(path.read_text())


def domain_table(sweeps: Sequence[str | Path]) -> list[dict[str, Any]]:
    """The paper's table over domains: for every sweep folder (one trained domain each) a base row and
    one row per setting with the mean ± std over its seeds: in-domain and backward error, their
    relative changes against the base model (improvement: positive = better; degradation: positive =
    worse) with paired bootstrap intervals of the differences, backward CE, the backward gain,
    degradation reduction and in-domain drop of BLoRA and MAP against LoRA (with intervals), and dW's
    sparsity. A ``CE scope`` column appears where the table mixes eval.json files of both CE scopes."""
    rows: list[dict[str, Any]] = []
    for folder in map(Path, sweeps):
        results = read_results(folder)
        if not results:
            continue
        domain = results[0]["in_domain"]
        base_eval = read_eval(folder / "base" / "eval.json")
        base = evaluation_fields(base_eval["results"], domain)
        rows.append({"domain": domain, "method": "base", "seeds": "-",
                     "in-domain error": formatted_cell(base["in_domain_error"], "{:.1%}"),
                     "backward error": formatted_cell(base["backward_error"], "{:.1%}"),
                     "backward CE": formatted_cell(base["backward_ce"], "{:.3f}"),
                     "backward language ID": formatted_cell(base["backward_language_id"], "{:.0%}"),
                     "CE scope": base["ce_scope"]})
        summary = summarize_seeds(results)
        comparisons = {c["setting"]: c for c in paper_comparisons(summary, base)}
        intervals = paired_intervals(_evaluated(results, folder / "runs"), base_eval)
        for row in summary:
            comparison, found = comparisons.get(row["setting"], {}), intervals.get(row["setting"], {})
            rows.append({
                "domain": domain, "method": row["setting"], "seeds": row["seeds"],
                "in-domain error": mean_std_cell(row, "in_domain_error"),
                "backward error": mean_std_cell(row, "backward_error"),
                "in-domain improvement vs base": change_cell(row.get("in_domain_error_change_mean"), -1.0),
                "backward degradation vs base": change_cell(row.get("backward_error_change_mean")),
                **{header: interval_cell(found.get(name), style) for name, header, style in BASE_INTERVALS[:2]},
                "backward CE": mean_std_cell(row, "backward_ce", percent=False),
                "backward language ID": mean_std_cell(row, "backward_language_id"),
                "backward gain vs LoRA": change_cell(comparison.get("backward_gain")),
                "degradation reduction vs LoRA": change_cell(comparison.get("degradation_reduction")),
                "in-domain drop vs LoRA": change_cell(comparison.get("in_domain_drop")),
                **{header: interval_cell(found.get(name), style) for name, header, style in LORA_INTERVALS[:3]},
                "dW below 1e-3": mean_std_cell(row, "dW_thresh_fraction"),
                "dW Hoyer": mean_std_cell(row, "dW_hoyer_index", percent=False),
                "CE scope": row.get("ce_scope"),
            })
    if not _mixes_scopes([row.get("CE scope") for row in rows]):
        for row in rows:
            row.pop("CE scope")
    return rows


def write_domain_table(sweeps: Sequence[str | Path], out: str | Path) -> Path:
    """:func:`domain_table` as ``<out>.md``, ``<out>.csv`` and ``<out>.json``; returns the Markdown file."""
    rows = domain_table(sweeps)
    if not rows:
        raise ValueError(f"none of {[str(s) for s in sweeps]} has finished points; run `pyro-blora sweep` first")
    out = Path(out)
    write_rows(rows, out)
    page = out.with_suffix(".md")
    atomic_write_text(page, markdown_table(rows) + "\n\n" + INTERVAL_NOTE + "\n")
    return page
