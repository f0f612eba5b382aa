"""``pyro-blora train``, ``evaluate`` and ``main``: the experiment's commands."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from pyro_blora.config import BLoRAConfig, DEFAULT_TARGETS, RetentionBudget, TrainConfig
from pyro_blora.evaluation.scoring import EvalOptions, format_table
from pyro_blora.experiments.main_job import ALL_LINEAR_TARGETS, MainJobConfig, export_run, run_evaluation, run_main_job
from pyro_blora.training.methods import METHODS, base_model_of, load_training_data, run_training
from pyro_blora.base_models.loading import load_processor

TARGET_PRESETS = {"qk": DEFAULT_TARGETS, "all-linear": ALL_LINEAR_TARGETS}


PRESETS = ("default", "paper")


def preset_configs(preset: str, adapter: dict, train: dict) -> tuple[BLoRAConfig, TrainConfig]:
    """The configs of ``preset`` (``default``: the dataclasses' defaults; ``paper``: BLoRAConfig.paper()
    and TrainConfig.paper()) with every option that was given (not None) put over them; ``targets``
    in ``adapter`` is a preset name (qk, all-linear) or a regular expression."""
    if preset not in PRESETS:
        raise typer.BadParameter(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    adapter = {k: v for k, v in adapter.items() if v is not None}
    train = {k: v for k, v in train.items() if v is not None}
    if "targets" in adapter:
        targets = adapter.pop("targets")
        adapter["target_modules"] = TARGET_PRESETS.get(targets, (targets,))
    for name in ("init_scale_A", "init_scale_B"):  # "rho" on the command line: softplus(rho), rho ~ U(range)
        if adapter.get(name) == "rho":
            adapter[name] = None
        elif name in adapter:
            adapter[name] = float(adapter[name])
    if preset == "paper":
        return BLoRAConfig.paper(**adapter), TrainConfig.paper(**train)
    return BLoRAConfig(**adapter), TrainConfig(**train)


RETAIN_HELP = ("retention data (the domain to keep, e.g. testbed/en): with --retain-budget, a forgetting budget; "
               "utterances without transcripts are labelled by the base model's greedy transcripts")
BUDGET_HELP = ("how much worse the retention loss (CE per transcript token) may get: 0.03 = 3% over the base model; "
               "with --retain-absolute, the highest retention loss allowed (nats per token)")


def retention_budget(budget: float | None, absolute: bool, retain: Path | None, **options) -> RetentionBudget | None:
    """The forgetting budget the command-line options describe (None without --retain-budget)."""
    if (budget is None) != (retain is None):
        raise typer.BadParameter("a forgetting budget needs both --retain (the retention data) and --retain-budget")
    if budget is None:
        return None
    given = {k: v for k, v in options.items() if v is not None}
    try:
        return RetentionBudget(budget, kind="absolute" if absolute else "relative", **given)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error


def train(
    method: str = typer.Option("blora", help=f"one of {', '.join(METHODS)}"),
    data: Path = typer.Option(..., exists=True, help="training data: a testbed domain folder, a saved DatasetDict or a manifest"),
    out: Path = typer.Option(..., help="run folder"),
    model: str = typer.Option("base", help="base model: bundled name (base, tiny.en), folder or hub id"),
    split: str = typer.Option("train", help="split of --data to train on"),
    preset: str = typer.Option("default", help="default, or paper: the paper's BLoRA as its authors' code runs it "
                               "(README: the paper preset); the options below override it"),
    targets: Optional[str] = typer.Option(None, help="adapted layers: qk, all-linear, or a regular expression [qk]"),
    rank: Optional[int] = typer.Option(None, help="[32]"),
    alpha: Optional[float] = typer.Option(None, help="[2 * rank]"),
    prior_scale: Optional[float] = typer.Option(None, help="[0.01]"), beta: Optional[float] = typer.Option(None, help="[0.5]"),
    kl_normalization: Optional[str] = typer.Option(None, help="dataset, token, parameter or matrix [parameter; paper: matrix]"),
    init_scale_a: Optional[str] = typer.Option(None, help="initial posterior std of A, or 'rho' for softplus(rho), "
                                               "rho ~ U(--init-rho-range) [1e-3; paper: rho]"),
    init_scale_b: Optional[str] = typer.Option(None, help="the same for B [1e-4; paper: rho]"),
    init_rho_range: Optional[tuple[float, float]] = typer.Option(None, help="low high [-5.5 -4.5]"),
    scale_parameterization: Optional[str] = typer.Option(None, help="softplus or exp [exp; paper: softplus]"),
    weight_noise: Optional[str] = typer.Option(None, help="shared, flipout or lrt [shared; paper: flipout]"),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay [0; paper: 5e-4]"),
    scale_lr_multiplier: Optional[float] = typer.Option(None, help="learning rate of the scales / lr [10; paper: 1]"),
    steps: int = typer.Option(200), batch_size: int = typer.Option(4), lr: float = typer.Option(1e-3),
    warmup_steps: int = typer.Option(10), precision: str = typer.Option("fp32", help="fp32 or bf16"),
    seed: int = typer.Option(0), checkpoint_every: int = typer.Option(50),
    eval_every: int = typer.Option(0, help="score the dev curves every N steps (0: never)"),
    eval_testbed: Optional[Path] = typer.Option(None, help="testbed folder with the dev sets of the curves"),
    eval_domains: list[str] = typer.Option(["zh-en", "en"], help="domains of the dev curves"),
    eval_utterances: int = typer.Option(16, help="dev utterances per domain for the curve's CE"),
    eval_decoded: int = typer.Option(4, help="of which greedily decoded for the error rate"),
    limit: Optional[int] = typer.Option(None, help="train on the first N utterances only"),
    cache_dir: Optional[Path] = typer.Option(None, help="where prepared features are cached"),
    resume: bool = typer.Option(False, help="continue the run in --out from its last checkpoint"),
    init_from: Optional[Path] = typer.Option(None, help="a finished run on the same base whose trained adapter "
                                             "is the starting point (blora, map, lora)"),
    prior_from: Optional[Path] = typer.Option(None, help="a finished blora run on the same base whose posterior "
                                              "becomes the prior, per entry (blora; for map: an L2 penalty towards it)"),
    progress: bool = typer.Option(True),
    gradient_checkpointing: bool = typer.Option(False, help="recompute activations in backward: less memory, more compute"),
    encoder_window: float = typer.Option(30.0, help="seconds the encoder reads; < 30 is a speed option that changes "
                                                     "the model and refuses longer clips (see README)"),
    retain: Optional[Path] = typer.Option(None, help=RETAIN_HELP),
    retain_split: str = typer.Option("dev", help="split of --retain (test when it has no such split)"),
    retain_budget: Optional[float] = typer.Option(None, help=BUDGET_HELP),
    retain_absolute: bool = typer.Option(False, help="--retain-budget is the highest retention loss allowed"),
    retain_every: Optional[int] = typer.Option(None, help="measure the retention loss every N steps [10]"),
    retain_utterances: Optional[int] = typer.Option(None, help="utterances of the fixed retention batch [8]"),
    retain_lr: Optional[float] = typer.Option(None, help="dual-ascent step of log beta [5]"),
    retain_decay: Optional[float] = typer.Option(None, help="moving average of the retention loss [0.5]"),
    beta_min: Optional[float] = typer.Option(None, help="lower bound of the adapted beta [1e-3]"),
    beta_max: Optional[float] = typer.Option(None, help="upper bound of the adapted beta [1e4]"),
    retain_scale: bool = typer.Option(True, help="when the final weights break the budget, also try the final "
                                      "update scaled by the largest lambda inside it"),
) -> None:
    """Train one method (blora, lora, map, full) into a run folder; --model may be a finished run folder;
    under torchrun, data-parallel."""
    from pyro_blora.evaluation.scoring import load_eval_sets

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
             weight_noise=weight_noise, weight_decay=weight_decay, scale_lr_multiplier=scale_lr_multiplier),
    )
    budget = retention_budget(retain_budget, retain_absolute, retain, every=retain_every, utterances=retain_utterances,
                              lr=retain_lr, decay=retain_decay, beta_min=beta_min, beta_max=beta_max,
                              scale_at_end=retain_scale)
    processor = load_processor(base_model_of(model))
    training = load_training_data(data, processor, split=split, cache_dir=cache_dir, limit=limit)
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
    """A budgeted run's end in one line: what it kept, its retention loss against the limit, beta."""
    if summary.get("message") and not summary.get("met_during_training"):
        head = f"BUDGET NOT MET DURING TRAINING: {summary['message']}"
    else:
        head = f"forgetting budget ({summary['described']}) met"
    kept = {"final": "its final weights", "checkpoint": f"its weights of step {summary['kept_step']}",
            "scaled": f"its final update scaled by {summary['scale']:.4g}"}[summary["kept"]]
    beta = f"; final beta {summary['final_beta']:.4g}" if summary.get("final_beta") is not None else ""
    dev = "".join(f"; {k} {v:.4g}" for k, v in (summary.get("dev") or {}).items() if k.endswith("error_rate"))
    return (f"{head}: the run keeps {kept}, retention loss {summary['retain_ce']:.4f} (limit "
            f"{summary['retain_limit']:.4f}, base {summary['base_retain_ce']:.4f}){beta}{dev}")


