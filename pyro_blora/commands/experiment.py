"""``pyro-blora train``, ``evaluate``, ``export``, ``frontier`` and ``main``: the experiment's commands."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from pyro_blora.base_models.loading import load_processor
from pyro_blora.commands.options import (
    BUDGET_HELP,
    EVAL_DOMAINS,
    PRESET_HELP,
    PRESETS,
    TARGETS_HELP,
    AlphaOption,
    AudioColumnOption,
    BetaOption,
    KLNormalizationOption,
    LanguageColumnOption,
    PriorScaleOption,
    RankOption,
    RetainAbsoluteOption,
    RetainConfidenceOption,
    RetainOption,
    RetainPrecisionOption,
    RetainSplitOption,
    RetainUtterancesOption,
    TextColumnOption,
    adapter_default,
    budget_default,
    column_mapping,
    comma_list,
    comma_values,
    default_note,
    preset_configs,
    retention_budget,
    targets_default,
    training_default,
)
from pyro_blora.config import WEIGHT_NOISES, RetentionBudget, TrainConfig
from pyro_blora.data.training_data import load_training_data
from pyro_blora.evaluation.scoring import EvalOptions, load_eval_sets, load_eval_source
from pyro_blora.experiments.main_job import MainJobConfig, run_main_job
from pyro_blora.experiments.budget_frontier import FRONTIER_BUDGETS, default_scales
from pyro_blora.experiments.budget_frontier import frontier as run_frontier
from pyro_blora.experiments.step import export_run, run_evaluation
from pyro_blora.report.tables import evaluation_table
from pyro_blora.runs import METHODS, base_model_of, is_run_folder
from pyro_blora.training.methods import run_training

TRAIN = TrainConfig()
EVALUATION = EvalOptions()
MAIN_JOB = MainJobConfig()


def train(
    method: str = typer.Option("blora", help=f"one of {', '.join(METHODS)}"),
    data: Path = typer.Option(..., exists=True, help="training data: a testbed domain folder, an audiofolder or its "
                              "metadata.csv, a CSV/TSV/JSONL manifest or a saved dataset"),
    out: Path = typer.Option(..., help="run folder"),
    model: str = typer.Option(MainJobConfig.model, help="base model: bundled name (base, tiny.en), folder or hub id"),
    split: str = typer.Option("train", help="split of --data to train on"),
    audio_column: AudioColumnOption = None, text_column: TextColumnOption = None,
    language_column: LanguageColumnOption = None,
    preset: str = typer.Option(PRESETS[0], help=PRESET_HELP),
    targets: Optional[str] = typer.Option(None, help=f"{TARGETS_HELP} {targets_default()}"),
    rank: RankOption = None, alpha: AlphaOption = None, prior_scale: PriorScaleOption = None,
    beta: BetaOption = None, kl_normalization: KLNormalizationOption = None,
    init_scale_a: Optional[str] = typer.Option(None, help="initial posterior std of A, or 'rho' for softplus(rho), "
                                               "rho ~ U(--init-rho-range) " + adapter_default("init_scale_A", none="rho")),
    init_scale_b: Optional[str] = typer.Option(None, help="the same for B " + adapter_default("init_scale_B", none="rho")),
    init_rho_range: Optional[tuple[float, float]] = typer.Option(None, help="low high " + adapter_default("init_rho_range")),
    scale_parameterization: Optional[str] = typer.Option(None, help="softplus or exp "
                                                         + adapter_default("scale_parameterization")),
    weight_noise: Optional[str] = typer.Option(None, help=f"{', '.join(WEIGHT_NOISES)} {training_default('weight_noise')}"),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay " + training_default("weight_decay")),
    scale_lr_multiplier: Optional[float] = typer.Option(None, help="learning rate of the scales / lr "
                                                        + training_default("scale_lr_multiplier")),
    scale_init: Optional[str] = typer.Option(None, help="where the posterior scales start: config (the adapter "
                                             "options above) or curvature (sigma* of a curvature pass) "
                                             + training_default("scale_init")),
    curvature_batches: Optional[int] = typer.Option(None, help="mini-batches of the curvature pass that judges "
                                                    "convergence (result.json 'posterior'; 0: skip) "
                                                    + training_default("curvature_batches")),
    steps: int = typer.Option(TRAIN.steps), batch_size: int = typer.Option(TRAIN.batch_size),
    lr: float = typer.Option(TRAIN.lr), warmup_steps: int = typer.Option(TRAIN.warmup_steps),
    precision: str = typer.Option(TRAIN.precision, help="fp32 or bf16"),
    seed: int = typer.Option(TRAIN.seed), checkpoint_every: int = typer.Option(TRAIN.checkpoint_every),
    eval_every: int = typer.Option(TRAIN.eval_every, help="score the dev curves every N steps (0: never)"),
    eval_testbed: Optional[Path] = typer.Option(None, help="testbed folder with the dev sets of the curves"),
    eval_domains: list[str] = typer.Option(EVAL_DOMAINS, help="domains of the dev curves"),
    eval_utterances: int = typer.Option(MainJobConfig.curve_utterances, help="dev utterances per domain for the curve's CE"),
    eval_decoded: int = typer.Option(MainJobConfig.curve_decoded, help="of which greedily decoded for the error rate"),
    limit: Optional[int] = typer.Option(None, help="train on the first N utterances only"),
    cache_dir: Optional[Path] = typer.Option(None, help="where prepared features are cached"),
    resume: bool = typer.Option(False, help="continue the run in --out from its last checkpoint"),
    init_from: Optional[Path] = typer.Option(None, help="a finished run on the same base whose trained adapter "
                                             "is the starting point (blora, map, lora)"),
    prior_from: Optional[Path] = typer.Option(None, help="a finished blora run on the same base whose posterior "
                                              "becomes the prior, per entry (blora; for map: an L2 penalty towards it)"),
    progress: bool = typer.Option(TRAIN.progress),
    gradient_checkpointing: bool = typer.Option(TRAIN.gradient_checkpointing,
                                                help="recompute activations in backward: less memory, more compute"),
    encoder_window: float = typer.Option(TRAIN.encoder_window_seconds, help="seconds the encoder reads; < 30 is a "
                                         "speed option that changes the model and refuses longer clips (see README)"),
    retain: RetainOption = None,
    retain_split: RetainSplitOption = "dev",
    retain_budget: Optional[float] = typer.Option(None, help=BUDGET_HELP),
    retain_absolute: RetainAbsoluteOption = False,
    retain_every: Optional[int] = typer.Option(None, help="measure the retention loss every N steps " + budget_default("every")),
    retain_utterances: RetainUtterancesOption = None,
    retain_confidence: RetainConfidenceOption = None,
    retain_precision: RetainPrecisionOption = None,
    retain_lr: Optional[float] = typer.Option(None, help="dual-ascent step of log beta " + budget_default("lr")),
    retain_decay: Optional[float] = typer.Option(None, help="moving average of the retention loss " + budget_default("decay")),
    beta_min: Optional[float] = typer.Option(None, help="lower bound of the adapted beta " + budget_default("beta_min")),
    beta_max: Optional[float] = typer.Option(None, help="upper bound of the adapted beta " + budget_default("beta_max")),
    retain_scale: bool = typer.Option(RetentionBudget.scale_at_end, help="when the final weights break the budget, "
                                      "also try the final update scaled by the largest lambda inside it"),
) -> None:
    """Train one method (blora, lora, map, full) into a run folder; --model may be a finished run folder;
    under torchrun, data-parallel."""
    if method not in METHODS:
        raise typer.BadParameter(f"use one of {', '.join(METHODS)}", param_hint="--method")
    blora, config = preset_configs(
        preset,
        dict(targets=targets, rank=rank, alpha=alpha, prior_scale=prior_scale, beta=beta,
             kl_normalization=kl_normalization, init_scale_A=init_scale_a, init_scale_B=init_scale_b,
             init_rho_range=init_rho_range, scale_parameterization=scale_parameterization),
        dict(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, precision=precision, seed=seed,
             checkpoint_every=checkpoint_every, eval_every=eval_every, progress=progress,
             gradient_checkpointing=gradient_checkpointing, encoder_window_seconds=encoder_window,
             weight_noise=weight_noise, weight_decay=weight_decay, scale_lr_multiplier=scale_lr_multiplier,
             scale_init=scale_init, curvature_batches=curvature_batches),
    )
    budget = retention_budget(retain_budget, retain_absolute, retain, every=retain_every, utterances=retain_utterances,
                              confidence=retain_confidence, precision=retain_precision, lr=retain_lr, decay=retain_decay,
                              beta_min=beta_min, beta_max=beta_max,
                              scale_at_end=retain_scale)
    processor = load_processor(base_model_of(model))
    training = load_training_data(data, processor, split=split, cache_dir=cache_dir, limit=limit,
                                  columns=column_mapping(audio_column, text_column, language_column))
    curve_sets = None
    if eval_every:
        if eval_testbed is None:
            raise typer.BadParameter("--eval-every needs --eval-testbed (the testbed folder with the dev sets)")
        curve_sets = load_eval_sets(eval_testbed, eval_domains, processor, split="dev", limit=eval_utterances,
                                    cache_dir=cache_dir)
    result = run_training(method, model, training, out, blora, config, curve_sets=curve_sets,
                          curve_options=EvalOptions(decode_limit=eval_decoded, progress=False), resume=resume,
                          init_from=init_from, prior_from=prior_from, budget=budget, retain=retain,
                          retain_split=retain_split, cache_dir=cache_dir)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from rank 0
        typer.echo(f"{method}: base NLL {result.base_nll:.4f} -> final NLL {result.final_nll:.4f}; run folder {out}")
        if result.budget is not None:
            typer.echo(budget_line(result.budget))


def budget_line(summary: dict) -> str:
    """A budgeted run's end in one line: what it kept, its retention bound against the budget, beta."""
    if summary.get("message") and not summary.get("met_during_training"):
        head = f"BUDGET NOT MET DURING TRAINING: {summary['message']}"
    else:
        head = f"forgetting budget ({summary['described']}) met"
    kept = {"final": "its final weights", "checkpoint": f"its weights of step {summary['kept_step']}",
            "scaled": f"its final update scaled by {summary['scale']:.4g}"}[summary["kept"]]
    beta = f"; final beta {summary['final_beta']:.4g}" if summary.get("final_beta") is not None else ""
    dev = "".join(f"; {k} {v:.4g}" for k, v in (summary.get("dev") or {}).items() if k.endswith("error_rate"))
    return (f"{head}: the run keeps {kept}; {summary['line']} (upper bound {summary['retain_ce_upper']:.4f} nats per "
            f"token, limit {summary['retain_limit']:.4f}, base {summary['base_retain_ce']:.4f}){beta}{dev}")


