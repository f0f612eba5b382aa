"""``pyro-blora sequence``: adapt to several domains in turn and measure what each strategy forgets."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pyro_blora.commands.experiment import preset_configs
from pyro_blora.evaluation.scoring import EvalOptions
from pyro_blora.experiments.sequence import COPIED_PRIOR, STRATEGIES, SequenceConfig, order_name, run_sequence, write_comparison


def sequence(
    testbed: Path = typer.Option(..., exists=True, file_okay=False, help="testbed folder with a folder per domain"),
    out: Path = typer.Option(Path("sequences"), help="output folder: <order>/<strategy>/step<i>-<domain>/ runs, "
                             "matrix.json, matrix.md, heatmap.png, and <order>/comparison.md"),
    domains: list[str] = typer.Option(["zh-en", "es-en", "ar-en"], help="domains trained on, in order (repeat)"),
    original: list[str] = typer.Option(["en"], help="domains the start model knows, evaluated too (repeat)"),
    strategies: list[str] = typer.Option(list(STRATEGIES), "--strategy", help=f"repeat; among {', '.join(STRATEGIES)}"),
    reverse: bool = typer.Option(False, help="run the reverse order of --domains as well"),
    model: str = typer.Option("base", help="start model: bundled name (base, tiny.en), folder or hub id"),
    preset: str = typer.Option("default", help="default, or paper: the paper's BLoRA as its authors' code runs it "
                               "(README: the paper preset); the options below override it"),
    targets: Optional[str] = typer.Option(None, help="adapted layers: qk, all-linear, or a regular expression "
                                          "[all-linear; paper: qk]"),
    rank: Optional[int] = typer.Option(None, help="[32]"),
    alpha: Optional[float] = typer.Option(None, help="[2 * rank]"),
    prior_scale: Optional[float] = typer.Option(None, help="[0.01]"), beta: Optional[float] = typer.Option(None, help="[0.5]"),
    kl_normalization: Optional[str] = typer.Option(None, help="dataset, token, parameter or matrix "
                                                   "[parameter; paper: matrix]"),
    prior_scale_floor: Optional[float] = typer.Option(None, help="blora-prior, map-anchor: floor on the copied prior "
                                                      "scales (runs go to <strategy>-floor<value>/)"),
    steps: int = typer.Option(60, help="training steps per domain"), batch_size: int = typer.Option(4),
    lr: float = typer.Option(1e-3), warmup_steps: int = typer.Option(5),
    precision: str = typer.Option("fp32", help="fp32 or bf16"), checkpoint_every: int = typer.Option(20),
    replay_size: int = typer.Option(8, help="lora-replay: utterances of each earlier domain mixed in"),
    eval_limit: Optional[int] = typer.Option(None, help="test utterances per domain (default: all)"),
    decode_limit: Optional[int] = typer.Option(None, help="greedy decoding on the first N of them (default: all; "
                                               "0: teacher-forced CE only)"),
    eval_batch_size: int = typer.Option(8),
    seed: int = typer.Option(0),
    progress: bool = typer.Option(True),
) -> None:
    """Train each strategy on the domains in turn, evaluate every domain after every step, and write the
    accuracy matrices, BWT and forgetting, a heat-map per strategy and a comparison per order."""
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise typer.BadParameter(f"unknown strategies {unknown}; choose among {', '.join(STRATEGIES)}")
    strategies = sorted(set(strategies), key=STRATEGIES.index)  # map-anchor reads blora-prior's runs
    if targets is None and preset == "default":
        targets = "all-linear"
    blora, train = preset_configs(
        preset,
        dict(targets=targets, rank=rank, alpha=alpha, prior_scale=prior_scale, beta=beta, kl_normalization=kl_normalization),
        dict(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, precision=precision,
             checkpoint_every=checkpoint_every, progress=progress),
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
        page = write_comparison(results, out / order_name(order) / "comparison.md")
        typer.echo(page.read_text())
        typer.echo(f"comparison: {page}")


def register(app: typer.Typer) -> None:
    app.command("sequence")(sequence)
