"""One run inside an experiment: train it unless it is finished, evaluate it unless it is evaluated.

The main job, the sweep and the sequence are lists of these steps, so each of them resumes the same
way after a crash: a run without its weights and result (:func:`pyro_blora.runs.finished`) trains on
from its last checkpoint, and an evaluation file that exists is read instead of recomputed.
:func:`run_evaluation` scores one model (base, run folder or any Whisper) into the run's eval file;
:func:`export_run` writes a run's model as a plain transformers folder. A run's update scaled into a
forgetting budget, with no retraining, is :func:`pyro_blora.experiments.budget_frontier.budget_scaled_model`.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from pyro_blora.model.interpolation import interpolate_weights
from pyro_blora.checkpoint import atomic_write_json
from pyro_blora.config import RetentionBudget
from pyro_blora.evaluation.scoring import EvalOptions, EvalSet, evaluate_whisper, load_eval_sets, relative_changes
from pyro_blora.model.encoder_window import encoder_window_seconds as window_of
from pyro_blora.model.encoder_window import set_encoder_window
from pyro_blora.runs import eval_file_name, finished, has_checkpoints, is_run_folder, load_run_model, read_eval, read_run_config
from pyro_blora.experiments.budget_frontier import base_of_run, budget_scaled_model

__all__ = ["budget_scaled_model", "ensure_evaluated", "ensure_trained", "export_run", "run_evaluation"]


def ensure_trained(run_dir: str | Path, train: Callable[..., Any]) -> bool:
    """Call ``train(resume=...)`` unless ``run_dir`` holds a finished run; resume when it has
    checkpoints (a run killed anywhere before its result, even after its weights). True if it trained."""
    if finished(run_dir):
        return False
    train(resume=has_checkpoints(run_dir))
    return True


def ensure_evaluated(path: str | Path, evaluate: Callable[[], Mapping[str, Any]]) -> dict[str, Any]:
    """The evaluation in the file ``path`` (e.g. a run's ``eval_file_name(λ)``), else ``evaluate()``, which writes it."""
    path = Path(path)
    return read_eval(path) if path.is_file() else dict(evaluate())


def _scaled_update(run_dir: Path, whisper, scale: float):
    """The run's model with its update scaled: W0 + λ (W_run − W0), W0 from the base the run records."""
    return interpolate_weights(base_of_run(run_dir, whisper), whisper, scale)


def run_evaluation(
    source: str | Path,
    sets: Mapping[str, EvalSet] | None = None,
    *,
    testbed: str | Path | None = None,
    domains: Sequence[str] = ("zh-en", "en"),
    split: str = "test",
    limit: int | None = None,
    options: EvalOptions = EvalOptions(),
    base: Mapping[str, Any] | str | Path | None = None,
    against: Mapping[str, Any] | str | Path | None = None,
    out: str | Path | None = None,
    cache_dir: str | Path | None = None,
    delta_scale: float | None = None,
    encoder_window_seconds: float | None = None,
    retain: str | Path | None = None,
    retain_budget: RetentionBudget | None = None,
    retain_split: str = "dev",
) -> dict[str, Any]:
    """Evaluate ``source`` (a run folder or a model) and write ``eval.json``.

    The sets are ``sets`` or the ``domains`` of ``testbed``. ``base`` and ``against`` are eval
    results (or their files / run folders) to report relative changes against. ``out`` defaults to
    the run folder's ``eval.json`` (for a run) and is not written for a bare model without ``out``.
    ``delta_scale`` λ evaluates a run with its update scaled, W0 + λ (W_run − W0), into
    ``eval-scale<λ>.json`` (λ = 1: the run as trained). ``encoder_window_seconds`` cuts a model's
    encoder to that window (a base model scored beside windowed runs); a run keeps the window it
    was trained with unless a wider one is asked for (its adapter used at Whisper's own 30 s). ``retain_budget`` with ``retain`` (retention data) evaluates a
    run with its update scaled by the largest λ inside that forgetting budget
    (:func:`budget_scaled_model`), into ``eval-budget<budget>.json``."""
    run_dir = Path(source) if is_run_folder(source) else None
    whisper, processor, description = load_run_model(source, encoder_window_seconds if run_dir is not None else None)
    if encoder_window_seconds is not None:
        set_encoder_window(whisper, encoder_window_seconds)
    if delta_scale is not None and delta_scale != 1:
        if run_dir is None:
            raise ValueError(f"a delta scale scales a run's update against its base model; {source} is not a run "
                             "folder (give one trained with `pyro-blora train`)")
        whisper = _scaled_update(run_dir, whisper, delta_scale)
        description += f", update scaled by {delta_scale:g}"
    budget_info = None
    if (retain is None) != (retain_budget is None):
        raise ValueError("a forgetting budget needs both the retention data (--retain) and the budget (--retain-budget)")
    if retain_budget is not None:
        if run_dir is None or delta_scale is not None:
            raise ValueError("a forgetting budget chooses the scale of a run's update: give a run folder, and no "
                             "delta scale next to it")
        whisper, budget_info = budget_scaled_model(run_dir, whisper, processor, retain, retain_budget, retain_split,
                                                   cache_dir)
        description += f", update scaled by {budget_info['scale']:.4g} ({retain_budget.describe()} on {retain})"
    if sets is None:
        if testbed is None:
            raise ValueError("give the evaluation sets or a testbed folder (--testbed) to take them from")
        sets = load_eval_sets(testbed, domains, processor, split=split, limit=limit, cache_dir=cache_dir)
    start = time.perf_counter()
    results = evaluate_whisper(whisper, processor, sets, options)
    report: dict[str, Any] = {
        "model": description,
        "source": str(source),
        "options": asdict(options),
        "encoder_window_seconds": window_of(whisper),
        "results": results,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if delta_scale is not None:
        report["delta_scale"] = delta_scale
    if budget_info is not None:
        report["delta_scale"], report["retention_budget"] = budget_info["scale"], budget_info
    for name, reference in (("relative_to_base", base), ("relative_to_against", against)):
        if reference is not None:
            other = reference if isinstance(reference, Mapping) else read_eval(reference)
            report[name] = relative_changes(results, other["results"])
            report[name.replace("relative_to_", "") + "_source"] = other.get("source")
    name = eval_file_name(delta_scale, retain_budget)
    target = Path(out) if out else (run_dir / name if run_dir is not None else None)
    if target is not None:
        atomic_write_json(target, report)
    return report


def export_run(source: str | Path, out: str | Path, retain: str | Path | None = None,
               retain_budget: RetentionBudget | None = None, retain_split: str = "dev",
               cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Write a run's model as a plain transformers Whisper folder (weights and processor): the posterior
    mean or the merged adapter on its base, or the fully fine-tuned weights; with ``retain_budget``,
    the update scaled by the largest λ inside that forgetting budget on ``retain``
    (``budget.json`` beside the weights says what was measured)."""
    run_dir = Path(source) if is_run_folder(source) else None
    if run_dir is None:
        raise ValueError(f"{source} is not a run folder (one written by `pyro-blora train`)")
    if (retain is None) != (retain_budget is None):
        raise ValueError("a forgetting budget needs both the retention data (--retain) and the budget (--retain-budget)")
    whisper, processor, description = load_run_model(run_dir)
    info: dict[str, Any] = {"model": description, "source": str(source)}
    if retain_budget is not None:
        whisper, info["retention_budget"] = budget_scaled_model(run_dir, whisper, processor, retain, retain_budget,
                                                                retain_split, cache_dir)
    out = Path(out)
    whisper.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    atomic_write_json(out / "budget.json" if retain_budget is not None else out / "export.json", info)
    if retain_budget is not None:
        (out / "README.md").write_text(_budget_card(out, run_dir, info))
    return info


def _budget_card(out: Path, run_dir: Path, info: Mapping[str, Any]) -> str:
    """An exported model's card: the run's card (configuration and results) and what the budget kept."""
    from pyro_blora.interop.hub import model_card
    from pyro_blora.markdown import markdown_table

    chosen = info["retention_budget"]
    fields = [{"field": name, "value": chosen[name]} for name in
              ("described", "confidence", "utterances", "scale", "base_retain_ce", "retain_ce", "retain_ce_upper",
               "retain_change", "retain_change_upper", "retain_limit")]
    section = ["## Forgetting budget", "", f"**{chosen['line']}.**", "",
               f"The run's update is scaled by λ = {chosen['scale']:.4g} (W0 + λ ΔW): the largest λ whose one-sided "
               f"{100 * chosen['confidence']:g}% upper bound of the retention CE is inside the budget, measured on "
               f"{chosen['utterances']} utterances of {chosen['retention']['source']} "
               f"({chosen['retention']['split']}; labels: {chosen['retention']['labels']}). The bound holds for the "
               "distribution those utterances come from, not for other speech of the same language.", "",
               markdown_table(fields), ""]
    return model_card(out, "merged", out.name, run_dir=run_dir).rstrip() + "\n\n" + "\n".join(section)
