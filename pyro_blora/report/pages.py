"""Markdown pages of finished runs: what ``pyro-blora inspect``, ``report`` and ``main`` write.

Each page is composed here from summaries (:mod:`~pyro_blora.report.summaries`), tables
(:mod:`~pyro_blora.report.tables`) and plots (:mod:`~pyro_blora.report.plots`), and written whole
(atomically) next to the PNG files it names. A page is a function of what its folder records, so a
committed page regenerates from its run folders (``scripts/regenerate_results.py``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from pyro_blora.checkpoint import atomic_write_text
from pyro_blora.metrics import flatten_weights
from pyro_blora.report.convergence_plots import plot_scale_trajectories, plot_sigma_over_optimum
from pyro_blora.training.convergence import run_convergence
from pyro_blora.report.plots import (
    curve_keys,
    plot_budget_curves,
    plot_energy_curves,
    plot_forgetting_curves,
    plot_frontier,
    plot_layer_posterior,
    plot_magnitude_histograms,
    plot_scale_histograms,
    plot_sparsity_bars,
    plot_training_curves,
    save_figure,
)
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
    setting_name,
    sparsity_rows,
)
from pyro_blora.report.tables import (
    BASE_INTERVALS,
    INTERVAL_NOTE,
    LORA_INTERVALS,
    evaluation_table,
    interval_cell,
    markdown_table,
    write_rows,
)
from pyro_blora.runs import finished, read_eval, read_log, read_run_config

__all__ = [
    "BASE_CURVE_FILE",
    "SPARSITY_COLUMNS",
    "budget_rows",
    "dev_curve_table",
    "inspection_page",
    "main_job_table",
    "paired_difference_rows",
    "scale_summary",
    "write_inspection",
    "write_report",
]

# A sweep's base model scored on its dev-curve sets (``<sweep>/base/dev-curves.json``, an eval
# result): step 0 of the forgetting curves, since every method starts from the base model.
BASE_CURVE_FILE = "dev-curves.json"


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "run"


def _labels(paths: Sequence[Path]) -> list[str]:
    """Folder names, with the parent's name added where two runs share one (the sweep's name for
    runs of a sweep's ``runs/`` folder)."""
    names = [p.name for p in paths]

    def owner(path: Path) -> str:
        return path.parent.parent.name if path.parent.name == "runs" else path.parent.name

    return [f"{owner(p)}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


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
                         "retain_ce": summary["retain_ce"], "retain_ce_upper": summary.get("retain_ce_upper"),
                         "retain_limit": summary["retain_limit"],
                         "base_retain_ce": summary["base_retain_ce"], "final_beta": summary.get("final_beta"),
                         "met": summary["met"], "met_during_training": summary["met_during_training"]})
    return rows


def _curve_start(runs: Sequence[str | Path]) -> dict[str, Any] | None:
    """The base model's dev-curve scores of the first given sweep folder that has them."""
    for folder in runs:
        path = Path(folder) / "base" / BASE_CURVE_FILE
        if path.is_file():
            return json.loads(path.read_text())["results"]
    return None


# ----------------------------------------------------------------------------------- pages
SPARSITY_COLUMNS = ("run", "method", "matrix", "n", *STATISTICS)

# The plots of an inspection: file name and caption; those of the posterior only with a Bayesian run.
INSPECTION_PLOTS = {"magnitudes.png": "Histogram of |w|", "energy.png": "Cumulative energy of dW"}
POSTERIOR_PLOTS = {"layers.png": "Per-layer KL and posterior scale", "scales.png": "Posterior scales"}
CONVERGENCE_COLUMNS = ("run", "converged", "sigma_vs_optimum/median_ratio", "sigma_vs_optimum/median_abs_log_ratio",
                       "sigma_vs_optimum/p90_abs_log_ratio", "sigma_vs_optimum/share_within", "kl_change_last_fifth",
                       "pinned")


def inspection_page(runs: Sequence[str | Path], inspection: Mapping[str, Any]) -> str:
    """``inspect.md`` of the ``runs`` from what was measured on them (``inspect.json``): sparsity,
    posterior scales, the plots and one table of layers per run."""
    scale_rows = inspection.get("scales", [])
    images = {**INSPECTION_PLOTS, **(POSTERIOR_PLOTS if scale_rows else {})}
    if inspection.get("trajectories"):  # runs that logged their scales during training
        images["trajectories.png"] = "Posterior scales over training"
    lines = ["# Adapter inspection", "", f"Runs: {', '.join(f'`{p}`' for p in runs)}.", "",
             "## Sparsity (all layers pooled; higher = sparser)", "",
             markdown_table(inspection["sparsity"], SPARSITY_COLUMNS), ""]
    if scale_rows:
        lines += ["## Posterior scales (quantiles; share within a factor 2 of σp)", "", markdown_table(scale_rows), ""]
    convergence = inspection.get("convergence")
    if convergence:
        rows = [{"run": name, **{k: summary.get(k) for k in CONVERGENCE_COLUMNS[1:-1]},
                 "pinned": f"{summary['pinned_by_data']['all']} of {summary['entries']}"}
                for name, summary in convergence.items()]
        lines += ["## Convergence: scales against the curvature optimum σ*", "",
                  f"Rule: {next(iter(convergence.values()))['rule']}. Pinned: entries whose data precision exceeds "
                  "the prior's (σ*² < σp²/2).", "", markdown_table(rows, CONVERGENCE_COLUMNS), "",
                  "![σ against σ*](optimum.png)", ""]
    for name, caption in images.items():
        lines += [f"## {caption}", "", f"![{caption}]({name})", ""]
    for run_name, table in inspection["layers"].items():
        lines += [f"## Layers of {run_name}", "", markdown_table(table), ""]
    return "\n".join(lines)


