"""Train once, choose later: a finished run's update scaled by lambda, measured against a forgetting budget.

:func:`scaled_run` sets up W0 + lambda dW for any method (dW: the run's weights minus its base
model's), the retention set (labelled by the base model where it has no transcripts) and the base
model's per-utterance losses, cached in the run folder (``retention-base-losses.json``) so each
measurement after the first is one forward pass of the scaled model. :func:`budget_scaled_model`
(``evaluate`` / ``export --retain-budget``) keeps the largest lambda whose upper bound is inside a
budget; :func:`frontier` writes the whole lambda curve with its bounds, and the lambda each budget
picks, by the same search, so ``export --retain-budget b`` exports the point the frontier names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from pyro_blora.checkpoint import atomic_write_json
from pyro_blora.config import RetentionBudget
from pyro_blora.markdown import markdown_table
from pyro_blora.model.encoder_window import encoder_input_frames
from pyro_blora.model.encoder_window import encoder_window_seconds as window_of
from pyro_blora.model.encoder_window import set_encoder_window
from pyro_blora.runs import load_run_model, read_run_config
from pyro_blora.training.budget import LABELS_FILE, RetentionSet, TrainedUpdate, choose_bounded_scale
from pyro_blora.training.budget import load_retention_set, parameter_update
from pyro_blora.training.budget_bound import (RetentionBound, RetentionLosses, retention_bound, retention_losses,
                                              retention_name)

__all__ = ["BASE_LOSSES_FILE", "FRONTIER_BUDGETS", "ScaledRun", "budget_scaled_model", "frontier", "scaled_run"]

BASE_LOSSES_FILE = "retention-base-losses.json"
# The budgets a frontier names a lambda for (relative: 2%, 5% and 10% over the base model).
FRONTIER_BUDGETS = (0.02, 0.05, 0.1)


def base_of_run(run_dir: Path, whisper):
    """The base model a run was trained from (``model_source`` in its config), cut to ``whisper``'s window."""
    base, _, _ = load_run_model(read_run_config(run_dir)["run"]["model_source"])
    set_encoder_window(base, window_of(whisper))
    return base


@dataclass
class ScaledRun:
    """A run's update, its retention set and the base model's losses on it."""

    update: TrainedUpdate
    retention: RetentionSet
    base: RetentionLosses
    name: str
    precision: str = "fp32"  # of every measurement, the base model's included

    def losses(self, scale: float) -> RetentionLosses:
        """Per-utterance retention losses of W0 + ``scale`` dW."""
        with self.update.scaled(scale) as model:
            return retention_losses(model, self.retention.batches, self.precision)

    def bound(self, scale: float, budget: RetentionBudget) -> RetentionBound:
        """The budget's verdict on W0 + ``scale`` dW (:func:`retention_bound`, as in training)."""
        return retention_bound(budget, self.losses(scale), self.base, self.name)


def scaled_run(run_dir: str | Path, whisper, processor, retain: str | Path, utterances: int, split: str = "dev",
               cache_dir: str | Path | None = None, precision: str = "fp32") -> ScaledRun:
    """``whisper`` (a finished run's model, scaled in place later) as W0 + lambda dW, with the first
    ``utterances`` of ``split`` of ``retain`` and the base model's losses on them in ``precision``, read
    from the run folder's ``retention-base-losses.json`` when it holds the same utterances, labels and
    precision."""
    run_dir = Path(run_dir)
    model_source = str(read_run_config(run_dir)["run"]["model_source"])
    base = base_of_run(run_dir, whisper)
    retention = load_retention_set(retain, processor, base, utterances, split, cache_dir, run_dir / LABELS_FILE,
                                   encoder_input_frames(whisper), model_name=model_source)
    device = next(whisper.parameters()).device
    retention = retention.to(device)
    reference = dict(base.named_parameters())
    params = dict(whisper.named_parameters())
    origin = {name: reference[name].detach().to(device) for name, p in params.items()
              if name in reference and not torch.equal(p.detach(), reference[name].detach().to(device))}
    del base, reference
    update = parameter_update(whisper, params, origin)
    key = {**retention.describe(), "model": model_source, "ids": retention.ids,
           "encoder_window_seconds": window_of(whisper)}
    if precision != "fp32":  # fp32 caches written before the option existed stay valid
        key["precision"] = precision
    cached = run_dir / BASE_LOSSES_FILE
    saved = json.loads(cached.read_text()) if cached.is_file() else {}
    if saved.get("key") == key:
        base_losses = RetentionLosses(**saved["losses"])
    else:
        with update.scaled(0.0) as model:
            base_losses = retention_losses(model, retention.batches, precision)
        atomic_write_json(cached, {"key": key, "losses": base_losses.to_dict()})
    return ScaledRun(update, retention, base_losses, retention_name(retain), precision)


