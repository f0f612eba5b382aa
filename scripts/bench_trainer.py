"""Training step of BLoRATrainer (the Hugging Face Trainer path) against ``pyro-blora train``'s own loop.

Same base model, adapters (rank 32 on q/k), objective, optimiser and data: the same utterances (log-mel-like
noise of a full 30 s window, a real transcript's tokens), the same batch size and seed. A step is what each
loop does between two steps: batch, forward, backward, clipping, Adam, schedule, logging. The library's
loop (:func:`pyro_blora.train`, no run folder) and the Trainer (logging every step to its run folder, no
checkpoints) each run ``--steps`` steps per block; the blocks alternate for ``--repeats`` repeats, so load
from other processes hits both alike. The first step of every block (setup, Pyro's validation) is not
counted: a step's time is the time between the ends of two consecutive steps. Writes its section of
BENCHMARKS.md.

    OMP_NUM_THREADS=1 python scripts/bench_trainer.py --model base --batch 2 --steps 6 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyro
import torch
from transformers import Seq2SeqTrainingArguments, TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_training import SENTENCE  # noqa: E402
from benchmark_report import machine, spread, table, write_section  # noqa: E402
from pyro_blora import BLoRAConfig, TrainConfig, build_guide, load_whisper, train, wrap_whisper  # noqa: E402
from pyro_blora.base_models.tiny import collate  # noqa: E402
from pyro_blora.config import DEFAULT_TARGETS  # noqa: E402
from pyro_blora.training.distributed import default_device  # noqa: E402
from pyro_blora.training.hf_trainer import BLoRATrainer  # noqa: E402

LIBRARY, TRAINER = "pyro-blora train (library loop)", "BLoRATrainer (Hugging Face Trainer)"
TARGET = 1.05  # Trainer / library, median step time


class Utterances(torch.utils.data.Dataset):
    """``n`` utterances: log-mel-like noise of a 30 s window and the tokens of one real transcript."""

    def __init__(self, processor, n: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.features = torch.randn(n, processor.feature_extractor.feature_size, 3000, generator=generator) * 0.5
        self.labels = torch.tensor(processor.tokenizer(SENTENCE).input_ids[1:])  # the model puts the start token back

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict:
        return {"input_features": self.features[i], "labels": self.labels}


class StepClock(TrainerCallback):
    """When each Trainer step ended (wall and process CPU seconds)."""

    def __init__(self) -> None:
        self.ends: list[tuple[float, float]] = []

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ARG002
        self.ends.append((time.perf_counter(), time.process_time()))


def gaps(ends: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds between consecutive step ends."""
    return ([b[0] - a[0] for a, b in zip(ends, ends[1:])], [b[1] - a[1] for a, b in zip(ends, ends[1:])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="steps per block (the first is not counted)")
    parser.add_argument("--repeats", type=int, default=3, help="blocks of each path, alternating")
    parser.add_argument("--out", help="also write every figure as JSON here")
    parser.add_argument("--no-write", action="store_true", help="print, do not update BENCHMARKS.md")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2: the first step of every block is not counted")
    device = default_device()
    config = TrainConfig(steps=args.steps, batch_size=args.batch, progress=False, checkpoint_every=0)

    def blora():
        whisper, processor = load_whisper(args.model)
        model = wrap_whisper(whisper.to(device), BLoRAConfig(rank=32, target_modules=DEFAULT_TARGETS))
        return model, build_guide(model, seed=0), processor

    library_model, library_guide, processor = blora()
    trainer_model, trainer_guide, _ = blora()
    data = Utterances(processor, max(2 * args.batch, 8))
    times = {LIBRARY: [], TRAINER: []}
    cpu_times = {LIBRARY: [], TRAINER: []}
    loads = {LIBRARY: [], TRAINER: []}

    def library_block() -> list[tuple[float, float]]:
        ends: list[tuple[float, float]] = []
        pyro.clear_param_store()
        train(library_model, library_guide, data, collate, config,
              callbacks=[lambda record, model, guide: ends.append((time.perf_counter(), time.process_time()))])
        return ends

    def trainer_block() -> list[tuple[float, float]]:
        clock = StepClock()
        with tempfile.TemporaryDirectory() as out:
            arguments = Seq2SeqTrainingArguments(
                output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=config.lr,
                warmup_steps=config.warmup_steps, max_grad_norm=config.max_grad_norm, seed=config.seed,
                logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=device.type == "cpu")
            trainer = BLoRATrainer(trainer_model, arguments, data, collate, guide=trainer_guide,
                                   model_source=args.model, callbacks=[clock])
            trainer.train()
        return clock.ends

    blocks = {LIBRARY: library_block, TRAINER: trainer_block}
    for repeat in range(args.repeats):
        order = [LIBRARY, TRAINER] if repeat % 2 == 0 else [TRAINER, LIBRARY]
        for name in order:
            wall, cpu = gaps(blocks[name]())
            times[name] += wall
            cpu_times[name] += cpu
            loads[name].append(os.getloadavg()[0])
            print(f"{name}: {', '.join(f'{t:.3f}' for t in wall)} s", flush=True)

    threads = torch.get_num_threads()
    ratio = spread(times[TRAINER])["median"] / spread(times[LIBRARY])["median"]
    cpu_ratio = spread(cpu_times[TRAINER])["median"] / spread(cpu_times[LIBRARY])["median"]
    conditions = {"load (1 min) after each block": {n: ", ".join(f"{x:.1f}" for x in loads[n]) for n in times},
                  "steps timed": {n: str(len(times[n])) for n in times}}
    command = (f"OMP_NUM_THREADS={threads} python scripts/bench_trainer.py --model {args.model} --batch {args.batch} "
               f"--steps {args.steps} --repeats {args.repeats}" + (f" --out {args.out}" if args.out else ""))

    def verdict(value: float) -> str:
        return f"**{value:.3f}** (target <= {TARGET:.2f}, {'met' if value <= TARGET else 'not met'})"

    body = f"""
BLoRA training steps on Whisper `{args.model}` (rank 32, alpha 64, q/k of every attention block, `TrainConfig()`'s
objective and optimiser, a batch of {args.batch} utterances of 30 s, fp32, on {device}), taken by the library's own
loop (`pyro_blora.train`, no run folder) and by `BLoRATrainer` (`pyro_blora.training.hf_trainer`: the Hugging Face
`Seq2SeqTrainer` with the same objective; logging every step, no checkpoints). Same utterances, batch size and
seed. {args.repeats} blocks of {args.steps} steps per path, alternating; the first step of every block is not
counted.

```
{command}
```

Machine: {machine()}.

Wall time per step:

{table(times, "s", extra=conditions)}

CPU time of this process per step:

{table(cpu_times, "s", extra=conditions)}

**Trainer / library (medians):** wall time {verdict(ratio)}; CPU time {verdict(cpu_ratio)}.
"""
    print(body)
    if args.out:
        Path(args.out).write_text(json.dumps({
            "command": command, "machine": machine(), "times": times, "cpu_times": cpu_times, "loads": loads,
            "threads": threads, "ratio": ratio, "cpu_ratio": cpu_ratio,
            "medians": {n: statistics.median(v) for n, v in times.items()}}, indent=1))
    if not args.no_write:
        write_section(f"Training step: Hugging Face Trainer vs pyro-blora train ({args.model}, {device.type})", body)


if __name__ == "__main__":
    main()
