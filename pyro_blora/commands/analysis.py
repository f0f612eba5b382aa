"""``pyro-blora inspect``, ``sweep`` and ``report``: what finished runs learned, grids of runs, and pages of plots."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, TypeVar

import typer


T = TypeVar("T")


def _values(text: str, convert: Callable[[str], T], option: str) -> tuple[T, ...]:
    """A comma-separated option value, e.g. ``0.1,0.5,1``."""
    try:
        values = tuple(convert(part.strip()) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise typer.BadParameter(f"{option} takes comma-separated values such as 0.1,0.5,1 ({error})") from error
    if not values:
        raise typer.BadParameter(f"{option} is empty; give at least one value")
    return values


def inspect(
    runs: list[Path] = typer.Argument(..., exists=True, file_okay=False, help="run folders, or folders holding them"),
    out: Path = typer.Option(Path("inspection"), help="folder for inspect.md, inspect.json and the plots"),
) -> None:
    """Sparsity of the adapters (A, B, dW) of finished runs, compared in one table, with plots."""
    import json

    from pyro_blora.report.pages import SPARSITY_COLUMNS, write_inspection
    from pyro_blora.report.tables import markdown_table

    page = write_inspection(runs, out)
    typer.echo(markdown_table(json.loads((out / "inspect.json").read_text())["sparsity"], SPARSITY_COLUMNS))
    typer.echo(f"inspection: {page}")


def sweep(
    data: Path = typer.Option(..., exists=True, help="training data: a testbed domain folder"),
    testbed: Path = typer.Option(..., exists=True, file_okay=False, help="testbed folder with the evaluation domains"),
    out: Path = typer.Option(Path("sweep"), help="sweep folder (runs/, base/, results.csv, results.json)"),
    model: str = typer.Option("base", help="base model: bundled name, folder or hub id"),
    domains: list[str] = typer.Option(["zh-en", "en"], help="evaluated domains (the trained one and backward ones)"),
    preset: str = typer.Option("default", help="default, or paper: adapters from BLoRAConfig.paper() and training "
                               "from TrainConfig.paper() (README: the paper preset); the options below override it"),
    betas: str = typer.Option("0.1,0.25,0.5,1,2", help="comma-separated KL weights β"),
    prior_scales: Optional[str] = typer.Option(None, help="comma-separated prior standard deviations σp [the preset's]"),
    ranks: Optional[str] = typer.Option(None, help="comma-separated adapter ranks [the preset's]"),
    kl_normalizations: Optional[str] = typer.Option(None, help="comma-separated: dataset, token, parameter, matrix "
                                                    "[the preset's: parameter; paper: matrix]"),
    methods: str = typer.Option("blora", help="comma-separated methods; lora and full add one baseline per rank"),
    targets: str = typer.Option("qk", help="adapted layers: qk, all-linear, or a regular expression"),
    steps: int = typer.Option(200), batch_size: int = typer.Option(4), lr: float = typer.Option(1e-3),
    warmup_steps: int = typer.Option(10), precision: str = typer.Option("fp32", help="fp32 or bf16"),
    seeds: str = typer.Option("0", help="comma-separated seeds; every setting is trained once per seed"),
    checkpoint_every: int = typer.Option(50),
    full_lr: float = typer.Option(1e-5, help="learning rate of full fine-tuning (--lr is for adapters)"),
    encoder_window: float = typer.Option(30.0, help="seconds the encoder reads, for the runs and the base model's "
                                         "evaluation; < 30 is a speed option that changes the model (see README)"),
    eval_every: int = typer.Option(0, help="score dev curves every N steps (0: never): the forgetting curves"),
    curve_utterances: int = typer.Option(8, help="dev utterances per domain for the curves' CE"),
    curve_decoded: int = typer.Option(4, help="of those, greedily decoded for the curves' error and language ID"),
    limit: Optional[int] = typer.Option(None, help="train on the first N utterances only"),
    eval_limit: Optional[int] = typer.Option(None, help="test utterances per domain (default: all)"),
    decode_limit: Optional[int] = typer.Option(None, help="greedy decoding on the first N only (default: all)"),
    delta_scales: Optional[str] = typer.Option(None, help="comma-separated λ: every finished point is also evaluated "
                                               "with its update scaled by λ (eval-scale<λ>.json): the report's frontier"),
    ce_only_scales: Optional[str] = typer.Option(None, help="comma-separated λ evaluated by teacher-forced CE only"),
    cache_dir: Optional[Path] = typer.Option(None, help="where prepared features are cached"),
    progress: bool = typer.Option(True),
) -> None:
    """Train and evaluate a grid over β, σp, rank, KL normalisation and seeds; finished points are skipped.
    by-setting.md gives mean ± std over seeds, paired bootstrap intervals against the base model and LoRA,
    and BLoRA's backward gain, degradation reduction and in-domain drop against LoRA."""
    from pyro_blora.commands.experiment import preset_configs
    from pyro_blora.evaluation.scoring import EvalOptions, load_eval_sets
    from pyro_blora.experiments.main_job import load_curve_sets
    from pyro_blora.data.training_data import load_training_data
    from pyro_blora.experiments.sweep import SweepConfig, run_sweep
    from pyro_blora.base_models.loading import load_processor

    adapter, train = preset_configs(
        preset, dict(targets=targets),
        dict(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, precision=precision,
             checkpoint_every=checkpoint_every, eval_every=eval_every, progress=progress,
             encoder_window_seconds=encoder_window))
    grid = SweepConfig(
        betas=_values(betas, float, "--betas"),
        prior_scales=_values(prior_scales, float, "--prior-scales") if prior_scales else (adapter.prior_scale,),
        ranks=_values(ranks, int, "--ranks") if ranks else (adapter.rank,),
        kl_normalizations=_values(kl_normalizations, str, "--kl-normalizations") if kl_normalizations
        else (adapter.kl_normalization,),
        methods=_values(methods, str, "--methods"), seeds=_values(seeds, int, "--seeds"),
    )
    processor = load_processor(model)
    training = load_training_data(data, processor, cache_dir=cache_dir, limit=limit)
    sets = load_eval_sets(testbed, domains, processor, limit=eval_limit, cache_dir=cache_dir)
    curves = load_curve_sets(testbed, domains, processor, curve_utterances, cache_dir) if eval_every else None
    run_sweep(grid, model, training, sets, out, adapter=adapter, train=train, full_lr=full_lr,
              curve_sets=curves, curve_options=EvalOptions(decode_limit=curve_decoded, progress=False),
              eval_options=EvalOptions(decode_limit=decode_limit, progress=progress), echo=typer.echo,
              delta_scales=_values(delta_scales, float, "--delta-scales") if delta_scales else (),
              ce_only_scales=_values(ce_only_scales, float, "--ce-only-scales") if ce_only_scales else ())


