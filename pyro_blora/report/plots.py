"""Plots (PNG) of runs, sweeps, sequences, uncertainty and transcripts: every figure the pages show.

Figures are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas, never through
pyplot, so no global backend is changed and nothing needs a display. Every ``plot_*`` function
returns a figure (for notebooks); :func:`save_figure` writes one as PNG, whole or not at all.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pyro_blora.checkpoint import atomic_write_bytes
from pyro_blora.evaluation.uncertainty import UncertaintyReport
from pyro_blora.metrics import energy_curve, flatten_weights
from pyro_blora.predict.subtitles import timed_segments
from pyro_blora.predict.transcripts import UtteranceTranscript
from pyro_blora.report.summaries import STATISTICS, RunWeights, layer_table
from pyro_blora.report.tables import metric_cell
from pyro_blora.runs import read_log

__all__ = [
    "curve_keys",
    "plot_budget_curves",
    "plot_confidence",
    "plot_budget_frontier",
    "plot_energy_curves",
    "plot_forgetting_curves",
    "plot_frontier",
    "plot_layer_posterior",
    "plot_magnitude_histograms",
    "plot_matrix",
    "plot_reliability",
    "plot_scale_histograms",
    "plot_selective",
    "plot_sparsity_bars",
    "plot_training_curves",
    "save_figure",
    "short_layer_name",
    "write_uncertainty_plots",
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
CURVE_METRIC_LABELS = {"ce": "CE (nats/token)", "error_rate": "error rate", "language_id": "language-ID accuracy"}


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as PNG with the Agg canvas (no display, no pyplot), replacing ``path`` atomically."""
    path = Path(path)
    FigureCanvasAgg(figure)
    data = io.BytesIO()
    figure.savefig(data, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, data.getvalue())
    return path


