"""Train BLoRA on the tiny Whisper in a process of its own, so tests can kill it and resume it.

    python -m tests.train_subprocess RUN_DIR [--steps N] [--batch-size B] [--resume] [--step-delay SECONDS]

Checkpoints every step into RUN_DIR. Under torchrun it trains data-parallel (gloo). ``--step-delay`` sleeps after each step (outside the
arithmetic) so a test has time to send a signal mid-run. A run stopped by SIGTERM/SIGINT
prints the library's message and exits with 128 + the signal number, as shells report it.
"""

from __future__ import annotations

import argparse
import sys
import time

import pyro
import torch

from pyro_blora import BLoRAConfig, TrainConfig, build_guide, train, wrap_whisper
from pyro_blora.training.distributed import distributed_session
from pyro_blora.training.loop import TrainingInterrupted
from tests.tiny import TinyTask, collate, tiny_whisper

__all__ = ["main", "train_config"]


def train_config(steps: int, seed: int = 0, batch_size: int = 2) -> TrainConfig:
    return TrainConfig(
        steps=steps, lr=3e-2, batch_size=batch_size, warmup_steps=2, checkpoint_every=1, keep_checkpoints=2, seed=seed,
        progress=False,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=2)
    # Adam turns rounding noise in near-zero gradients into full-size steps; in float64 that noise
    # stays far below Adam's epsilon, so runs that differ only in summation order agree closely.
    parser.add_argument("--float64", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--step-delay", type=float, default=0.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # every run of a comparison does the same arithmetic in the same order
    if args.float64:
        torch.set_default_dtype(torch.float64)
    model = wrap_whisper(tiny_whisper(args.seed), BLoRAConfig(rank=4))
    pyro.set_rng_seed(args.seed)
    guide = build_guide(model)

    def slow_down(record, model, guide):  # noqa: ARG001
        time.sleep(args.step_delay)

    try:
        with distributed_session(torch.device("cpu")):
            train(
                model, guide, TinyTask(8, seed=args.seed), collate, train_config(args.steps, args.seed, args.batch_size),
                run_dir=args.run_dir, resume=args.resume, callbacks=[slow_down] if args.step_delay else (),
            )
    except TrainingInterrupted as stop:
        print(stop, file=sys.stderr, flush=True)
        return 128 + stop.signal
    return 0


if __name__ == "__main__":
    sys.exit(main())
