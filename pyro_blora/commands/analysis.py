"""``pyro-blora inspect``, ``sweep`` and ``report``: what finished runs learned, grids of runs, and pages of plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from pyro_blora.base_models.loading import load_processor
from pyro_blora.commands.options import (
    EVAL_DOMAINS,
    PRESET_HELP,
    TARGETS_HELP,
    adapter_default,
    comma_list,
    comma_values,
    preset_configs,
    targets_default,
)
from pyro_blora.config import KL_NORMALIZATIONS, TrainConfig
from pyro_blora.data.training_data import load_training_data
from pyro_blora.evaluation.scoring import EvalOptions, load_eval_sets
from pyro_blora.experiments.main_job import MainJobConfig, load_curve_sets
from pyro_blora.experiments.sweep import SweepConfig, run_sweep, write_domain_table
from pyro_blora.report.pages import SPARSITY_COLUMNS, write_inspection, write_report
from pyro_blora.report.tables import markdown_table

TRAIN = TrainConfig()
# Full fine-tuning diverges at the learning rates adapters take; Whisper's own recipe fine-tunes at 1e-5.
FULL_FINETUNING_LR = 1e-5


def inspect(
    runs: list[Path] = typer.Argument(..., exists=True, file_okay=False, help="run folders, or folders holding them"),
    out: Path = typer.Option(Path("inspection"), help="folder for inspect.md, inspect.json and the plots"),
    curvature_batches: int = typer.Option(0, min=0, help="also set every blora run's scales against sigma*, the "
                                          "curvature optimum measured on this many of its training batches"),
) -> None:
    """Sparsity of the adapters (A, B, dW) of finished runs, compared in one table, with plots; with
    --curvature-batches, whether each posterior converged."""
    page = write_inspection(runs, out, curvature_batches)
    typer.echo(markdown_table(json.loads((out / "inspect.json").read_text())["sparsity"], SPARSITY_COLUMNS))
    typer.echo(f"inspection: {page}")


def sweep(
    data: Path = typer.Option(..., exists=True, help="training data: a testbed domain folder"),
    testbed: Path = typer.Option(..., exists=True, file_okay=False, help="testbed folder with the evaluation domains"),
    out: Path = typer.Option(Path("sweep"), help="sweep folder (runs/, base/, results.csv, results.json)"),
    model: str = typer.Option(MainJobConfig.model, help="base model: bundled name, folder or hub id"),
    domains: list[str] = typer.Option(EVAL_DOMAINS, help="evaluated domains (the trained one and backward ones)"),
    preset: str = typer.Option("default", help=PRESET_HELP),
    betas: str = typer.Option(comma_list(SweepConfig.betas), help="comma-separated KL weights β"),
    prior_scales: Optional[str] = typer.Option(None, help="comma-separated prior standard deviations σp, the "
                                               "preset's " + adapter_default("prior_scale")),
    ranks: Optional[str] = typer.Option(None, help="comma-separated adapter ranks, the preset's " + adapter_default("rank")),
    kl_normalizations: Optional[str] = typer.Option(None, help=f"comma-separated: {', '.join(KL_NORMALIZATIONS)}, the "
                                                    f"preset's {adapter_default('kl_normalization')}"),
    methods: str = typer.Option(comma_list(SweepConfig.methods),
                                help="comma-separated methods; lora and full add one baseline per rank"),
    targets: Optional[str] = typer.Option(None, help=f"{TARGETS_HELP} {targets_default()}"),
    steps: int = typer.Option(TRAIN.steps), batch_size: int = typer.Option(TRAIN.batch_size),
    lr: float = typer.Option(TRAIN.lr), warmup_steps: int = typer.Option(TRAIN.warmup_steps),
    precision: str = typer.Option(TRAIN.precision, help="fp32 or bf16"),
    seeds: str = typer.Option(comma_list(SweepConfig.seeds), help="comma-separated seeds; every setting is trained "
                              "once per seed"),
    checkpoint_every: int = typer.Option(TRAIN.checkpoint_every),
    full_lr: float = typer.Option(FULL_FINETUNING_LR, help="learning rate of full fine-tuning (--lr is for adapters)"),
    encoder_window: float = typer.Option(TRAIN.encoder_window_seconds, help="seconds the encoder reads, for the runs "
                                         "and the base model's evaluation; < 30 is a speed option that changes the "
                                         "model (see README)"),
    eval_every: int = typer.Option(TRAIN.eval_every, help="score dev curves every N steps (0: never): the forgetting curves"),
    curve_utterances: int = typer.Option(8, help="dev utterances per domain for the curves' CE"),
    curve_decoded: int = typer.Option(4, help="of those, greedily decoded for the curves' error and language ID"),
    limit: Optional[int] = typer.Option(None, help="train on the first N utterances only"),
    eval_limit: Optional[int] = typer.Option(None, help="test utterances per domain (default: all)"),
    decode_limit: Optional[int] = typer.Option(None, help="greedy decoding on the first N only (default: all)"),
    delta_scales: Optional[str] = typer.Option(None, help="comma-separated λ: every finished point is also evaluated "
                                               "with its update scaled by λ (eval-scale<λ>.json): the report's frontier"),
    ce_only_scales: Optional[str] = typer.Option(None, help="comma-separated λ evaluated by teacher-forced CE only"),
    cache_dir: Optional[Path] = typer.Option(None, help="where prepared features are cached"),
    progress: bool = typer.Option(TRAIN.progress),
) -> None:
    """Train and evaluate a grid over β, σp, rank, KL normalisation and seeds; finished points are skipped.
    by-setting.md gives mean ± std over seeds, paired bootstrap intervals against the base model and LoRA,
    and BLoRA's backward gain, degradation reduction and in-domain drop against LoRA."""
    adapter, train = preset_configs(
        preset, dict(targets=targets),
        dict(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, precision=precision,
             checkpoint_every=checkpoint_every, eval_every=eval_every, progress=progress,
             encoder_window_seconds=encoder_window))
    grid = SweepConfig(
        betas=comma_values(betas, float, "--betas"),
        prior_scales=comma_values(prior_scales, float, "--prior-scales") if prior_scales else (adapter.prior_scale,),
        ranks=comma_values(ranks, int, "--ranks") if ranks else (adapter.rank,),
        kl_normalizations=comma_values(kl_normalizations, str, "--kl-normalizations") if kl_normalizations
        else (adapter.kl_normalization,),
        methods=comma_values(methods, str, "--methods"), seeds=comma_values(seeds, int, "--seeds"),
    )
    processor = load_processor(model)
    training = load_training_data(data, processor, cache_dir=cache_dir, limit=limit)
    sets = load_eval_sets(testbed, domains, processor, limit=eval_limit, cache_dir=cache_dir)
    curves = load_curve_sets(testbed, domains, processor, curve_utterances, cache_dir) if eval_every else None
    run_sweep(grid, model, training, sets, out, adapter=adapter, train=train, full_lr=full_lr,
              curve_sets=curves, curve_options=EvalOptions(decode_limit=curve_decoded, progress=False),
              eval_options=EvalOptions(decode_limit=decode_limit, progress=progress), echo=typer.echo,
              delta_scales=comma_values(delta_scales, float, "--delta-scales") if delta_scales else (),
              ce_only_scales=comma_values(ce_only_scales, float, "--ce-only-scales") if ce_only_scales else ())