def short_layer_name(path: str) -> str:
    """``model.encoder.layers.0.self_attn.q_proj`` -> ``enc0.self_attn.q``: fits under a bar."""
    name = re.sub(r"^model\.(encoder|decoder)\.layers\.(\d+)\.", lambda m: f"{m[1][:3]}{m[2]}.", path)
    return name.removesuffix("_proj")


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
    limit (measured, its upper bound, and the smoothed value the budget follows), and the in-domain loss (the training NLL, and the dev CE the run
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
            if all(r.get("retain_ce_upper") is not None for r in measured):  # runs before the bound lack it
                axes.plot(steps, [r["retain_ce_upper"] for r in measured], marker=".", label="upper bound")
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


# ----------------------------------------------------------------------------------- sequence plots
def plot_matrix(values: Sequence[Sequence[float]], rows: Sequence[str], columns: Sequence[str], metric: str,
                title: str) -> Figure:
    """Heat-map of one accuracy matrix of a sequence (rows: after each step, columns: the evaluated
    domains), every cell annotated as the matrix page writes it."""
    values = np.asarray(values)
    figure = Figure(figsize=(1.4 + 1.1 * len(columns), 1.0 + 0.55 * len(rows)))
    axes = figure.add_subplot()
    image = axes.imshow(values, cmap="viridis_r", aspect="auto")
    figure.colorbar(image, ax=axes, label="error rate" if metric == "error_rate" else "CE (nats/token)")
    middle = (values.max() + values.min()) / 2
    for (i, j), value in np.ndenumerate(values):
        axes.text(j, i, metric_cell(float(value), metric), ha="center", va="center", fontsize=8,
                  color="white" if value > middle else "black")
    axes.set_xticks(range(len(columns)), columns)
    axes.set_yticks(range(len(rows)), rows)
    axes.set(xlabel="evaluated domain", ylabel="after step", title=title)
    return figure


# ----------------------------------------------------------------------------------- uncertainty plots
def plot_selective(report: UncertaintyReport) -> Figure:
    """Selective prediction: the error rate of the utterances kept when the most uncertain are
    rejected, one line per uncertainty score, against the oracle that rejects the worst first."""
    figure = Figure(figsize=(5.5, 4))
    axes = figure.add_subplot()
    for name, quality in report.scores.items():
        axes.plot(report.rejection, quality.selective_error, marker="o", markersize=3,
                  label=f"{name} (area {quality.selective_area:.3f})")
    axes.plot(report.rejection, report.oracle_selective_error, linestyle="--", color="grey", label="oracle")
    axes.set(xlabel="fraction rejected (most uncertain first)", ylabel="error rate of kept utterances",
             title=f"Selective prediction ({report.num_utterances} utterances)")
    axes.legend(fontsize=7)
    figure.tight_layout()
    return figure


def plot_reliability(report: UncertaintyReport) -> Figure:
    """Reliability diagram of the word confidences: the share of correct words per confidence bin
    (its word count on top) against perfect calibration."""
    figure = Figure(figsize=(4.5, 4))
    axes = figure.add_subplot()
    filled = [b for b in report.reliability if b.count]
    axes.bar([(b.lower + b.upper) / 2 for b in filled], [b.accuracy for b in filled],
             width=[b.upper - b.lower for b in filled], edgecolor="black", alpha=0.7, label="word accuracy")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    for b in filled:
        axes.annotate(str(b.count), ((b.lower + b.upper) / 2, b.accuracy), ha="center", va="bottom", fontsize=6)
    axes.set(xlabel="word confidence (fraction of agreeing samples)", ylabel="fraction of words correct",
             title=f"Reliability (ECE {report.ece:.3f}, {report.num_words} words)", xlim=(0, 1), ylim=(0, 1.05))
    axes.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    return figure


def write_uncertainty_plots(report: UncertaintyReport, out_dir: str | Path, prefix: str = "") -> list[Path]:
    """``<prefix>selective.png`` and ``<prefix>reliability.png`` of an uncertainty report."""
    out_dir = Path(out_dir)
    return [save_figure(plot_selective(report), out_dir / f"{prefix}selective.png"),
            save_figure(plot_reliability(report), out_dir / f"{prefix}reliability.png")]


# ----------------------------------------------------------------------------------- transcript plots
def plot_confidence(transcript: UtteranceTranscript, low_confidence: float = 0.5) -> Figure:
    """Each word's confidence at its place in time (words spread evenly over their segment),
    segments shaded, the threshold dashed."""
    segments = timed_segments(transcript)
    figure = Figure(figsize=(max(6.0, min(24.0, (transcript.duration or 30.0) / 10)), 3.2))
    axes = figure.add_subplot()
    times, values = [], []
    for index, segment in enumerate(segments):
        axes.axvspan(segment.start, segment.end, color="0.92" if index % 2 else "0.85", zorder=0)
        step = (segment.end - segment.start) / len(segment.words)
        for k, word in enumerate(segment.words):
            times.append(segment.start + (k + 0.5) * step)
            values.append(word.confidence)
    axes.scatter(times, values, s=8, c=["#d62728" if v < low_confidence else "#1f77b4" for v in values], zorder=2)
    axes.axhline(low_confidence, linestyle="--", color="grey", linewidth=0.8)
    axes.set(xlim=(0, transcript.duration or (segments[-1].end if segments else 1.0)), ylim=(-0.05, 1.05),
             xlabel="time (s)", ylabel="word confidence",
             title=f"{transcript.id}: {sum(v < low_confidence for v in values)} of {len(values)} words below "
                   f"{low_confidence:.2f}")
    figure.tight_layout()
    return figure


def plot_budget_frontier(points: Sequence[Mapping[str, float]], budgets: Sequence[float], confidence: float,
                  name: str = "retention") -> Figure:
    """A run's forgetting frontier: the retention CE's change against the update's scale λ, its
    one-sided upper bound, and the budgets (horizontal lines) the bound must stay under."""
    figure = Figure(figsize=(6, 4))
    axes = figure.add_subplot()
    scales = [p["scale"] for p in points]
    axes.plot(scales, [100 * p["change"] for p in points], marker=".", label="point estimate")
    axes.plot(scales, [100 * p["change_upper"] for p in points], marker=".", linestyle="--",
              label=f"{100 * confidence:g}% upper bound")
    for budget in budgets:
        axes.axhline(100 * budget, color="red", linestyle=":", linewidth=0.8)
        axes.annotate(f"{100 * budget:g}%", (0, 100 * budget), fontsize=8, color="red", va="bottom")
    axes.set_xlabel("λ (W0 + λ ΔW)")
    axes.set_ylabel(f"{name} CE change (%)")
    axes.set_title("forgetting frontier")
    axes.legend()
    return figure