def evaluate(
    source: str = typer.Argument(..., help="a run folder, or a model (bundled name, folder, hub id)"),
    testbed: Path = typer.Option(..., exists=True, file_okay=False, help="testbed folder"),
    domains: list[str] = typer.Option(["zh-en", "en"], help="domains to evaluate (in-domain and backward)"),
    split: str = typer.Option("test"),
    limit: Optional[int] = typer.Option(None, help="first N utterances of each domain"),
    decode_limit: Optional[int] = typer.Option(None, help="greedy decoding on the first N only (default: all)"),
    batch_size: int = typer.Option(8),
    base: Optional[Path] = typer.Option(None, help="eval.json (or run folder) of the base model, for relative changes"),
    against: Optional[Path] = typer.Option(None, help="another run (or eval.json) to compare against"),
    out: Optional[Path] = typer.Option(None, help="where to write eval.json (default: <run>/eval.json)"),
    cache_dir: Optional[Path] = typer.Option(None, help="where prepared features are cached"),
    progress: bool = typer.Option(True),
    delta_scale: Optional[str] = typer.Option(None, help="comma-separated λ: evaluate the run with its update scaled, "
                                              "W0 + λ (W_run - W0), into <run>/eval-scale<λ>.json (1: eval.json)"),
    encoder_window: Optional[float] = typer.Option(None, help="seconds the encoder of a model reads (a base model "
                                                   "scored beside windowed runs); a run uses its own window"),
    retain: Optional[Path] = typer.Option(None, help=RETAIN_HELP),
    retain_split: str = typer.Option("dev", help="split of --retain (test when it has no such split)"),
    retain_budget: Optional[float] = typer.Option(None, help="evaluate the run with its update scaled by the largest "
                                                  "lambda inside this budget on --retain, into "
                                                  "<run>/eval-budget<budget>.json; " + BUDGET_HELP),
    retain_absolute: bool = typer.Option(False, help="--retain-budget is the highest retention loss allowed"),
    retain_utterances: Optional[int] = typer.Option(None, help="retention utterances measured [8]"),
) -> None:
    """Error rate, teacher-forced CE and language ID on every domain; writes eval.json and prints a table."""
    from pyro_blora.commands.analysis import _values
    from pyro_blora.evaluation.scoring import load_eval_sets

    options = EvalOptions(batch_size=batch_size, decode_limit=decode_limit, progress=progress)
    budget = retention_budget(retain_budget, retain_absolute, retain, utterances=retain_utterances)
    if budget is not None and delta_scale is not None:
        raise typer.BadParameter("give --delta-scale or --retain-budget, not both: the budget chooses the scale")
    scales = (None,) if delta_scale is None else _values(delta_scale, float, "--delta-scale")
    if out is not None and len(scales) > 1:
        raise typer.BadParameter("--out names one file; leave it out with several --delta-scale values (each "
                                 "writes <run>/eval-scale<λ>.json)")
    sets = load_eval_sets(testbed, domains, load_processor(base_model_of(source)), split=split, limit=limit,
                          cache_dir=cache_dir)
    tables = {}
    for scale in scales:
        report = run_evaluation(source, sets, options=options, base=base, against=against, out=out,
                                delta_scale=scale, encoder_window_seconds=encoder_window, retain=retain,
                                retain_budget=budget, retain_split=retain_split, cache_dir=cache_dir)
        tables[report["model"]] = report["results"]
        for name in ("base", "against"):
            if report.get(f"relative_to_{name}"):
                typer.echo(f"{report['model']}: relative change against {name} ({report[f'{name}_source']}): "
                           f"{report[f'relative_to_{name}']}")
    typer.echo(format_table(tables))