def report(
    runs: list[Path] = typer.Argument(..., exists=True, file_okay=False, help="run folders, or folders holding them (e.g. a sweep or main job)"),
    out: Path = typer.Option(Path("report"), help="folder for report.md, summary.csv/json and the plots"),
    base: Optional[Path] = typer.Option(None, help="eval.json of the base model (default: each run's relative_to_base)"),
    in_domain: Optional[str] = typer.Option(None, help="the trained domain (default: each run's training folder)"),
) -> None:
    """Markdown and PNG plots of finished runs: frontier, sparsity by method, training curves."""
    page = write_report(runs, out, base=base, in_domain=in_domain)
    typer.echo(f"report: {page}")


def table(
    sweeps: list[Path] = typer.Argument(..., exists=True, file_okay=False, help="sweep folders, one per trained domain"),
    out: Path = typer.Option(Path("table"), help="stem of table.md, table.csv and table.json"),
) -> None:
    """The paper's table over domains: base and every method, mean ± std over seeds, changes against
    the base model, BLoRA against LoRA, sparsity."""
    page = write_domain_table(sweeps, out)
    typer.echo(page.read_text())
    typer.echo(f"table: {page}")


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
    app.command("sweep")(sweep)
    app.command("table")(table)
    app.command("report")(report)
