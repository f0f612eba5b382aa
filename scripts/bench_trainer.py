"""Training step of BLoRATrainer (the Hugging Face Trainer path) against ``pyro-blora train``'s own loop.

Same base model, adapters (rank 32 on q/k), objective, optimiser and data: the same utterances (log-mel-like
noise of a full 30 s window, a real transcript's tokens), the same batch size and seed. A step is what each
loop does between two steps: batch, forward, backward, clipping, Adam, schedule, logging. The library's
loop (:func:`pyro_blora.train`, no run folder) and the Trainer (logging every step to its run folder, no
checkpoints) each run ``--steps`` steps per block; the blocks alternate for ``--repeats`` repeats, so load
from other processes hits both alike. The first step of every block (setup, Pyro's validation) is not
counted: a step's time is the time between the ends of two consecutive steps. ``--profile`` then runs one
more block of each path under cProfile (from the end of its first step to the end of its last) and splits
each path's step by where its own CPU time goes: the Trainer's machinery, Pyro, the optimiser, the
forward and backward passes, and the functions whose time differs most. Writes its section of BENCHMARKS.md.

    OMP_NUM_THREADS=1 python scripts/bench_trainer.py --model base --batch 2 --steps 6 --repeats 3 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
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

from bench_training import CATEGORIES as TRAINING_CATEGORIES, SENTENCE, own_seconds  # noqa: E402
from benchmark_report import machine, spread, table, write_section  # noqa: E402
from pyro_blora.markdown import markdown_table  # noqa: E402
from pyro_blora import BLoRAConfig, TrainConfig, build_guide, load_whisper, train, wrap_whisper  # noqa: E402
from pyro_blora.base_models.tiny import collate  # noqa: E402
from pyro_blora.config import DEFAULT_TARGETS  # noqa: E402
from pyro_blora.training.distributed import default_device  # noqa: E402
from pyro_blora.training.hf_trainer import BLoRATrainer  # noqa: E402

LIBRARY, TRAINER = "pyro-blora train (library loop)", "BLoRATrainer (Hugging Face Trainer)"
TARGET = 1.05  # Trainer / library, median step time
# Where a profiled step's own CPU time goes: bench_training's categories, with the Trainer's machinery
# and the data loading (the tiny collate lives in pyro_blora) matched first after the backward pass; a
# function counts in the first category it matches.
CATEGORIES = (
    TRAINING_CATEGORIES[0],
    ("Hugging Face Trainer and accelerate", lambda f, name: "/transformers/trainer" in f or "/accelerate/" in f),
    ("data loading and collation", lambda f, name: "/torch/utils/data/" in f or "/base_models/tiny" in f),
    *TRAINING_CATEGORIES[1:],
)
TOP_FUNCTIONS = 8


class StepProfiler:
    """cProfile on process CPU time from the end of a block's first step to the end of its last: the
    steps the timing counts, without the setup before them."""

    def __init__(self, steps: int) -> None:
        self.steps, self.ended = steps, 0
        self.profiler = cProfile.Profile(time.process_time)

    def step_ended(self) -> None:
        self.ended += 1
        if self.ended == 1:
            self.profiler.enable()
        elif self.ended == self.steps:
            self.profiler.disable()

    def split(self) -> dict[str, float]:
        """Own seconds per timed step, by category."""
        return {name: seconds / (self.steps - 1) for name, seconds in own_seconds(self.profiler, CATEGORIES)[0].items()}

    def functions(self) -> dict[str, float]:
        """Own seconds per timed step of every function, named ``file:line(function)`` from its package."""
        return {f"{_package_path(filename)}:{line}({function})": own / (self.steps - 1)
                for (filename, line, function), (_, _, own, _, _) in pstats.Stats(self.profiler).stats.items()}


def _package_path(filename: str) -> str:
    """A source file's path from its package down (``torch/nn/modules/module.py``), not from this machine's root."""
    for marker in ("site-packages/", "/pyro_blora/"):
        if marker in filename:
            return ("pyro_blora/" if marker == "/pyro_blora/" else "") + filename.split(marker, 1)[1]
    return Path(filename).name


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

    def __init__(self, profiler: StepProfiler | None = None) -> None:
        self.ends: list[tuple[float, float]] = []
        self.profiler = profiler

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ARG002
        self.ends.append((time.perf_counter(), time.process_time()))
        if self.profiler is not None:
            self.profiler.step_ended()


def gaps(ends: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds between consecutive step ends."""
    return ([b[0] - a[0] for a, b in zip(ends, ends[1:])], [b[1] - a[1] for a, b in zip(ends, ends[1:])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="steps per block (the first is not counted)")
    parser.add_argument("--repeats", type=int, default=3, help="blocks of each path, alternating")
    parser.add_argument("--profile", action="store_true", help="then one block of each path under cProfile: "
                        "where each path's step spends its time")
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

    def library_block(profiler: StepProfiler | None = None) -> list[tuple[float, float]]:
        ends: list[tuple[float, float]] = []

        def step_ended(record, model, guide) -> None:  # noqa: ARG001
            ends.append((time.perf_counter(), time.process_time()))
            if profiler is not None:
                profiler.step_ended()

        pyro.clear_param_store()
        train(library_model, library_guide, data, collate, config, callbacks=[step_ended])
        return ends

    def trainer_block(profiler: StepProfiler | None = None) -> list[tuple[float, float]]:
        clock = StepClock(profiler)
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

    profiles = {}
    if args.profile:
        for name in (LIBRARY, TRAINER):
            profiles[name] = StepProfiler(args.steps)
            blocks[name](profiles[name])

    threads = torch.get_num_threads()
    ratio = spread(times[TRAINER])["median"] / spread(times[LIBRARY])["median"]
    cpu_ratio = spread(cpu_times[TRAINER])["median"] / spread(cpu_times[LIBRARY])["median"]
    conditions = {"load (1 min) after each block": {n: ", ".join(f"{x:.1f}" for x in loads[n]) for n in times},
                  "steps timed": {n: str(len(times[n])) for n in times}}
    command = (f"OMP_NUM_THREADS={threads} python scripts/bench_trainer.py --model {args.model} --batch {args.batch} "
               f"--steps {args.steps} --repeats {args.repeats}" + (" --profile" if args.profile else "")
               + (f" --out {args.out}" if args.out else ""))

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
{where_the_time_goes(profiles)}"""
    print(body)
    if args.out:
        Path(args.out).write_text(json.dumps({
            "command": command, "machine": machine(), "times": times, "cpu_times": cpu_times, "loads": loads,
            "threads": threads, "ratio": ratio, "cpu_ratio": cpu_ratio,
            "profile": {n: {"split": p.split(), "functions": p.functions()} for n, p in profiles.items()},
            "medians": {n: statistics.median(v) for n, v in times.items()}}, indent=1))
    if not args.no_write:
        write_section(f"Training step: Hugging Face Trainer vs pyro-blora train ({args.model}, {device.type})", body)


def where_the_time_goes(profiles: dict[str, StepProfiler]) -> str:
    """The profiled steps' split by category, side by side, and the functions whose own time differs most."""
    if not profiles:
        return ""
    library, trainer = profiles[LIBRARY], profiles[TRAINER]
    split = {LIBRARY: library.split(), TRAINER: trainer.split()}
    header = ["", "library (s/step)", "Trainer (s/step)", "Trainer - library"]

    def row(name: str, mine: float, theirs: float) -> dict[str, str]:
        return dict(zip(header, [name, f"{mine:.3f}", f"{theirs:.3f}", f"{theirs - mine:+.3f}"]))

    rows = [row(name, split[LIBRARY][name], split[TRAINER][name]) for name, _ in CATEGORIES]
    rows.append(row("total", sum(split[LIBRARY].values()), sum(split[TRAINER].values())))
    mine, theirs = library.functions(), trainer.functions()
    differing = sorted(set(mine) | set(theirs), key=lambda f: -abs(theirs.get(f, 0.0) - mine.get(f, 0.0)))
    top = [row(f"`{f}`", mine.get(f, 0.0), theirs.get(f, 0.0)) for f in differing[:TOP_FUNCTIONS]]
    return f"""
Where a step's own CPU time goes (one more block of each path under cProfile, which inflates Python-heavy
parts; seconds per step):

{markdown_table(rows, header)}

The {TOP_FUNCTIONS} functions whose own time differs most:

{markdown_table(top, header)}
"""


if __name__ == "__main__":
    main()