def evaluate(
    source: str = typer.Argument(..., help="a run folder, or a model (bundled name, folder, hub id)"),
    testbed: Optional[Path] = typer.Option(None, exists=True, file_okay=False, help="testbed folder (or --data)"),
    domains: list[str] = typer.Option(EVAL_DOMAINS, help="domains of --testbed to evaluate (in-domain and backward)"),
    data: Optional[str] = typer.Option(None, help="your own test data instead of --testbed: an audiofolder or its "
                                       "metadata.csv, a CSV/TSV/JSONL manifest, a saved dataset or a Hub id"),
    domain_name: Optional[str] = typer.Option(None, help="what eval.json calls --data "
                                               + default_note("its folder or file name")),
    audio_column: AudioColumnOption = None, text_column: TextColumnOption = None,
    language_column: LanguageColumnOption = None,
    language_id: Optional[bool] = typer.Option(None, "--language-id/--no-language-id", help="score language ID on "
                                               "--data, a set in one language " + default_note(
                                                   "when its name is en or backward-*, as for testbed domains")),
    split: Optional[str] = typer.Option(None, help="split to score " + default_note(
        "test; with --data: its only split, or test")),
    limit: Optional[int] = typer.Option(None, help="first N utterances of each domain"),
    decode_limit: Optional[int] = typer.Option(None, help="greedy decoding on the first N only (default: all)"),
    batch_size: int = typer.Option(EVALUATION.batch_size),
    base: Optional[Path] = typer.Option(None, help="eval.json (or run folder) of the base model, for relative changes"),
    against: Optional[Path] = typer.Option(None, help="another run (or eval.json) to compare against"),
    out: Optional[Path] = typer.Option(None, help="where to write eval.json (default: <run>/eval.json)"),
    cache_dir: Optional[Path] = typer.Option(None, help="where prepared features are cached"),
    progress: bool = typer.Option(EVALUATION.progress),
    delta_scale: Optional[str] = typer.Option(None, help="comma-separated λ: evaluate the run with its update scaled, "
                                              "W0 + λ (W_run - W0), into <run>/eval-scale<λ>.json (1: eval.json)"),
    encoder_window: Optional[float] = typer.Option(None, help="seconds the encoder of a model reads (a base model "
                                                   "scored beside windowed runs); a run uses its own window"),
    retain: RetainOption = None,
    retain_split: RetainSplitOption = "dev",
    retain_budget: Optional[float] = typer.Option(None, help="evaluate the run with its update scaled by the largest "
                                                  "lambda inside this budget on --retain, into "
                                                  "<run>/eval-budget<budget>.json; " + BUDGET_HELP),
    retain_absolute: RetainAbsoluteOption = False,
    retain_utterances: RetainUtterancesOption = None,
    retain_confidence: RetainConfidenceOption = None,
    retain_precision: RetainPrecisionOption = None,
) -> None:
    """Error rate, teacher-forced CE and language ID on every domain; writes eval.json and prints a table."""
    options = EvalOptions(batch_size=batch_size, decode_limit=decode_limit, progress=progress)
    budget = retention_budget(retain_budget, retain_absolute, retain, utterances=retain_utterances,
                              confidence=retain_confidence, precision=retain_precision)
    if budget is not None and delta_scale is not None:
        raise typer.BadParameter("give --delta-scale or --retain-budget, not both: the budget chooses the scale")
    scales = (None,) if delta_scale is None else comma_values(delta_scale, float, "--delta-scale")
    if out is not None and len(scales) > 1:
        raise typer.BadParameter("--out names one file; leave it out with several --delta-scale values (each "
                                 "writes <run>/eval-scale<λ>.json)")
    sets = eval_sets(source, testbed, domains, data, domain_name,
                     column_mapping(audio_column, text_column, language_column), split, limit, cache_dir, language_id)
    tables = {}
    for scale in scales:
        report = run_evaluation(source, sets, options=options, base=base, against=against, out=out,
                                delta_scale=scale, encoder_window_seconds=encoder_window, retain=retain,
                                retain_budget=budget, retain_split=retain_split, cache_dir=cache_dir)
        tables[report["model"]] = report["results"]
        if report.get("retention_budget"):
            chosen = report["retention_budget"]
            typer.echo(f"update scaled by {chosen['scale']:.4g}: {chosen['line']}")
        for name in ("base", "against"):
            if report.get(f"relative_to_{name}"):
                typer.echo(f"{report['model']}: relative change against {name} ({report[f'{name}_source']}): "
                           f"{report[f'relative_to_{name}']}")
    typer.echo(evaluation_table(tables))


