"""Plots of whether a posterior learnt: its scales over training, and their distance to sigma*.

Both read what training writes (the σ quantiles and analytic KL in ``log.jsonl``, the histograms of
log10(σ/σ*) in ``result.json``'s ``posterior``), so they can be redrawn from committed files alone.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

__all__ = ["plot_scale_trajectories", "plot_sigma_over_optimum"]

GROUPS = ("encoder.A", "encoder.B", "decoder.A", "decoder.B")


def plot_scale_trajectories(logs: Mapping[str, Sequence[Mapping[str, Any]]], prior_scale: float | None = None) -> Figure:
    """Per group (A/B × encoder/decoder): the median σ of every run over training, with its 5-95% band,
    and one panel of the analytic KL term. ``logs`` maps a run's label to its log records."""
    figure = Figure(figsize=(13, 3.4))
    panels = [figure.add_subplot(1, len(GROUPS) + 1, i + 1) for i in range(len(GROUPS) + 1)]
    colors = [f"C{i}" for i in range(10)]
    for (label, records), color in zip(logs.items(), colors * 3):
        for axes, group in zip(panels, GROUPS):
            points = [(r["step"], r[f"sigma/{group}/q05"], r[f"sigma/{group}/q50"], r[f"sigma/{group}/q95"])
                      for r in records if f"sigma/{group}/q50" in r]
            if not points:
                continue
            steps, low, mid, high = (np.array(column) for column in zip(*points))
            axes.plot(steps, mid, color=color, marker=".", label=label)
            axes.fill_between(steps, low, high, color=color, alpha=0.15)
        kl = [(r["step"], r["kl_analytic"]) for r in records if "kl_analytic" in r]
        if kl:
            panels[-1].plot(*zip(*kl), color=color, marker=".", label=label)
        means = [(r["step"], r["kl_means"]) for r in records if "kl_means" in r]
        if means:  # the means' share, dashed: what is left of the KL when the scales are at the prior's
            panels[-1].plot(*zip(*means), color=color, linestyle="--", linewidth=1)
    for axes, group in zip(panels, GROUPS):
        if prior_scale is not None:
            axes.axhline(prior_scale, color="grey", linestyle=":", linewidth=1)
        axes.set(yscale="log", title=f"σ of {group}", xlabel="step")
    panels[0].set_ylabel("σ (median, 5-95% band)")
    panels[-1].set(yscale="log", title="KL term (analytic; dashed: means' part)", xlabel="step")
    panels[-1].legend(fontsize=7)
    figure.suptitle("Posterior scales over training" + (" (dotted: σp)" if prior_scale is not None else ""))
    figure.tight_layout()
    return figure


def plot_sigma_over_optimum(summaries: Mapping[str, Mapping[str, Any]]) -> Figure:
    """Histograms of log10(σ/σ*) per group, one outline per run, from each run's convergence summary
    (``result.json`` → ``posterior``): a converged posterior piles up at 0."""
    figure = Figure(figsize=(13, 3.4))
    for position, group in enumerate(GROUPS, 1):
        axes = figure.add_subplot(1, len(GROUPS), position)
        for label, summary in summaries.items():
            counts = summary["histogram_log10_sigma_over_optimum"].get(group)
            if counts is None:
                continue
            edges = np.array(summary["histogram_log10_edges"])
            share = np.array(counts) / max(1, sum(counts))
            axes.stairs(share, edges, label=label)
        for bound in (-np.log10(1.5), np.log10(1.5)):
            axes.axvline(bound, color="grey", linestyle=":", linewidth=1)
        axes.set(title=group, xlabel="log10(σ / σ*)", ylabel="share of entries" if position == 1 else None)
    figure.axes[0].legend(fontsize=7)
    figure.suptitle("Posterior scales against the curvature optimum σ* (dotted: a factor 1.5; end bins hold the tails)")
    figure.tight_layout()
    return figure