def budget_scaled_model(run_dir: str | Path, whisper, processor, retain: str | Path, budget: RetentionBudget,
                        split: str = "dev", cache_dir: str | Path | None = None) -> tuple[Any, dict[str, Any]]:
    """A finished run's model (``whisper``, changed in place) with its update scaled, W0 + lambda dW,
    by the largest lambda in [0, 1] whose upper bound of the retention loss on ``retain`` is inside
    ``budget``, with no retraining; and what was measured (the bound's fields and its line)."""
    run = scaled_run(run_dir, whisper, processor, retain, budget.utterances, split, cache_dir, budget.precision)
    limit = budget.limit(run.base.ce)
    scale, bounds = choose_bounded_scale(lambda s: run.bound(s, budget), limit, budget)
    if scale is None:
        raise ValueError(f"the forgetting budget ({budget.describe()}: at most {limit:.4f}) is below even the base "
                         f"model's retention loss ({run.base.ce:.4f}) on {retain}; give a larger budget")
    run.update.commit(scale)
    kept = bounds[scale]
    info = {"budget": budget.to_dict(), "described": budget.describe(), "retention": run.retention.describe(),
            "confidence": budget.confidence, "utterances": kept.utterances, "base_retain_ce": run.base.ce,
            "retain_limit": limit, "scale": scale, "retain_ce": kept.ce, "retain_ce_upper": kept.ce_upper,
            "retain_change": kept.change, "retain_change_upper": kept.change_upper,
            "retention_bound": kept.to_dict(), "line": kept.line(),
            "scales_tried": [(s, b.ce_upper) for s, b in bounds.items()]}
    return whisper, info


def default_scales(grid: int = RetentionBudget.scale_grid) -> tuple[float, ...]:
    """0, 1/grid, ..., 1: the points the budget's search starts from, so their measurements are reused."""
    return tuple(sorted(1 - i / grid for i in range(grid + 1)))


