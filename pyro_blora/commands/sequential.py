"""``pyro-blora sequence``: adapt to several domains in turn and measure what each strategy forgets."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pyro_blora.commands.options import (PRESET_HELP, TARGETS_HELP, AlphaOption, BetaOption, KLNormalizationOption,
                                         PriorScaleOption, RankOption, default_note, preset_configs, targets_default)
from pyro_blora.config import ALL_LINEAR_TARGETS, TrainConfig
from pyro_blora.evaluation.scoring import EvalOptions
from pyro_blora.experiments.sequence import COPIED_PRIOR, STRATEGIES, SequenceConfig, order_name, order_results, run_sequence
from pyro_blora.experiments.sequence_results import write_comparison
from pyro_blora.testbed import TestbedConfig

# Every step of a sequence: a shorter run per domain than a single adaptation's.
STEP_TRAINING = TrainConfig(steps=60, warmup_steps=5, checkpoint_every=20)
# Without a preset, sequences adapt every linear layer: q/k-only adapters at this scale barely forget.
SEQUENCE_TARGETS = ALL_LINEAR_TARGETS


def sequence(
    testbed: Path = typer.Option(..., exists=True, file_okay=False, help="testbed folder with a folder per domain"),
    out: Path = typer.Option(Path("sequences"), help="output folder: <order>/<strategy>/step<i>-<domain>/ runs, "
                             "matrix.json, matrix.md, heatmap.png, and <order>/comparison.md"),
    domains: list[str] = typer.Option(list(TestbedConfig.pairs), help="domains trained on, in order (repeat)"),
    original: list[str] = typer.Option(list(SequenceConfig.original_domains),
                                       help="domains the start model knows, evaluated too (repeat)"),
    strategies: list[str] = typer.Option(list(STRATEGIES), "--strategy", help=f"repeat; among {', '.join(STRATEGIES)}"),
    reverse: bool = typer.Option(False, help="run the reverse order of --domains as well"),
    model: str = typer.Option(SequenceConfig.model, help="start model: bundled name (base, tiny.en), folder or hub id"),
    preset: str = typer.Option("default", help=PRESET_HELP),
    targets: Optional[str] = typer.Option(None, help=f"{TARGETS_HELP} {targets_default(SEQUENCE_TARGETS)}"),
    rank: RankOption = None, alpha: AlphaOption = None, prior_scale: PriorScaleOption = None,
    beta: BetaOption = None, kl_normalization: KLNormalizationOption = None,
    prior_scale_floor: Optional[float] = typer.Option(None, help="blora-prior, map-anchor, laplace-prior: floor on the copied prior "
                                                      "scales (runs go to <strategy>-floor<value>/)"),
    steps: int = typer.Option(STEP_TRAINING.steps, help="training steps per domain"),
    batch_size: int = typer.Option(STEP_TRAINING.batch_size),
    lr: float = typer.Option(STEP_TRAINING.lr), warmup_steps: int = typer.Option(STEP_TRAINING.warmup_steps),
    precision: str = typer.Option(STEP_TRAINING.precision, help="fp32 or bf16"),
    checkpoint_every: int = typer.Option(STEP_TRAINING.checkpoint_every),
    encoder_window: float = typer.Option(STEP_TRAINING.encoder_window_seconds, help="seconds the encoder reads; < 30 "
                                         "cuts it for every step's run and scores the start model with the same cut"),
    replay_size: int = typer.Option(SequenceConfig.replay_size, help="lora-replay: utterances of each earlier domain mixed in"),
    eval_limit: Optional[int] = typer.Option(None, help="test utterances per domain "
                                             + default_note(SequenceConfig.eval_limit, none="all")),
    decode_limit: Optional[int] = typer.Option(None, help="greedy decoding on the first N of them (default: all; "
                                               "0: teacher-forced CE only)"),
    eval_batch_size: int = typer.Option(EvalOptions.batch_size),
    seed: int = typer.Option(SequenceConfig.seed),
    progress: bool = typer.Option(STEP_TRAINING.progress),
) -> None:
    """Train each strategy on the domains in turn, evaluate every domain after every step, and write the
    accuracy matrices, BWT and forgetting, a heat-map per strategy and a comparison per order."""
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise typer.BadParameter(f"unknown strategies {unknown}; choose among {', '.join(STRATEGIES)}")
    strategies = sorted(set(strategies), key=STRATEGIES.index)  # map-anchor reads blora-prior's runs
    if targets is None and preset == "default":
        targets = SEQUENCE_TARGETS
    blora, train = preset_configs(
        preset,
        dict(targets=targets, rank=rank, alpha=alpha, prior_scale=prior_scale, beta=beta, kl_normalization=kl_normalization),
        dict(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, precision=precision,
             checkpoint_every=checkpoint_every, encoder_window_seconds=encoder_window, progress=progress),
    )
    evaluation = EvalOptions(batch_size=eval_batch_size, decode_limit=decode_limit, language_id=False,
                             progress=progress)
    orders = [tuple(domains)] + ([tuple(reversed(domains))] if reverse else [])
    for order in orders:
        results = []
        for strategy in strategies:
            config = SequenceConfig(strategy=strategy, domains=order, original_domains=tuple(original), model=model,
                                    blora=blora, train=train, replay_size=replay_size, eval_limit=eval_limit,
                                    evaluation=evaluation, seed=seed,
                                    prior_scale_floor=prior_scale_floor if strategy in COPIED_PRIOR else None)
            results.append(run_sequence(config, testbed, out, echo=typer.echo))
        folder = out / order_name(order)  # strategies run into it earlier are compared too
        page = write_comparison(order_results(folder, results), folder / "comparison.md")
        typer.echo(page.read_text())
        typer.echo(f"comparison: {page}")


def register(app: typer.Typer) -> None:
    app.command("sequence")(sequence)
