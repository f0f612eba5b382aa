"""The main job's ``report.md``: the table, the recommendation computed from it, the frontier plot,
the budget's choice, the Monte Carlo transcripts and the posterior.

Every number on the page is read from what the job measured; the recommendation too, so it says
whatever this run found, also where that contradicts RESULTS.md.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from matplotlib.figure import Figure

from pyro_blora.checkpoint import atomic_write_text
from pyro_blora.config import BLoRAConfig
from pyro_blora.experiments.post_hoc import frontier_choice
from pyro_blora.markdown import markdown_table
from pyro_blora.predict.transcripts import UtteranceTranscript, spaced_words
from pyro_blora.report.pages import dev_curve_table, main_job_table
from pyro_blora.report.plots import save_figure
from pyro_blora.report.tables import metric_cell
from pyro_blora.runs import read_log

__all__ = ["LID_FLOOR", "headline_table", "plot_main_frontier", "recommendation", "write_main_job_report"]

# English language ID a model must keep to be recommended (the bar for BLoRA in this table).
LID_FLOOR = 0.9
_NAMES = {"en": "English", "real-en": "real English", "zh-en": "zh-en"}


def _domain_name(domain: str) -> str:
    if domain.startswith("backward-"):
        return f"{domain.removeprefix('backward-')} (backward)"
    return _NAMES.get(domain, domain)


def _scale(evaluation: Mapping[str, Any]) -> str:
    return f"{evaluation['delta_scale']:.2f}" if "delta_scale" in evaluation else ""


def headline_table(evaluations: Mapping[str, Mapping[str, Any]], budgets: Mapping[str, Mapping[str, Any]],
                   domains: Sequence[str]) -> str:
    """One row per model (base, each method, each method at its budget's λ): error, CE and language ID
    of every domain that has them."""
    rows = []
    for name, evaluation in evaluations.items():
        method = name.removesuffix(" (budget)")
        scale = budgets[method]["retention_budget"]["scale"] if name.endswith("(budget)") else None
        row: dict[str, Any] = {"model": name, "λ": "" if scale is None else f"{scale:.2f}"}
        for domain in domains:
            entry = evaluation["results"].get(domain, {})
            row[f"{_domain_name(domain)} error"] = metric_cell(entry.get("error_rate"), "error_rate")
            row[f"{_domain_name(domain)} CE"] = metric_cell(entry.get("ce"), "ce")
            if "language_id" in entry:
                row[f"{_domain_name(domain)} LID"] = metric_cell(entry["language_id"], "language_id")
        rows.append(row)
    return markdown_table(rows)


def _keeps_english(results: Mapping[str, Any]) -> bool:
    return all(results[d].get("language_id", 1.0) >= LID_FLOOR for d in ("en", "real-en") if d in results)


def _describe(results: Mapping[str, Any], domain: str) -> str:
    parts = [f"{domain} {metric_cell(results[domain].get('error_rate'), 'error_rate')}"]
    for kept in ("en", "real-en"):
        if kept in results:
            entry = results[kept]
            parts.append(f"{_domain_name(kept)} WER {metric_cell(entry.get('error_rate'), 'error_rate')}, "
                         f"LID {metric_cell(entry.get('language_id'), 'language_id')}")
    return "; ".join(parts)


def recommendation(evaluations: Mapping[str, Mapping[str, Any]], frontiers: Mapping[str, Mapping[float, Any]],
                   budgets: Mapping[str, Mapping[str, Any]], domain: str, tolerance: float) -> list[str]:
    """Sentences computed from the measurements: each method's best frontier point inside the English
    tolerance, each budget's choice with what it scored, and the model to use."""
    lines = []
    base_ce = evaluations["base"]["results"][domain]["ce"]
    for kept in ("en", "real-en"):
        choices = {m: frontier_choice(points, domain, kept, tolerance) for m, points in frontiers.items()
                   if all(kept in entry for entry in points.values())}
        if choices:
            said = [f"{m} × {c['scale']:g} reaches {domain} CE {c['adapted_ce']:.3f}" if c else f"{m}: no λ > 0 does"
                    for m, c in choices.items()]
            lines.append(f"- Keeping {_domain_name(kept)} CE within +{100 * tolerance:g}% of the base model's "
                         f"(test frontier, CE only; base {domain} CE {base_ce:.3f}): {'; '.join(said)}.")
    for method, info in budgets.items():
        chosen = info["retention_budget"]
        results = evaluations[f"{method} (budget)"]["results"]
        lines.append(f"- The forgetting budget ({chosen.get('described', '')}, on English dev utterances) scales "
                     f"{method} by {chosen['scale']:.2f}: {_describe(results, domain)}.")
    candidates = {name: e["results"] for name, e in evaluations.items() if name != "base"}
    keeping = {name: r for name, r in candidates.items() if _keeps_english(r)}
    if keeping:
        best = min(keeping, key=lambda name: keeping[name][domain].get("error_rate", keeping[name][domain]["ce"]))
        lines.append(f"- **Use {best}**: the lowest {domain} error among the models that keep English language ID at "
                     f"{100 * LID_FLOOR:g}% or more on synthetic and real English ({_describe(keeping[best], domain)}).")
    else:
        lines.append(f"- No adapted model keeps English language ID at {100 * LID_FLOOR:g}% on synthetic and real "
                     "English here; use the base model for English, or a smaller budget.")
    return lines


def plot_main_frontier(frontiers: Mapping[str, Mapping[float, Mapping[str, Any]]], domain: str,
                       kept: Sequence[str], budgets: Mapping[str, Mapping[str, Any]],
                       evaluations: Mapping[str, Mapping[str, Any]], tolerance: float) -> Figure:
    """Each method's CE frontier over λ: in-domain CE (x) against each kept domain's CE (y), one
    panel per kept domain; the base model is λ = 0, the budget's choice a square, and the dashed line
    the base model's CE plus ``tolerance``."""
    figure = Figure(figsize=(6 * len(kept), 5))
    for position, other in enumerate(kept, 1):
        axes = figure.add_subplot(1, len(kept), position)
        limit = evaluations["base"]["results"][other]["ce"] * (1 + tolerance)
        axes.axhline(limit, linestyle="--", linewidth=1, color="grey", label=f"base CE +{100 * tolerance:g}%")
        for index, (method, points) in enumerate(frontiers.items()):
            scales = [s for s, entry in points.items() if other in entry and domain in entry]
            xs = [points[s][domain]["ce"] for s in scales]
            ys = [points[s][other]["ce"] for s in scales]
            axes.plot(xs, ys, marker="o", color=f"C{index}", label=method)
            for x, y, scale in zip(xs, ys, scales):
                axes.annotate(f"{scale:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            budgeted = evaluations.get(f"{method} (budget)", {}).get("results", {})
            if other in budgeted and domain in budgeted:
                axes.scatter(budgeted[domain]["ce"], budgeted[other]["ce"], marker="s", s=70, color=f"C{index}",
                             edgecolor="black", zorder=5, label=f"{method} × {budgets[method]['retention_budget']['scale']:.2f} (budget)")
        axes.set(xlabel=f"{domain} CE (nats/token)", ylabel=f"{_domain_name(other)} CE (nats/token)",
                 title=f"{_domain_name(other)} kept against {domain} learnt")
        axes.grid(True, linewidth=0.5, alpha=0.5)
        axes.legend(fontsize=8)
    figure.suptitle("Frontier: each update scaled by λ after training (λ at the points; lower left is better)")
    figure.tight_layout()
    return figure


def _frontier_rows(frontiers: Mapping[str, Mapping[float, Mapping[str, Any]]], domains: Sequence[str]) -> list[dict]:
    return [{"model": method, "λ": f"{scale:g}",
             **{f"{_domain_name(d)} CE": metric_cell(entry.get(d, {}).get("ce"), "ce") for d in domains}}
            for method, points in frontiers.items() for scale, entry in points.items()]


def _transcript_lines(transcripts: Sequence[UtteranceTranscript], low: float) -> list[str]:
    rows = []
    for t in transcripts:
        text = "".join(sep + (f"[{w.word}]" if w.confidence < low else w.word) for sep, w in spaced_words(t.words))
        rows.append({"clip": t.id, "reference": t.reference or "", f"chosen (words below {low:g} in [ ])": text,
                     "disagreement": f"{t.uncertainty:.2f}"})
    return [markdown_table(rows)] if rows else ["(none)"]


def _posterior_lines(posteriors: Mapping[str, Mapping[str, Any]]) -> list[str]:
    rows = [{"method": m, "ΔW below 1e-3": f"{100 * p['dW']['thresh_fraction']:.1f}%",
             "ΔW Hoyer": f"{p['dW']['hoyer_index']:.3f}"} for m, p in posteriors.items()]
    lines = [markdown_table(rows), ""]
    for method, summary in posteriors.items():
        if "sigma" not in summary:
            continue
        groups = sorted({key.split("/")[1] for key in summary["sigma"]})
        lines += [f"Posterior scales σ of {method} (prior σp {summary['prior_scale']:g}):", "",
                  markdown_table([{"group": g, **{q: f"{summary['sigma'][f'sigma/{g}/{q}']:.2e}" for q in ("q05", "q50", "q95")}}
                                  for g in groups]), ""]
        convergence = summary.get("convergence")
        if convergence:
            share, change = convergence.get("sigma_vs_optimum/share_within"), convergence.get("kl_change_last_fifth")
            facts = ([f"{100 * share:.1f}% of scales within {convergence.get('sigma_vs_optimum/within')}x of σ*"]
                     if share is not None else []) + ([f"KL changed {100 * change:.1f}% over the last fifth"]
                                                      if change is not None else
                                                      ["the KL's change is not judged: no dev point in the last fifth"])
            verdict = ("yes" if convergence.get("converged") else
                       "scales only" if convergence.get("scales_near_optimum") and change is None else "no")
            lines += [f"Converged: **{verdict}** ({'; '.join(facts)}). Rule: {convergence.get('rule', '')}.", ""]
    return lines


def write_main_job_report(config, outcome: Mapping[str, Any], out: str | Path) -> tuple[Path, str, str]:
    """Write ``report.md`` and ``frontier.png`` into ``out``; return the page, the table and the
    recommendation."""
    out = Path(out)
    evaluations, frontiers, budgets = outcome["evaluations"], outcome["frontiers"], outcome["budgets"]
    domains = [*config.eval_domains, *(d for d in evaluations["base"]["results"] if d not in config.eval_domains)]
    table = headline_table(evaluations, budgets, domains)
    advice = "\n".join(recommendation(evaluations, frontiers, budgets, config.domain, config.budget.budget))
    kept = [d for d in ("en", "real-en") if d in evaluations["base"]["results"]]
    if frontiers:
        save_figure(plot_main_frontier(frontiers, config.domain, kept, budgets, evaluations, config.budget.budget),
                    out / "frontier.png")
    train, blora = config.train, config.blora
    real = evaluations["base"]["results"].get("real-en", {}).get("utterances", 0)
    lines = [
        "# Main job", "",
        f"Base model `{config.model}`, adapted to `{config.domain}` with {', '.join(config.methods)}. Adapters: rank "
        f"{blora.rank}, alpha {blora.rank * blora.scaling:g}, targets `{', '.join(blora.target_modules)}`; BLoRA"
        f"{' (the converged preset)' if blora == BLoRAConfig.converged() else ''}: σp {blora.prior_scale}, β {blora.beta}, "
        f"KL per `{blora.kl_normalization}`, scales learning at {train.scale_lr_multiplier:g}x the rate. {train.steps} "
        f"steps, batch {train.batch_size}, lr {train.lr}, weight decay {train.weight_decay}, seed {train.seed}.",
        "",
        f"Windows: trained with a {train.encoder_window_seconds:g} s encoder window and scored at "
        f"{config.scoring_window:g} s (scoring at 30 s would cost about 3x as much); real clips longer than "
        f"{config.scoring_window:g} s are left out of the scores ({real} clips scored). The budget's models are "
        f"exported, and the posterior transcribes, at {config.use_window_seconds:g} s (Whisper's own window): the "
        "adapters act on linear layers, not on the positions a window cuts.",
        "", "## Recommendation", "", advice, "",
        "## Results", "",
        "Test splits, greedy decoding with the language forced; CE is teacher-forced per transcript token; LID is "
        "language-ID accuracy with the language not forced. real English: "
        + ", ".join(f"`{Path(f).name}`" + (f" (first {n})" if n else "") for f, n in config.real_english)
        + f" from data/real-speech ({real} clips). One seed.", "", table, "",
        "## Frontier over λ (teacher-forced CE)", "", "![frontier](frontier.png)" if frontiers else "", "",
        markdown_table(_frontier_rows(frontiers, [config.domain, *kept])) if frontiers else "", "",
        "## Forgetting budget", "",
    ]
    for method, info in budgets.items():
        chosen = info["retention_budget"]
        lines.append(f"- {method}: λ = {chosen['scale']:.3f}, retention CE {chosen.get('retain_ce', float('nan')):.4f} "
                     f"(limit {chosen.get('retain_limit', float('nan')):.4f}, base {chosen.get('base_retain_ce', float('nan')):.4f}); "
                     f"exported to `export/{method}` (plain transformers Whisper, `budget.json` beside it)."
                     + (f" {chosen['line']}" if chosen.get("line") else ""))
    lines += ["", "## Monte Carlo transcripts", "",
              f"{config.transcript_samples} posterior draws per clip; word confidence is the share of draws agreeing "
              "with the chosen word. Files: `transcripts/transcripts.jsonl` and `transcripts/srt/`.", "",
              *_transcript_lines(outcome["transcripts"], 0.5), "",
              "## Posterior and sparsity", "", *_posterior_lines(outcome["posteriors"]),
              "## Details", "", main_job_table(evaluations, domains), ""]
    for method in config.methods:
        curve = dev_curve_table(read_log(out / "runs" / method))
        if curve is not None:
            lines += [f"### Dev curves during training: {method}", "", curve, ""]
    lines.append(f"Wall time: {outcome['minutes']:.1f} min (this leg) on {platform.machine()} with "
                 f"{torch.get_num_threads()} torch threads. Settings: `main-config.json`.")
    page = out / "report.md"
    atomic_write_text(page, "\n".join(lines) + "\n")
    return page, table, advice
