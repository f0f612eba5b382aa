"""One BLoRATrainer step on the tiny Whisper, for the data-parallel test: run it plainly or under torchrun.

    python -m tests.trainer_subprocess OUT_DIR --per-device-batch B

Rank 0 writes OUT_DIR/first_step.pt: the first step's loss (the Trainer's, averaged over the
processes) and the guide's gradients (reduced over the processes) before the optimiser step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyro
import torch
from transformers import Seq2SeqTrainingArguments, TrainerCallback

from pyro_blora import BLoRAConfig, build_guide, wrap_whisper
from pyro_blora.training.hf_trainer import BLoRATrainer
from tests.tiny import TinyTask, collate, tiny_whisper

__all__ = ["first_step", "main"]


class _Gradients(TrainerCallback):
    """The guide's gradients of the first step, as the optimiser will see them."""

    def __init__(self, guide) -> None:
        self.guide, self.grads = guide, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # noqa: ARG002
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in self.guide.named_parameters()}


def first_step(out_dir: Path, per_device_batch: int) -> dict:
    """Loss and gradients of the first step of a 1-step Trainer run (no clipping) on the 8-utterance task."""
    model = wrap_whisper(tiny_whisper(0), BLoRAConfig(rank=4))
    pyro.set_rng_seed(0)
    guide = build_guide(model)
    args = Seq2SeqTrainingArguments(
        output_dir=str(out_dir), max_steps=1, per_device_train_batch_size=per_device_batch, learning_rate=3e-2,
        warmup_steps=2, max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=True, seed=0,
    )
    gradients = _Gradients(guide)
    trainer = BLoRATrainer(model, args, TinyTask(8), collate, guide=guide, model_source="tiny",
                           callbacks=[gradients])
    trainer.train()
    loss = next(r["loss"] for r in trainer.state.log_history if "loss" in r)
    return {"loss": loss, "grads": gradients.grads, "world_size": args.world_size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--per-device-batch", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = first_step(args.out_dir, args.per_device_batch)
    if torch.distributed.is_initialized():
        # every rank leaves the group before it exits: a rank that exits with gloo's threads still
        # running aborts ("terminate called without an active exception") and fails the launch
        rank = torch.distributed.get_rank()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        if rank != 0:
            return 0
    torch.save(result, args.out_dir / "first_step.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