def eval_sets(source: str, testbed: Path | None, domains: list[str], data: str | None, domain_name: str | None,
              columns: dict[str, str] | None, split: str | None, limit: int | None, cache_dir: Path | None,
              language_id: bool | None = None) -> dict:
    """The sets ``evaluate`` scores: the testbed's domains, or one set of the user's own data."""
    if (testbed is None) == (data is None):
        raise typer.BadParameter("give --testbed <folder> (its --domains) or --data <your test set>, one of the two")
    if data is None and (domain_name is not None or columns is not None or language_id is not None):
        raise typer.BadParameter("--domain-name, --language-id and the column flags describe --data; give --data "
                                 "<your test set>")
    processor = load_processor(base_model_of(source))
    if data is None:
        return load_eval_sets(testbed, domains, processor, split=split or "test", limit=limit, cache_dir=cache_dir)
    return load_eval_source(data, processor, split=split, name=domain_name, columns=columns, limit=limit,
                            cache_dir=cache_dir, language_id=language_id)


def export(
    run: Path = typer.Argument(..., help="a finished run folder"),
    out: Path = typer.Option(..., help="output folder: a transformers Whisper (weights and processor)"),
    retain: RetainOption = None,
    retain_split: RetainSplitOption = "dev",
    retain_budget: Optional[float] = typer.Option(None, help="scale the run's update by the largest lambda inside this "
                                                  "budget on --retain; " + BUDGET_HELP),
    retain_absolute: RetainAbsoluteOption = False,
    retain_utterances: RetainUtterancesOption = None,
    retain_confidence: RetainConfidenceOption = None,
    retain_precision: RetainPrecisionOption = None,
    cache_dir: Optional[Path] = typer.Option(None, help="where prepared features are cached"),
) -> None:
    """Write a run's adapted model as a plain transformers Whisper folder, optionally inside a forgetting budget."""
    budget = retention_budget(retain_budget, retain_absolute, retain, utterances=retain_utterances,
                              confidence=retain_confidence, precision=retain_precision)
    info = export_run(run, out, retain=retain, retain_budget=budget, retain_split=retain_split, cache_dir=cache_dir)
    if "retention_budget" in info:
        chosen = info["retention_budget"]
        typer.echo(f"update scaled by {chosen['scale']:.4g}: {chosen['line']}")
    typer.echo(f"wrote {out}")


