"""A trained run's update scaled after training, W0 + λ ΔW: its frontier over λ and its budget choice.

Scaling costs no retraining, and on Whisper base LoRA scaled by 0.5 matched BLoRA's English at a lower
in-domain error (RESULTS "Faithful BLoRA"), so every method is shown with it. The frontier is scored
by teacher-forced CE only (one forward pass per utterance and λ), one ``eval-scale<λ>.json`` per λ in
the run folder, so an interrupted frontier resumes where it stopped. The budget's λ is the one
:func:`~pyro_blora.experiments.step.budget_scaled_model` chooses; the model it gives is written as a
plain transformers folder at the window it is meant to be used at.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from pyro_blora.checkpoint import atomic_write_json
from pyro_blora.config import RetentionBudget
from pyro_blora.evaluation.scoring import EvalOptions, EvalSet
from pyro_blora.experiments.step import budget_scaled_model, ensure_evaluated, run_evaluation
from pyro_blora.model.encoder_window import encoder_window_seconds as window_of
from pyro_blora.model.encoder_window import set_encoder_window
from pyro_blora.model.interpolation import interpolate_weights
from pyro_blora.runs import eval_file_name, load_run_model, read_eval, read_run_config

__all__ = ["BUDGET_FILE", "ensure_budget_export", "ensure_frontier", "frontier_choice"]

# What an export with a budget writes beside its weights (the name ``export_run`` uses too).
BUDGET_FILE = "budget.json"


def ensure_frontier(run_dir: str | Path, sets: Mapping[str, EvalSet], scales: Sequence[float],
                    base: Mapping[str, Any], *, encoder_window_seconds: float | None = None,
                    cache_dir: str | Path | None = None) -> dict[float, dict[str, Any]]:
    """The run's results at every λ of ``scales`` by CE only (each read back when its file exists),
    with λ = 0 (``base``) and λ = 1 (the run's ``eval.json``, when evaluated) added: {λ: results}."""
    run_dir = Path(run_dir)
    options = EvalOptions(decode_limit=0, progress=False)
    points = {0.0: dict(base["results"])}
    for scale in sorted(set(scales) - {0.0, 1.0}):
        evaluation = ensure_evaluated(run_dir / eval_file_name(scale), lambda: run_evaluation(
            run_dir, sets, options=options, base=base, delta_scale=scale,
            encoder_window_seconds=encoder_window_seconds, cache_dir=cache_dir))
        points[float(scale)] = evaluation["results"]
    if (run_dir / eval_file_name()).is_file():
        points[1.0] = read_eval(run_dir / eval_file_name())["results"]
    return dict(sorted(points.items()))


def frontier_choice(points: Mapping[float, Mapping[str, Any]], adapted: str, kept: str,
                    tolerance: float) -> dict[str, Any] | None:
    """The λ of the frontier with the lowest CE on ``adapted`` among those whose CE on ``kept`` stays
    within ``tolerance`` (0.03: +3%) of the base model's (λ = 0); None when no λ above 0 does."""
    limit = points[0.0][kept]["ce"] * (1 + tolerance)
    inside = [(entry[adapted]["ce"], scale) for scale, entry in points.items()
              if scale > 0 and entry[kept]["ce"] <= limit]
    if not inside:
        return None
    ce, scale = min(inside)
    return {"scale": scale, "adapted_ce": ce, "kept_ce": points[scale][kept]["ce"], "kept_limit": limit,
            "tolerance": tolerance, "adapted": adapted, "kept": kept}


def ensure_budget_export(run_dir: str | Path, out: str | Path, retain: str | Path, budget: RetentionBudget, *,
                         encoder_window_seconds: float | None = None, export_window_seconds: float | None = None,
                         retain_split: str = "dev", cache_dir: str | Path | None = None) -> dict[str, Any]:
    """The run's update scaled by the largest λ inside ``budget`` on ``retain``, written to ``out`` as a
    plain Whisper folder (weights, processor, ``budget.json`` last), unless ``out`` already holds it.

    λ is chosen with the model at ``encoder_window_seconds`` (the window its scores are taken at; None:
    the run's own) and written at ``export_window_seconds`` (30: what every Whisper pipeline feeds it).
    The adapters act on linear layers, not on the positions a window cuts, so λ carries over."""
    out = Path(out)
    if (out / BUDGET_FILE).is_file():
        return json.loads((out / BUDGET_FILE).read_text())
    whisper, processor, description = load_run_model(run_dir, encoder_window_seconds)
    whisper, chosen = budget_scaled_model(run_dir, whisper, processor, retain, budget, retain_split, cache_dir)
    if export_window_seconds is not None and export_window_seconds != window_of(whisper):
        whisper, _, _ = load_run_model(run_dir, export_window_seconds)
        base, _, _ = load_run_model(read_run_config(run_dir)["run"]["model_source"])
        whisper = interpolate_weights(set_encoder_window(base, export_window_seconds), whisper, chosen["scale"])
    whisper.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    info = {"model": description, "source": str(run_dir), "encoder_window_seconds": window_of(whisper),
            "retention_budget": chosen}
    atomic_write_json(out / BUDGET_FILE, info)
    return info
