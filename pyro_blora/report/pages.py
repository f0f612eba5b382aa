"""Plots (PNG) and Markdown of finished runs: what ``pyro-blora inspect`` and ``report`` write.

Figures are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas, never through
pyplot, so no global backend is changed and nothing needs a display. Every ``plot_*`` function
returns a figure (for notebooks); the ``write_*`` functions save them next to a Markdown page that
names them.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pyro_blora.report.summaries import (
    STATISTICS,
    RunWeights,
    base_evaluation,
    evaluation_fields,
    find_runs,
    interpolation_curve,
    layer_table,
    load_run_weights,
    paired_intervals,
    run_summary,
    sparsity_rows,
)
from pyro_blora.training.methods import read_run_config
from pyro_blora.metrics import Interval, energy_curve, flatten_weights
from pyro_blora.metrics.bootstrap import DEFAULT_SAMPLES

__all__ = [
    "BASE_CURVE_FILE",
    "BASE_INTERVALS",
    "INTERVAL_NOTE",
    "LORA_INTERVALS",
    "SPARSITY_COLUMNS",
    "budget_rows",
    "interval_cell",
    "markdown_table",
    "paired_difference_rows",
    "plot_budget_curves",
    "plot_energy_curves",
    "plot_forgetting_curves",
    "plot_frontier",
    "plot_layer_posterior",
    "plot_magnitude_histograms",
    "plot_scale_histograms",
    "plot_sparsity_bars",
    "plot_training_curves",
    "read_log",
    "save_figure",
    "scale_summary",
    "short_layer_name",
    "write_inspection",
    "write_report",
    "write_rows",
]

STAT_LABELS = {
    "thresh_fraction": "Thresh@1e-3",
    "adaptive_thresh_fraction": "adaptive (0.5·mean|w|)",
    "top_energy_share": "top-1% energy",
    "hoyer_index": "Hoyer",
}
# Frontier panels: (title, x field, y field, axis unit). Fields are those of analysis.evaluation_fields.
FRONTIER_PANELS = (
    ("Error rate", "in_domain_error", "backward_error", "error rate"),
    ("Teacher-forced CE", "in_domain_ce", "backward_ce", "CE (nats/token)"),
)
CE_SCOPE_LABELS = {"transcript": "transcript tokens", "all": "all label tokens"}
# A sweep's base model scored on its dev-curve sets (``<sweep>/base/dev-curves.json``, an eval
# result): step 0 of the forgetting curves, since every method starts from the base model.
BASE_CURVE_FILE = "dev-curves.json"
CURVE_METRIC_LABELS = {"ce": "CE (nats/token)", "error_rate": "error rate", "language_id": "language-ID accuracy"}


# Paired differences with intervals: (interval name, column header, cell style).
BASE_INTERVALS = (
    ("in_domain_error_vs_base", "in-domain Δ vs base (95% CI)", "error"),
    ("backward_error_vs_base", "backward Δ vs base (95% CI)", "error"),
    ("backward_ce_vs_base", "backward CE Δ vs base (95% CI)", "ce"),
)
LORA_INTERVALS = (
    ("backward_gain", "backward gain (95% CI)", "relative"),
    ("degradation_reduction", "degradation reduction (95% CI)", "relative"),
    ("in_domain_drop", "in-domain drop (95% CI)", "relative"),
    ("backward_error_vs_lora", "backward Δ vs LoRA (95% CI)", "error"),
    ("in_domain_error_vs_lora", "in-domain Δ vs LoRA (95% CI)", "error"),
)
INTERVAL_NOTE = (f"Intervals: 95% paired bootstrap over test utterances ({DEFAULT_SAMPLES} resamples; seeds pooled by pairing seed s "
                 "with seed s and concatenating their utterances); \"-\" where an eval.json has no per-utterance "
                 "records. Degradation reduction = 1 - (M - base) / (LoRA - base) on the backward error.")


# How each interval is written: differences of error rates in percentage points, of CE in nats,
# relative numbers in percent.
_INTERVAL_STYLES = {"error": ("{:+.1f}", 100.0, " pt"), "ce": ("{:+.3f}", 1.0, ""), "relative": ("{:+.0f}", 100.0, "%")}


def interval_cell(interval: Interval | None, style: str) -> str:
    """``+1.2 [-0.4, +2.9] pt``: estimate and interval, or "-" where there is none."""
    if interval is None:
        return "-"
    number, factor, unit = _INTERVAL_STYLES[style]
    low, high = (number.format(factor * v) for v in (interval.low, interval.high))
    return f"{number.format(factor * interval.estimate)}{unit} [{low}, {high}]"


# ----------------------------------------------------------------------------------- helpers
def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as PNG with the Agg canvas (no display, no pyplot)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png", dpi=110, bbox_inches="tight")
    return path


def short_layer_name(path: str) -> str:
    """``model.encoder.layers.0.self_attn.q_proj`` -> ``enc0.self_attn.q``: fits under a bar."""
    name = re.sub(r"^model\.(encoder|decoder)\.layers\.(\d+)\.", lambda m: f"{m[1][:3]}{m[2]}.", path)
    return name.removesuffix("_proj")


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "run"


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table of ``rows`` (columns: given, or every key in first-seen order)."""
    columns = list(columns or dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_rows(rows: Sequence[Mapping[str, Any]], stem: str | Path) -> tuple[Path, Path]:
    """``<stem>.csv`` and ``<stem>.json`` of a results table; written whole, replaced atomically."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    csv_path, json_path = stem.with_suffix(".csv"), stem.with_suffix(".json")
    tmp = csv_path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(csv_path)
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(list(rows), indent=1, default=str))
    tmp.replace(json_path)
    return csv_path, json_path


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's ``log.jsonl`` (one per step)."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no log.jsonl: it is not a run folder")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _labels(paths: Sequence[Path]) -> list[str]:
    """Folder names, with the parent's name added where two runs share one (the sweep's name for
    runs of a sweep's ``runs/`` folder)."""
    names = [p.name for p in paths]

    def owner(path: Path) -> str:
        return path.parent.parent.name if path.parent.name == "runs" else path.parent.name

    return [f"{owner(p)}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


# ----------------------------------------------------------------------------------- inspect plots
def plot_magnitude_histograms(runs: Sequence[RunWeights]) -> Figure:
    """Histogram of |w| (log-spaced bins) of A, B and dW, one outline per run. Exact zeros cannot
    sit on a log axis; their count is given in the legend."""
    figure = Figure(figsize=(13, 3.6))
    matrices = [m for m in ("A", "B", "dW") if any(m in r.matrices() for r in runs)]
    for position, matrix in enumerate(matrices, 1):
        axes = figure.add_subplot(1, len(matrices), position)
        for run in runs:
            if matrix not in run.matrices():
                continue
            magnitudes = flatten_weights(run.matrices()[matrix]).abs().double().numpy()
            positive = magnitudes[magnitudes > 0]
            zeros = magnitudes.size - positive.size
            if positive.size:
                bins = np.logspace(math.log10(positive.min()), math.log10(positive.max()) + 1e-9, 60)
                axes.hist(positive, bins=bins, histtype="step", density=False,
                          label=f"{run.name}" + (f" ({zeros} zeros)" if zeros else ""))
        axes.set_xscale("log")
        axes.axvline(1e-3, color="grey", linestyle=":", linewidth=1)
        axes.set(title=f"|{matrix}|", xlabel="magnitude (log)", ylabel="entries")
        axes.legend(fontsize=7)
    figure.suptitle("Adapter magnitudes (dotted: the 1e-3 threshold)")
    return figure


def plot_scale_histograms(runs: Sequence[RunWeights]) -> Figure:
    """Histogram of the posterior standard deviations of A and of B (log-spaced bins), one outline
    per Bayesian run, with each run's prior scale: did the posterior stay near the prior or shrink?"""
    runs = [run for run in runs if run.bayesian]
    figure = Figure(figsize=(11, 3.6))
    for position, matrix in enumerate(("A", "B"), 1):
        axes = figure.add_subplot(1, 2, position)
        for run in runs:
            scales = flatten_weights(getattr(run, f"stddev_{matrix}")).double().numpy()
            bins = np.logspace(math.log10(scales.min()), math.log10(scales.max()) + 1e-9, 60)
            line = axes.hist(scales, bins=bins, histtype="step", label=run.name)[2][0]
            if run.prior_scale is not None:
                axes.axvline(run.prior_scale, color=line.get_edgecolor(), linestyle=":", linewidth=1)
        axes.set_xscale("log")
        axes.set(title=f"posterior std of {matrix}", xlabel="σ (log)", ylabel="entries")
        axes.legend(fontsize=7)
    figure.suptitle("Posterior scales at the end of training (dotted: the prior's σp)")
    return figure


def scale_summary(run: RunWeights) -> dict[str, Any]:
    """Quantiles of a Bayesian run's posterior standard deviations, and the share within a factor
    of two of the prior scale."""
    row: dict[str, Any] = {"run": run.name}
    for matrix in ("A", "B"):
        scales = flatten_weights(getattr(run, f"stddev_{matrix}")).double()
        for q in (0.05, 0.5, 0.95):
            row[f"sigma_{matrix}_q{int(q * 100):02d}"] = float(torch.quantile(scales[:: max(1, scales.numel() // 1_000_000)], q))
        if run.prior_scale is not None:
            near = (scales > run.prior_scale / 2) & (scales < run.prior_scale * 2)
            row[f"sigma_{matrix}_near_prior"] = float(near.double().mean())
    return row


def plot_energy_curves(runs: Sequence[RunWeights]) -> Figure:
    """Cumulative share of Σ dW² held by the largest entries: the higher and earlier, the sparser."""
    figure = Figure(figsize=(5.5, 4))
    axes = figure.add_subplot()
    for run in runs:
        fractions, shares = energy_curve(run.delta)
        axes.plot(fractions, shares, label=run.name)
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="uniform")
    axes.set(xscale="log", xlim=(1e-4, 1), ylim=(0, 1.01), xlabel="fraction of dW entries (largest first, log)",
             ylabel="cumulative energy share", title="Energy concentration of dW")
    axes.legend(fontsize=8)
    return figure


def plot_layer_posterior(runs: Sequence[RunWeights]) -> Figure:
    """Per adapted layer: KL(q || p) and the mean posterior std of A and B (Bayesian runs only)."""
    bayesian = [r for r in runs if r.bayesian]
    if not bayesian:
        raise ValueError("no Bayesian (blora) run among the runs: per-layer KL and scales need a posterior")
    layers = list(bayesian[0].delta)
    figure = Figure(figsize=(max(8, 0.45 * len(layers) + 3), 7))
    kl_axes, scale_axes = figure.add_subplot(2, 1, 1), figure.add_subplot(2, 1, 2)
    positions = np.arange(len(layers))
    width = 0.8 / len(bayesian)
    for index, run in enumerate(bayesian):
        table = {row["layer"]: row for row in layer_table(run)}
        offset = positions - 0.4 + (index + 0.5) * width
        kl_axes.bar(offset, [table.get(layer, {}).get("kl", np.nan) for layer in layers], width, label=run.name)
        for matrix, marker in (("A", "o"), ("B", "s")):
            scale_axes.plot(positions, [table.get(layer, {}).get(f"mean_std_{matrix}", np.nan) for layer in layers],
                            marker=marker, linestyle="-", label=f"{run.name}: {matrix}")
    kl_axes.set(ylabel="KL (nats)", title="KL(q || prior) per layer")
    scale_axes.set(ylabel="mean posterior std", yscale="log", title="Posterior scale per layer")
    for axes in (kl_axes, scale_axes):
        axes.set_xticks(positions, [short_layer_name(layer) for layer in layers], rotation=60, ha="right", fontsize=7)
        axes.legend(fontsize=7)
    figure.tight_layout()
    return figure


# ----------------------------------------------------------------------------------- report plots
def plot_frontier(curves: Mapping[str, Mapping[str, Any]], base: Mapping[str, Any] | None = None) -> Figure:
    """Stability-plasticity frontier under weight interpolation, in-domain (x) against backward (y):
    error rates on the left, teacher-forced CE on the right. ``curves`` maps a run's label to its
    ``method`` and ``points`` (:func:`~pyro_blora.report.summaries.interpolation_curve`): one line per run
    through its delta scales λ (W0 + λ ΔW), coloured by method, λ written at the points. ``base``
    (evaluation_fields of the base model) is the star at λ = 0, where every line starts. The CE panel
    uses every scale (CE-only ones too); lower-left is better on both axes."""
    figure = Figure(figsize=(13, 5.5))
    colours = {method: f"C{i}" for i, method in enumerate(dict.fromkeys(c["method"] for c in curves.values()))}
    drawn = 0
    for position, (title, x_key, y_key, unit) in enumerate(FRONTIER_PANELS, 1):
        axes = figure.add_subplot(1, len(FRONTIER_PANELS), position)
        start = None if base is None or base.get(x_key) is None or base.get(y_key) is None else (base[x_key], base[y_key])
        scopes, labelled = set(), set()
        for label, curve in curves.items():
            points = [(p[x_key], p[y_key], p["scale"]) for p in curve["points"]
                      if p.get(x_key) is not None and p.get(y_key) is not None]
            if not points:
                continue
            if "ce" in x_key:
                scopes |= {p.get("ce_scope") for p in curve["points"]}
            inserted = start is not None and all(scale != 0 for *_, scale in points)
            if inserted:
                points.insert(0, (*start, 0.0))
            method = curve["method"]
            xs, ys, scales = zip(*points)
            axes.plot(xs, ys, marker="o", markersize=4, linewidth=1.4, color=colours[method],
                      label=None if method in labelled else method)
            labelled.add(method)
            if len(curves) <= 6:
                for x, y, scale in points[inserted:]:
                    axes.annotate(f"{scale:g}", (x, y), fontsize=6, color="dimgrey", xytext=(3, -8),
                                  textcoords="offset points")
            axes.annotate(label, (xs[-1], ys[-1]), fontsize=7, xytext=(4, 4), textcoords="offset points")
            drawn += 1
        if start is not None:
            axes.scatter(*start, marker="*", s=160, color="black", zorder=5, label="base (λ = 0)")
        if not labelled:
            axes.text(0.5, 0.5, "no run has these metrics", ha="center", va="center", transform=axes.transAxes)
        scope = ", ".join(CE_SCOPE_LABELS.get(s, str(s)) for s in sorted(scopes, key=str))
        if len(scopes) > 1:
            scope = "MIXED SCOPES: " + scope
        suffix = f", {scope}" if scope else ""
        axes.set(xlabel=f"in-domain {unit}{suffix}", ylabel=f"backward {unit}{suffix}", title=title)
        axes.grid(True, linewidth=0.5, alpha=0.5)
        if labelled or start is not None:
            axes.legend(fontsize=8)
    if not drawn:
        raise ValueError("the frontier needs evaluated runs: run `pyro-blora evaluate` on each run first")
    figure.suptitle("Stability-plasticity frontier: each run's update scaled by λ (numbers at the points)")
    figure.tight_layout()
    return figure


def plot_sparsity_bars(summaries: Sequence[Mapping[str, Any]]) -> Figure:
    """The four sparsity statistics of dW, averaged over each method's runs."""
    methods = list(dict.fromkeys(s["method"] for s in summaries if "dW_hoyer_index" in s))
    if not methods:
        raise ValueError("no run has sparsity statistics; summarise runs with sparsity=True")
    figure = Figure(figsize=(7.5, 4))
    axes = figure.add_subplot()
    positions = np.arange(len(STATISTICS))
    width = 0.8 / len(methods)
    for index, method in enumerate(methods):
        rows = [s for s in summaries if s["method"] == method and "dW_hoyer_index" in s]
        means = [float(np.nanmean([r[f"dW_{stat}"] for r in rows])) for stat in STATISTICS]
        axes.bar(positions - 0.4 + (index + 0.5) * width, means, width, label=f"{method} ({len(rows)} runs)")
    axes.set_xticks(positions, [STAT_LABELS[s] for s in STATISTICS])
    axes.set(ylim=(0, 1), ylabel="value (higher = sparser)", title="Sparsity of dW by method")
    axes.legend(fontsize=8)
    return figure


def plot_training_curves(run_dir: str | Path, title: str | None = None) -> Figure:
    """Loss, NLL and KL over steps, and the logged dev/backward metrics (``<domain>/<metric>``)."""
    records = read_log(run_dir)
    if not records:
        raise ValueError(f"{run_dir}/log.jsonl is empty: the run has not taken a step")
    metrics = sorted({key.split("/", 1)[1] for key in curve_keys(records)})
    panels = ["loss", "nll", "kl"] + (["eval_nll"] if any("eval_nll" in r for r in records) else []) + metrics
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.2 * columns, 3 * rows))
    for position, panel in enumerate(panels, 1):
        axes = figure.add_subplot(rows, columns, position)
        keys = [panel] if panel in ("loss", "nll", "kl", "eval_nll") else \
            sorted({k for r in records for k in r if k.endswith(f"/{panel}")})
        for key in keys:
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                axes.plot(*zip(*points), marker="." if len(points) < 30 else None, label=key)
        axes.set(title=panel, xlabel="step")
        if keys != [panel]:
            axes.legend(fontsize=7)
    figure.suptitle(title or Path(run_dir).name)
    figure.tight_layout()
    return figure


def plot_budget_curves(run_dir: str | Path, title: str | None = None) -> Figure:
    """A budgeted run over steps: beta (log scale; blora and map), the retention loss against its
    limit (measured and smoothed), and the in-domain loss (the training NLL, and the dev CE the run
    logged)."""
    records = read_log(run_dir)
    measured = [r for r in records if r.get("retain_ce") is not None]
    if not measured:
        raise ValueError(f"{run_dir} is not a budgeted run: its log has no retention loss (train with --retain-budget)")
    with_beta = [r for r in measured if r.get("beta") is not None]
    panels = (["beta"] if with_beta else []) + ["retention", "in-domain"]
    figure = Figure(figsize=(4.4 * len(panels), 3.3))
    for position, panel in enumerate(panels, 1):
        axes = figure.add_subplot(1, len(panels), position)
        steps = [r["step"] for r in measured]
        if panel == "beta":
            axes.plot([r["step"] for r in with_beta], [r["beta"] for r in with_beta], marker=".")
            axes.set(yscale="log", title="β (KL weight)", xlabel="step")
        elif panel == "retention":
            axes.plot(steps, [r["retain_ce"] for r in measured], marker=".", label="measured")
            axes.plot(steps, [r["retain_ce_avg"] for r in measured], linestyle="--", label="moving average")
            axes.plot(steps, [r["retain_limit"] for r in measured], color="red", linestyle=":", label="limit")
            axes.set(title="retention loss (CE / transcript token)", xlabel="step")
            axes.legend(fontsize=7)
        else:
            axes.plot([r["step"] for r in records], [r["nll"] for r in records], label="training NLL", alpha=0.6)
            for key in sorted({k for r in records for k in r if k.endswith("/ce") or k == "eval_nll"}):
                points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
                axes.plot(*zip(*points), marker=".", label=key)
            axes.set(title="in-domain loss", xlabel="step")
            axes.legend(fontsize=7)
    figure.suptitle(title or Path(run_dir).name)
    figure.tight_layout()
    return figure


def budget_rows(paths: Sequence[Path], labels: Sequence[str]) -> list[dict[str, Any]]:
    """One row per budgeted run from its ``result.json``: the budget, what the run kept, its retention
    loss against the limit, the final beta and whether the budget was met."""
    rows = []
    for label, path in zip(labels, paths):
        result = Path(path) / "result.json"
        summary = json.loads(result.read_text()).get("budget") if result.is_file() else None
        if summary:
            rows.append({"run": label, "budget": summary["described"], "kept": summary["kept"],
                         "kept_step": summary.get("kept_step"), "scale": summary.get("scale"),
                         "retain_ce": summary["retain_ce"], "retain_limit": summary["retain_limit"],
                         "base_retain_ce": summary["base_retain_ce"], "final_beta": summary.get("final_beta"),
                         "met": summary["met"], "met_during_training": summary["met_during_training"]})
    return rows


def curve_keys(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The ``<domain>/<metric>`` fields a run logged during training (its dev curves)."""
    return sorted({key for record in records for key in record if "/" in key})


def plot_forgetting_curves(runs: Mapping[str, str | Path], start: Mapping[str, Mapping[str, float]] | None = None) -> Figure:
    """Every logged dev metric over training steps, one panel per ``<domain>/<metric>`` and one line
    per run (``runs`` maps labels to run folders), so methods are compared on the same axes.
    ``start`` (eval results of the base model on the same dev sets) gives step 0."""
    logs = {label: read_log(path) for label, path in runs.items()}
    keys = sorted({key for records in logs.values() for key in curve_keys(records)})
    if not keys:
        raise ValueError("no run logged dev curves: train with eval_every > 0 and curve sets (--eval-every)")
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    figure = Figure(figsize=(4.2 * columns, 3.2 * rows))
    for position, key in enumerate(keys, 1):
        domain, metric = key.split("/", 1)
        axes = figure.add_subplot(rows, columns, position)
        for label, records in logs.items():
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if start is not None and start.get(domain, {}).get(metric) is not None:
                points.insert(0, (0, start[domain][metric]))
            if points:
                axes.plot(*zip(*points), marker=".", label=label)
        axes.set(title=f"{domain}: {CURVE_METRIC_LABELS.get(metric, metric)}", xlabel="step")
        axes.legend(fontsize=7)
    figure.suptitle("Dev metrics during training" + (" (step 0: base model)" if start is not None else ""))
    figure.tight_layout()
    return figure


def _curve_start(runs: Sequence[str | Path]) -> dict[str, Any] | None:
    """The base model's dev-curve scores of the first given sweep folder that has them."""
    for folder in runs:
        path = Path(folder) / "base" / BASE_CURVE_FILE
        if path.is_file():
            return json.loads(path.read_text())["results"]
    return None


# ----------------------------------------------------------------------------------- pages
SPARSITY_COLUMNS = ("run", "method", "matrix", "n", *STATISTICS)


def write_inspection(runs: Sequence[str | Path], out: str | Path) -> Path:
    """``inspect.md`` (sparsity table, per-layer tables), ``inspect.json`` and the plots of the runs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = find_runs(runs)
    weights = [load_run_weights(path) for path in paths]
    for label, run in zip(_labels(paths), weights):
        run.name = label
    rows = sparsity_rows(weights)
    layers = {run.name: layer_table(run) for run in weights}
    scale_rows = [scale_summary(run) for run in weights if run.bayesian]
    (out / "inspect.json").write_text(json.dumps({"sparsity": rows, "scales": scale_rows, "layers": layers}, indent=1))
    images = {"magnitudes.png": ("Histogram of |w|", plot_magnitude_histograms(weights)),
              "energy.png": ("Cumulative energy of dW", plot_energy_curves(weights))}
    if scale_rows:
        images["layers.png"] = ("Per-layer KL and posterior scale", plot_layer_posterior(weights))
        images["scales.png"] = ("Posterior scales", plot_scale_histograms(weights))
    for name, (_, figure) in images.items():
        save_figure(figure, out / name)
    lines = ["# Adapter inspection", "", f"Runs: {', '.join(f'`{p}`' for p in paths)}.", "",
             "## Sparsity (all layers pooled; higher = sparser)", "",
             markdown_table(rows, SPARSITY_COLUMNS), ""]
    if scale_rows:
        lines += ["## Posterior scales (quantiles; share within a factor 2 of σp)", "", markdown_table(scale_rows), ""]
    for name, (caption, _) in images.items():
        lines += [f"## {caption}", "", f"![{caption}]({name})", ""]
    for run_name, table in layers.items():
        lines += [f"## Layers of {run_name}", "", markdown_table(table), ""]
    page = out / "inspect.md"
    page.write_text("\n".join(lines))
    return page


SUMMARY_COLUMNS = ("run", "method", "rank", "beta", "prior_scale", "kl_normalization", "nll", "in_domain_error",
                   "in_domain_ce", "backward_error", "backward_ce", "ce_scope", "backward_error_change",
                   "backward_ce_change", *(f"dW_{s}" for s in STATISTICS))


def _paired_groups(paths: Sequence[Path], summaries: Sequence[Mapping[str, Any]],
                   base: Mapping[str, Any] | str | Path | None) -> dict[str, tuple[dict[str, Any], list]]:
    """Evaluated runs grouped by the base evaluation they are compared with (the given one, else each
    sweep's or main job's): {folder: (base eval, [(row with setting and seed, eval.json)])}. A run of
    a sweep takes its sweep setting, so that its seeds are pooled; any other run is its own setting."""
    from pyro_blora.experiments.main_job import read_eval
    from pyro_blora.experiments.sweep import SweepPoint

    groups: dict[str, tuple[dict[str, Any], list]] = {}
    for path, summary in zip(paths, summaries):
        reference = base_evaluation(path, base)
        if "in_domain" not in summary or reference is None:
            continue
        run = read_run_config(path)["run"]
        setting = SweepPoint(**run["point"]).setting if "point" in run else summary["run"]
        key = "" if base is not None else str(path.parent.parent)
        groups.setdefault(key, (reference, []))[1].append(
            ({**summary, "setting": setting, "seed": run.get("seed", 0)}, read_eval(path)))
    return groups


def paired_difference_rows(groups: Mapping[str, tuple[Mapping[str, Any], list]]) -> list[dict[str, str]]:
    """One row per setting: its differences against the base model and LoRA with their intervals."""
    rows = []
    for key, (reference, members) in groups.items():
        for setting, found in paired_intervals(members, reference).items():
            rows.append({"setting": f"{Path(key).name}/{setting}" if len(groups) > 1 else setting,
                         **{header: interval_cell(found.get(name), style)
                            for name, header, style in (*BASE_INTERVALS, *LORA_INTERVALS)}})
    return rows


def write_report(runs: Sequence[str | Path], out: str | Path, *, base: Mapping[str, Any] | str | Path | None = None,
                 in_domain: str | None = None) -> Path:
    """``report.md`` with the frontier (each run's delta-scale curve), paired differences with bootstrap
    intervals, the sparsity comparison, each run's training curves, and ``summary.csv``/``summary.json``
    (one row per finished run). The base model's evaluation is ``base`` or the ``base/eval.json`` of
    the sweep (or main job) holding the runs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = find_runs(runs)
    labels = _labels(paths)
    summaries = [run_summary(path, base=base, in_domain=in_domain) for path in paths]
    for label, summary in zip(labels, summaries):
        summary["run"] = label
    write_rows(summaries, out / "summary")
    lines = ["# Runs report", "", f"{len(paths)} finished runs: {', '.join(f'`{p}`' for p in paths)}.", "",
             "Errors are mean error rates (WER or mixed error rate) and CE is teacher-forced cross-entropy per token "
             "(`ce_scope`: transcript tokens, or all label tokens in evaluations written before that split); "
             "backward = every evaluated domain other than the one trained on; changes are relative to the base model "
             "(positive = worse). `nll` is the final training-set NLL.", "",
             markdown_table(summaries, [c for c in SUMMARY_COLUMNS if any(c in s for s in summaries)]), ""]
    groups = _paired_groups(paths, summaries, base)
    curves = {label: {"method": summary["method"], "points": interpolation_curve(path, in_domain)}
              for label, summary, path in zip(labels, summaries, paths) if "in_domain" in summary}
    if curves:
        start = None
        if len(groups) == 1:  # one base model for every run: its point starts every curve
            reference, members = next(iter(groups.values()))
            start = evaluation_fields(reference["results"], members[0][0]["in_domain"])
        save_figure(plot_frontier(curves, start), out / "frontier.png")
        lines += ["## Stability-plasticity frontier", "",
                  "Each line is one run with its update scaled by λ, W0 + λ (W_run - W0) (`--delta-scale`; λ = 1 is "
                  "the run as trained, the star λ = 0 the base model); lower-left is better.", "",
                  "![frontier](frontier.png)", ""]
    else:
        lines += ["No run has an eval.json yet (`pyro-blora evaluate <run>`): no frontier.", ""]
    paired = paired_difference_rows(groups)
    if paired:
        lines += ["## Paired differences", "", "Against the base model and against LoRA of the same rank (BLoRA and "
                  "MAP; seed s paired with seed s).", "", markdown_table(paired), "", INTERVAL_NOTE, ""]
    save_figure(plot_sparsity_bars(summaries), out / "sparsity.png")
    lines += ["## Sparsity of dW by method", "", "![sparsity](sparsity.png)", ""]
    with_curves = {label: path for label, path in zip(labels, paths) if curve_keys(read_log(path))}
    if with_curves:
        save_figure(plot_forgetting_curves(with_curves, _curve_start(runs)), out / "forgetting.png")
        lines += ["## Forgetting curves", "", "Dev metrics scored during training (`--eval-every`), one line per run.",
                  "", "![forgetting curves](forgetting.png)", ""]
    budgeted = budget_rows(paths, labels)
    if budgeted:
        lines += ["## Forgetting budgets", "", "β, the retention loss (dotted: the limit) and the in-domain loss over "
                  "steps. `kept`: the weights the run kept (final, the last checkpoint inside the budget, or the "
                  "final update scaled); `met_during_training` false means no measurement during training was "
                  "inside the budget.", "", markdown_table(budgeted), ""]
        for row in budgeted:
            name = f"budget-{_file_stem(row['run'])}.png"
            save_figure(plot_budget_curves(dict(zip(_labels(paths), paths))[row["run"]], title=row["run"]), out / name)
            lines += [f"![budget of {row['run']}]({name})", ""]
    lines += ["## Training curves", ""]
    for label, path in zip(labels, paths):
        name = f"curves-{_file_stem(label)}.png"
        save_figure(plot_training_curves(path, title=label), out / name)
        lines += [f"### {label}", "", f"![curves of {label}]({name})", ""]
    page = out / "report.md"
    page.write_text("\n".join(lines))
    return page