def write_inspection(runs: Sequence[str | Path], out: str | Path, curvature_batches: int = 0) -> Path:
    """``inspect.md`` (sparsity table, per-layer tables), ``inspect.json`` and the plots of the runs.
    With ``curvature_batches`` every blora run's scales are also set against sigma*, the curvature
    optimum measured on that many of its training batches (:func:`run_convergence`)."""
    out = Path(out)
    paths = find_runs(runs)
    weights = [load_run_weights(path) for path in paths]
    for label, run in zip(_labels(paths), weights):
        run.name = label
    scale_rows = [scale_summary(run) for run in weights if run.bayesian]
    inspection = {"sparsity": sparsity_rows(weights), "scales": scale_rows,
                  "layers": {run.name: layer_table(run) for run in weights}}
    logs = {run.name: read_log(path) for path, run in zip(paths, weights) if run.bayesian}
    if any("kl_analytic" in record for records in logs.values() for record in records):
        inspection["trajectories"] = True
    convergence = {run.name: run_convergence(path, curvature_batches)
                   for path, run in zip(paths, weights) if run.bayesian and curvature_batches}
    if convergence:
        inspection["convergence"] = {name: {k: v for k, v in summary.items() if not k.startswith("histogram")}
                                     for name, summary in convergence.items()}
    atomic_write_text(out / "inspect.json", json.dumps(inspection, indent=1))
    figures = {"magnitudes.png": plot_magnitude_histograms(weights), "energy.png": plot_energy_curves(weights)}
    if scale_rows:
        figures.update({"layers.png": plot_layer_posterior(weights), "scales.png": plot_scale_histograms(weights)})
    if inspection.get("trajectories"):
        figures["trajectories.png"] = plot_scale_trajectories(logs)
    if convergence:
        figures["optimum.png"] = plot_sigma_over_optimum(convergence)
    for name, figure in figures.items():
        save_figure(figure, out / name)
    page = out / "inspect.md"
    atomic_write_text(page, inspection_page(paths, inspection))
    return page


SUMMARY_COLUMNS = ("run", "method", "rank", "beta", "prior_scale", "kl_normalization", "nll", "in_domain_error",
                   "in_domain_ce", "backward_error", "backward_ce", "ce_scope", "backward_error_change",
                   "backward_ce_change", *(f"dW_{s}" for s in STATISTICS))



def _paired_groups(paths: Sequence[Path], summaries: Sequence[Mapping[str, Any]],
                   base: Mapping[str, Any] | str | Path | None) -> dict[str, tuple[dict[str, Any], list]]:
    """Evaluated runs grouped by the base evaluation they are compared with (the given one, else each
    sweep's or main job's): {folder: (base eval, [(row with setting, seed and targets, eval.json)])}. A
    run of a sweep takes its sweep setting; any other run its name without the sweeps' seed suffix
    ``-s<seed>`` (when its config has that seed), so that its seeds are pooled too."""
    groups: dict[str, tuple[dict[str, Any], list]] = {}
    for path, summary in zip(paths, summaries):
        reference = base_evaluation(path, base)
        if "in_domain" not in summary or reference is None:
            continue
        config = read_run_config(path)
        run, seed = config["run"], config["run"].get("seed", 0)
        setting = setting_name(**run["point"]) if "point" in run else \
            summary["run"].removesuffix(f"-s{seed}") if seed else summary["run"]
        targets = tuple((config.get("blora") or {}).get("target_modules") or ())
        key = "" if base is not None else str(path.parent.parent)
        groups.setdefault(key, (reference, []))[1].append(
            ({**summary, "setting": setting, "seed": seed, "targets": targets}, read_eval(path)))
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
    # Sparsity reads the trained weights; a run folder published without them reports the rest.
    summaries = [run_summary(path, base=base, in_domain=in_domain, sparsity=finished(path)) for path in paths]
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
        lines += ["## Paired differences", "", "Against the base model and against LoRA of the same rank and targets (BLoRA and "
                  "MAP; seed s paired with seed s).", "", markdown_table(paired), "", INTERVAL_NOTE, ""]
    weighed = [s for s in summaries if any(k.startswith("dW_") for k in s)]
    if weighed:
        save_figure(plot_sparsity_bars(weighed), out / "sparsity.png")
        lines += ["## Sparsity of dW by method", "", "![sparsity](sparsity.png)", ""]
    if len(weighed) < len(summaries):
        lines += [f"{len(summaries) - len(weighed)} of the runs have no trained weights in their folders (published "
                  "without them): no sparsity for those.", ""]
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
    atomic_write_text(page, "\n".join(lines))
    return page


def main_job_table(evaluations: Mapping[str, Mapping[str, Any]], domains: Sequence[str]) -> str:
    """The main job's evaluations side by side, with the change of each against the base model; the
    domains in the job's order, whether an evaluation was just scored or read back (sorted) from disk."""
    return evaluation_table({name: {d: e["results"][d] for d in domains if d in e["results"]}
                             for name, e in evaluations.items()}, baseline="base")


def dev_curve_table(records: Sequence[Mapping[str, Any]]) -> str | None:
    """The dev metrics a run logged during training, one row per evaluated step (None: it logged none)."""
    evaluated = [r for r in records if curve_keys([r])]
    if not evaluated:
        return None
    keys = curve_keys(evaluated)
    return markdown_table([{"step": r["step"], **{k: f"{r[k]:.3f}" if k in r else "" for k in keys}} for r in evaluated])
