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
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pyro_blora.analysis import (
    STATISTICS,
    RunWeights,
    find_runs,
    layer_table,
    load_run_weights,
    run_summary,
    sparsity_rows,
)
from pyro_blora.metrics import energy_curve, flatten_weights

__all__ = [
    "BASE_CURVE_FILE",
    "SPARSITY_COLUMNS",
    "budget_rows",
    "markdown_table",
    "plot_budget_curves",
    "plot_energy_curves",
    "plot_forgetting_curves",
    "plot_frontier",
    "plot_layer_posterior",
    "plot_magnitude_histograms",
    "plot_sparsity_bars",
    "plot_training_curves",
    "read_log",
    "save_figure",
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
# Frontier axes, most telling first: the first metric every run has is used.
FRONTIER_X = ("backward_error_change", "backward_ce_change", "backward_error", "backward_ce")
FRONTIER_Y = ("in_domain_error", "in_domain_ce")
AXIS_LABELS = {
    "backward_error_change": "backward error rate, relative change vs base",
    "backward_ce_change": "backward CE, relative change vs base",
    "backward_error": "backward error rate",
    "backward_ce": "backward CE (nats/token)",
    "in_domain_error": "in-domain error rate",
    "in_domain_ce": "in-domain CE (nats/token)",
}
# A sweep's base model scored on its dev-curve sets (``<sweep>/base/dev-curves.json``, an eval
# result): step 0 of the forgetting curves, since every method starts from the base model.
BASE_CURVE_FILE = "dev-curves.json"
CURVE_METRIC_LABELS = {"ce": "CE (nats/token)", "error_rate": "error rate", "language_id": "language-ID accuracy"}


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
def _first_common(summaries: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> str | None:
    for key in keys:
        if summaries and all(s.get(key) is not None for s in summaries):
            return key
    return None


def plot_frontier(summaries: Sequence[Mapping[str, Any]]) -> Figure:
    """Stability-plasticity frontier: in-domain error against backward degradation, one point per
    run, one series per method. Lower-left is better on both."""
    evaluated = [s for s in summaries if "in_domain" in s]
    x_key, y_key = _first_common(evaluated, FRONTIER_X), _first_common(evaluated, FRONTIER_Y)
    if x_key is None or y_key is None:
        raise ValueError("the frontier needs evaluated runs: run `pyro-blora evaluate` on each run first")
    figure = Figure(figsize=(6, 4.5))
    axes = figure.add_subplot()
    for method in dict.fromkeys(s["method"] for s in evaluated):
        points = [s for s in evaluated if s["method"] == method]
        axes.scatter([p[x_key] for p in points], [p[y_key] for p in points], label=method, s=36)
        for point in points:
            axes.annotate(point["run"], (point[x_key], point[y_key]), fontsize=6, xytext=(3, 3),
                          textcoords="offset points")
    axes.set(xlabel=AXIS_LABELS[x_key], ylabel=AXIS_LABELS[y_key], title="Stability-plasticity frontier")
    axes.legend(fontsize=8)
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
    (out / "inspect.json").write_text(json.dumps({"sparsity": rows, "layers": layers}, indent=1))
    images = {"magnitudes.png": ("Histogram of |w|", plot_magnitude_histograms(weights)),
              "energy.png": ("Cumulative energy of dW", plot_energy_curves(weights))}
    if any(run.bayesian for run in weights):
        images["layers.png"] = ("Per-layer KL and posterior scale", plot_layer_posterior(weights))
    for name, (_, figure) in images.items():
        save_figure(figure, out / name)
    lines = ["# Adapter inspection", "", f"Runs: {', '.join(f'`{p}`' for p in paths)}.", "",
             "## Sparsity (all layers pooled; higher = sparser)", "",
             markdown_table(rows, SPARSITY_COLUMNS), ""]
    for name, (caption, _) in images.items():
        lines += [f"## {caption}", "", f"![{caption}]({name})", ""]
    for run_name, table in layers.items():
        lines += [f"## Layers of {run_name}", "", markdown_table(table), ""]
    page = out / "inspect.md"
    page.write_text("\n".join(lines))
    return page


SUMMARY_COLUMNS = ("run", "method", "rank", "beta", "prior_scale", "kl_normalization", "nll", "in_domain_error",
                   "in_domain_ce", "backward_error", "backward_ce", "backward_error_change", "backward_ce_change",
                   *(f"dW_{s}" for s in STATISTICS))


def write_report(runs: Sequence[str | Path], out: str | Path, *, base: Mapping[str, Any] | str | Path | None = None,
                 in_domain: str | None = None) -> Path:
    """``report.md`` with the frontier, the sparsity comparison, each run's training curves, and
    ``summary.csv``/``summary.json`` (one row per finished run)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = find_runs(runs)
    summaries = [run_summary(path, base=base, in_domain=in_domain) for path in paths]
    for label, summary in zip(_labels(paths), summaries):
        summary["run"] = label
    write_rows(summaries, out / "summary")
    lines = ["# Runs report", "", f"{len(paths)} finished runs: {', '.join(f'`{p}`' for p in paths)}.", "",
             "Errors are mean error rates (WER or mixed error rate) and CE is teacher-forced cross-entropy per token; "
             "backward = every evaluated domain other than the one trained on; changes are relative to the base model "
             "(positive = worse). `nll` is the final training-set NLL.", "",
             markdown_table(summaries, [c for c in SUMMARY_COLUMNS if any(c in s for s in summaries)]), ""]
    if any("in_domain" in s for s in summaries):
        save_figure(plot_frontier(summaries), out / "frontier.png")
        lines += ["## Stability-plasticity frontier", "", "![frontier](frontier.png)", ""]
    else:
        lines += ["No run has an eval.json yet (`pyro-blora evaluate <run>`): no frontier.", ""]
    save_figure(plot_sparsity_bars(summaries), out / "sparsity.png")
    lines += ["## Sparsity of dW by method", "", "![sparsity](sparsity.png)", ""]
    with_curves = {label: path for label, path in zip(_labels(paths), paths) if curve_keys(read_log(path))}
    if with_curves:
        save_figure(plot_forgetting_curves(with_curves, _curve_start(runs)), out / "forgetting.png")
        lines += ["## Forgetting curves", "", "Dev metrics scored during training (`--eval-every`), one line per run.",
                  "", "![forgetting curves](forgetting.png)", ""]
    budgeted = budget_rows(paths, _labels(paths))
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
    for label, path in zip(_labels(paths), paths):
        name = f"curves-{_file_stem(label)}.png"
        save_figure(plot_training_curves(path, title=label), out / name)
        lines += [f"### {label}", "", f"![curves of {label}]({name})", ""]
    page = out / "report.md"
    page.write_text("\n".join(lines))
    return page