def export(
    run: Path = typer.Argument(..., help="a finished run folder"),
    out: Path = typer.Option(..., help="output folder: a transformers Whisper (weights and processor)"),
    retain: Optional[Path] = typer.Option(None, help=RETAIN_HELP),
    retain_split: str = typer.Option("dev", help="split of --retain (test when it has no such split)"),
    retain_budget: Optional[float] = typer.Option(None, help="scale the run's update by the largest lambda inside this "
                                                  "budget on --retain; " + BUDGET_HELP),
    retain_absolute: bool = typer.Option(False, help="--retain-budget is the highest retention loss allowed"),
    retain_utterances: Optional[int] = typer.Option(None, help="retention utterances measured [8]"),
    cache_dir: Optional[Path] = typer.Option(None, help="where prepared features are cached"),
) -> None:
    """Write a run's adapted model as a plain transformers Whisper folder, optionally inside a forgetting budget."""
    budget = retention_budget(retain_budget, retain_absolute, retain, utterances=retain_utterances)
    info = export_run(run, out, retain=retain, retain_budget=budget, retain_split=retain_split, cache_dir=cache_dir)
    if "retention_budget" in info:
        chosen = info["retention_budget"]
        typer.echo(f"update scaled by {chosen['scale']:.4g}: retention loss {chosen['retain_ce']:.4f} (limit "
                   f"{chosen['retain_limit']:.4f}, base {chosen['base_retain_ce']:.4f})")
    typer.echo(f"wrote {out}")


def main(
    out: Path = typer.Option(Path("main-job"), help="output folder (testbed, runs, report.md)"),
    steps: Optional[int] = typer.Option(None, help="training steps (default 80)"),
    eval_limit: Optional[int] = typer.Option(None, help="test utterances per domain (default: all)"),
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
    app.command("main")(main)