def frontier(run_dir: str | Path, retain: str | Path, out: str | Path, scales: Sequence[float] | None = None,
             budgets: Sequence[float] = FRONTIER_BUDGETS, utterances: int = RetentionBudget.utterances,
             confidence: float = RetentionBudget.confidence, split: str = "dev",
             cache_dir: str | Path | None = None, precision: str = RetentionBudget.precision) -> dict[str, Any]:
    """The retention CE's change and its upper bound at every lambda of ``scales`` for a finished run,
    and the lambda each relative budget of ``budgets`` picks (the search of ``export --retain-budget``);
    ``out``/frontier.json, frontier.md and frontier.png."""
    from pyro_blora.report.plots import plot_budget_frontier, save_figure

    run_dir, out = Path(run_dir), Path(out)
    grid = default_scales()
    # A λ written as 0.7 is the search's 1 - 3/10: one measurement serves both.
    scales = grid if scales is None else tuple(min(grid, key=lambda g: abs(g - s)) if min(abs(g - s) for g in grid)
                                               < 1e-9 else s for s in scales)
    if any(not 0 <= s <= 1 for s in scales):
        raise ValueError(f"every scale must lie in [0, 1] (0: the base model, 1: the run as trained), got {scales}")
    whisper, processor, description = load_run_model(run_dir)
    run = scaled_run(run_dir, whisper, processor, retain, utterances, split, cache_dir, precision)
    losses = {s: run.losses(s) for s in scales}

    def measured(scale: float) -> RetentionLosses:
        if scale not in losses:
            losses[scale] = run.losses(scale)
        return losses[scale]

    picks = []
    for value in budgets:
        budget = RetentionBudget(value, utterances=utterances, confidence=confidence, precision=precision)
        scale, bounds = choose_bounded_scale(lambda s: retention_bound(budget, measured(s), run.base, run.name),
                                             budget.limit(run.base.ce), budget)
        picks.append({"budget": value, "scale": scale,
                      "line": None if scale is None else bounds[scale].line(),
                      "export": f"pyro-blora export {run_dir} --out <folder> --retain {retain} --retain-split {split} "
                                f"--retain-utterances {utterances} --retain-confidence {confidence:g} "
                                + (f"--retain-precision {precision} " if precision != "fp32" else "")
                                + f"--retain-budget {value:g}"})
    curve = RetentionBudget(0.0, utterances=utterances, confidence=confidence, precision=precision)
    points = []
    for s in sorted(losses):
        b = retention_bound(curve, losses[s], run.base, run.name)
        points.append({"scale": s, "ce": b.ce, "ce_upper": b.ce_upper, "change": b.change,
                       "change_upper": b.change_upper, "language_kept": b.language_kept})
    report = {"run": str(run_dir), "model": description, "retention": run.retention.describe(),
              "confidence": confidence, "precision": precision, "utterances": len(run.retention),
              "base_retain_ce": run.base.ce, "base_language_kept": run.base.languages_kept,
              "points": points, "budgets": picks}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "frontier.json", report)
    (out / "frontier.md").write_text(frontier_markdown(report, run.name))
    save_figure(plot_budget_frontier(points, budgets, confidence, run.name), out / "frontier.png")
    return report


def frontier_markdown(report: dict[str, Any], name: str) -> str:
    """The frontier as a page: the lambda curve with its bounds, then the lambda each budget picks."""
    conf = f"{100 * report['confidence']:g}%"
    rows = [{"λ": p["scale"], f"{name} CE": p["ce"], "change": f"{100 * p['change']:+.2f}%",
             f"{conf} upper bound": f"{100 * p['change_upper']:+.2f}%"} for p in report["points"]]
    if all(p.get("language_kept") is not None for p in report["points"]):  # a multilingual model
        for row, point in zip(rows, report["points"]):
            row["language ID right"] = f"{point['language_kept']} of {report['utterances']}"
    picks = [{"budget": f"{100 * b['budget']:g}%", "λ": "none" if b["scale"] is None else b["scale"],
              "verdict": b["line"] or "even λ = 0 is outside"} for b in report["budgets"]]
    return "\n".join([
        f"# Forgetting frontier of {report['run']}", "",
        f"{name} CE per transcript token of W0 + λ ΔW on {report['utterances']} utterances of "
        f"{report['retention']['source']} ({report['retention']['split']}), against the base model's "
        f"{report['base_retain_ce']:.4f}; the bound is one-sided at {conf}, paired per utterance."
        + ("" if report.get("base_language_kept") is None else
           f" Language ID is reported, not constrained (the base model's: {report['base_language_kept']} of "
           f"{report['utterances']})."), "",
        markdown_table(rows), "", "## The λ each budget picks", "", markdown_table(picks), "",
        "Export one without retraining:", "", "```", *[b["export"] for b in report["budgets"]], "```", "",
        "![the frontier](frontier.png)", ""])