def frontier(
    run: Path = typer.Argument(..., help="a finished run folder"),
    retain: Path = typer.Option(..., help="retention data (the domain to keep, e.g. testbed/en)"),
    out: Path = typer.Option(..., help="output folder: frontier.json, frontier.md, frontier.png"),
    retain_split: RetainSplitOption = "dev",
    retain_utterances: RetainUtterancesOption = None,
    retain_confidence: RetainConfidenceOption = None,
    retain_precision: RetainPrecisionOption = None,
    scales: str = typer.Option(comma_list(default_scales()), help="comma-separated λ in [0, 1] of the curve"),
    budgets: str = typer.Option(comma_list(FRONTIER_BUDGETS), help="comma-separated relative budgets to pick a λ for"),
    cache_dir: Optional[Path] = typer.Option(None, help="where prepared features are cached"),
) -> None:
    """A finished run's forgetting frontier: retention CE and its upper bound at every λ (W0 + λ ΔW),
    and the λ each budget picks; `export --retain-budget` exports that point without retraining."""
    if not is_run_folder(run):
        raise typer.BadParameter(f"{run} is not a run folder (one written by `pyro-blora train`)", param_hint="RUN")
    lambdas = comma_values(scales, float, "--scales")
    if any(not 0 <= s <= 1 for s in lambdas):
        raise typer.BadParameter("every λ must lie in [0, 1] (0: the base model, 1: the run as trained)",
                                 param_hint="--scales")
    chosen = comma_values(budgets, float, "--budgets")
    if any(b < 0 for b in chosen):
        raise typer.BadParameter("a relative budget is >= 0 (0.03: at most 3% worse)", param_hint="--budgets")
    # the measurement's options, checked and with RetentionBudget's defaults filled in (the budgets are --budgets)
    measured = retention_budget(0.0, False, retain, utterances=retain_utterances, confidence=retain_confidence,
                                precision=retain_precision)
    report = run_frontier(run, retain, out, lambdas, chosen, measured.utterances, measured.confidence, retain_split,
                          cache_dir, measured.precision)
    for pick in report["budgets"]:
        where = "no λ, not even 0" if pick["scale"] is None else f"λ {pick['scale']:.4g}: {pick['line']}"
        typer.echo(f"budget {100 * pick['budget']:g}%: {where}")
    typer.echo(f"wrote {out}/frontier.json, frontier.md, frontier.png")


def main(
    out: Path = typer.Option(MAIN_JOB.out, help="output folder (testbed, runs, report.md)"),
    steps: Optional[int] = typer.Option(None, help="training steps " + default_note(MAIN_JOB.train.steps)),
    eval_limit: Optional[int] = typer.Option(None, help="test utterances per domain "
                                             + default_note(MAIN_JOB.eval_limit, none="all")),
) -> None:
    """The main job: build the testbed, train LoRA and BLoRA on zh-en, evaluate, compare, report."""
    config = MainJobConfig(out=out)
    if steps is not None:
        config = replace(config, train=config.train.replace(steps=steps))
    if eval_limit is not None:
        config = replace(config, eval_limit=eval_limit)
    run_main_job(config, echo=typer.echo)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("evaluate")(evaluate)
    app.command("export")(export)
    app.command("frontier")(frontier)
    app.command("main")(main)
