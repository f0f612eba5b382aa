"""``pyro-blora train``, ``evaluate`` and ``main``: the experiment's commands."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from pyro_blora.config import BLoRAConfig, DEFAULT_TARGETS, TrainConfig
from pyro_blora.evaluation import EvalOptions, format_table
from pyro_blora.experiment import ALL_LINEAR_TARGETS, MainJobConfig, run_evaluation, run_main_job
from pyro_blora.methods import METHODS, base_model_of, load_training_data, run_training
from pyro_blora.weights import load_processor

TARGET_PRESETS = {"qk": DEFAULT_TARGETS, "all-linear": ALL_LINEAR_TARGETS}


def adapter_config(targets: str, rank: int, alpha: float | None, prior_scale: float, beta: float,
                   kl_normalization: str) -> BLoRAConfig:
    """The adapters the command-line options describe (``targets``: a preset name or a regular expression)."""
    return BLoRAConfig(rank=rank, alpha=alpha, target_modules=TARGET_PRESETS.get(targets, (targets,)),
                       prior_scale=prior_scale, beta=beta, kl_normalization=kl_normalization)


def train(
    method: str = typer.Option("blora", help=f"one of {', '.join(METHODS)}"),
    data: Path = typer.Option(..., exists=True, help="training data: a testbed domain folder, a saved DatasetDict or a manifest"),
    out: Path = typer.Option(..., help="run folder"),
    model: str = typer.Option("base", help="base model: bundled name (base, tiny.en), folder or hub id"),
    split: str = typer.Option("train", help="split of --data to train on"),
    targets: str = typer.Option("qk", help="adapted layers: qk, all-linear, or a regular expression"),
    rank: int = typer.Option(32), alpha: Optional[float] = typer.Option(None, help="default 2 * rank"),
    prior_scale: float = typer.Option(0.01), beta: float = typer.Option(0.5),
    kl_normalization: str = typer.Option("parameter", help="dataset, token or parameter"),
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
) -> None:
    """Train one method (blora, lora, map, full) into a run folder; --model may be a finished run folder;
    under torchrun, data-parallel."""
    from pyro_blora.evaluation import load_eval_sets

    if method not in METHODS:
        raise typer.BadParameter(f"use one of {', '.join(METHODS)}", param_hint="--method")
    blora = adapter_config(targets, rank, alpha, prior_scale, beta, kl_normalization)
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, precision=precision,
                         seed=seed, checkpoint_every=checkpoint_every, eval_every=eval_every, progress=progress,
                         gradient_checkpointing=gradient_checkpointing, encoder_window_seconds=encoder_window)
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
                          init_from=init_from, prior_from=prior_from)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from rank 0
        typer.echo(f"{method}: base NLL {result.base_nll:.4f} -> final NLL {result.final_nll:.4f}; run folder {out}")


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
) -> None:
    """Error rate, teacher-forced CE and language ID on every domain; writes eval.json and prints a table."""
    options = EvalOptions(batch_size=batch_size, decode_limit=decode_limit, progress=progress)
    report = run_evaluation(source, testbed=testbed, domains=domains, split=split, limit=limit, options=options,
                            base=base, against=against, out=out, cache_dir=cache_dir)
    tables = {report["model"]: report["results"]}
    for name in ("base", "against"):
        if report.get(f"relative_to_{name}"):
            typer.echo(f"relative change against {name} ({report[f'{name}_source']}): {report[f'relative_to_{name}']}")
    typer.echo(format_table(tables))


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
    app.command("main")(main)