def report(
    runs: list[Path] = typer.Argument(..., exists=True, file_okay=False, help="run folders, or folders holding them (e.g. a sweep or main job)"),
    out: Path = typer.Option(Path("report"), help="folder for report.md, summary.csv/json and the plots"),
    base: Optional[Path] = typer.Option(None, help="eval.json of the base model (default: each run's relative_to_base)"),
    in_domain: Optional[str] = typer.Option(None, help="the trained domain (default: each run's training folder)"),
) -> None:
    """Markdown and PNG plots of finished runs: frontier, sparsity by method, training curves."""
    from pyro_blora.report.pages import write_report

    page = write_report(runs, out, base=base, in_domain=in_domain)
    typer.echo(f"report: {page}")


def table(
    sweeps: list[Path] = typer.Argument(..., exists=True, file_okay=False, help="sweep folders, one per trained domain"),
    out: Path = typer.Option(Path("table"), help="stem of table.md, table.csv and table.json"),
) -> None:
    """The paper's table over domains: base and every method, mean ± std over seeds, changes against
    the base model, BLoRA against LoRA, sparsity."""
    from pyro_blora.experiments.sweep import write_domain_table

    page = write_domain_table(sweeps, out)
    typer.echo(page.read_text())
    typer.echo(f"table: {page}")


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
    app.command("sweep")(sweep)
    app.command("table")(table)
    app.command("report")(report)
