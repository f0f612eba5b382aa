"""Training step of BLoRA (default, paper and converged presets) against peft's LoRA on a real Whisper: time, peak
memory, profile, with the machine's load average and thread count next to every figure.

Same base model, rank 32, alpha 64, targets (q/k of every attention block) and batch; a step is
forward + backward + optimiser step:

* BLoRA: ``BLoRAConfig(rank=32)``, ``TrainConfig()``: SVI step (guide, model trace, Trace_ELBO terms), Adam,
  with Pyro's validation on the first (warm-up) step only, as the training loop runs it;
* BLoRA, paper preset: ``BLoRAConfig.paper(...)``, ``TrainConfig.paper()``: the same with flipout weight
  noise, the per-matrix KL and AdamW;
* LoRA (peft): teacher-forced cross-entropy, Adam.

The three are timed in turn in one process after one warm-up step each, the order rotating every
repeat, so load from other processes hits all alike; the 1-minute load average is read after every
timed step. Peak memory: on CUDA ``max_memory_allocated`` in a fresh process per method; on CPU each
method runs in a fresh subprocess that samples its resident set during two steps (peak above the
resident set after loading). The profile counts what does not depend on the machine's load:
Python function calls (cProfile) and torch operator calls (torch.profiler), and splits one step's
time by where it goes. Writes its section of BENCHMARKS.md.

    python scripts/bench_training.py --model base --batch 2 --repeats 7
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_report import machine, spread, table, timed, write_section  # noqa: E402
from pyro_blora import BLoRAConfig, TrainConfig, build_guide, load_whisper, wrap_whisper  # noqa: E402
from pyro_blora.config import PRECISIONS, TARGET_PRESETS  # noqa: E402
from pyro_blora.training.distributed import default_device  # noqa: E402
from pyro_blora.model.injection import find_target_modules  # noqa: E402
from pyro_blora.training.methods import teacher_forced_loss  # noqa: E402
from pyro_blora.model.objective import elbo_scaling  # noqa: E402
from pyro_blora.training.loop import make_optimizer  # noqa: E402
from pyro_blora.training.svi import noisy_elbo_terms, svi_parameter_groups, validated_first_step  # noqa: E402
from pyro_blora.metrics.bootstrap import Interval, bootstrap_ratios  # noqa: E402
from pyro_blora.report.tables import markdown_table  # noqa: E402

SENTENCE = "the quick brown fox jumps over the lazy dog while the band plays on in the park"
BLORA, PAPER, CONVERGED, LORA = "BLoRA", "BLoRA, paper preset", "BLoRA, converged preset", "LoRA (peft)"
TARGETS = {BLORA: 1.05, PAPER: 1.10, CONVERGED: 1.10}  # ratio to LoRA (peft), time and memory
# The adapted layers of every method (--targets): q/k of every attention block unless asked otherwise.
ADAPTED = TARGET_PRESETS["qk"]


def make_batch(processor, batch: int, device) -> dict:
    """Log-mel-like noise of a full 30 s window and a real transcript's tokens for every row."""
    generator = torch.Generator().manual_seed(0)
    bins = processor.feature_extractor.feature_size
    features = torch.randn(batch, bins, 3000, generator=generator) * 0.5
    ids = processor.tokenizer(SENTENCE).input_ids[1:]  # the model puts the start token back
    labels = torch.tensor([ids] * batch)
    return {"input_features": features.to(device), "labels": labels.to(device), "index": torch.arange(batch, device=device)}


def blora_step(model_name: str, batch_size: int, device, precision: str, preset: str = "default"):
    """One SVI step as the training loop takes it (objective, optimiser and its groups)."""
    whisper, processor = load_whisper(model_name)
    if preset == "default":
        config, train_config = BLoRAConfig(rank=32, target_modules=ADAPTED), TrainConfig()
    else:
        config = getattr(BLoRAConfig, preset)(target_modules=ADAPTED)
        train_config = getattr(TrainConfig, preset)()
    model = wrap_whisper(whisper.to(device), config)
    pyro.set_rng_seed(0)
    guide = build_guide(model)
    model.configure_objective(elbo_scaling(model.config, 1000, 30_000, model.num_adapter_parameters()))
    optimizer = make_optimizer(svi_parameter_groups(guide, train_config), train_config)
    batch = make_batch(processor, batch_size, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    objective = validated_first_step(lambda batch: noisy_elbo_terms(model, guide, batch, train_config))

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = objective(batch).loss
        loss.backward()
        optimizer.step()
    return step


def lora_step(model_name: str, batch_size: int, device, precision: str):
    from peft import LoraConfig, get_peft_model

    whisper, processor = load_whisper(model_name)
    whisper.to(device)
    config = BLoRAConfig(rank=32)
    peft_model = get_peft_model(whisper, LoraConfig(r=32, lora_alpha=config.scaling * 32, lora_dropout=0.0,
                                                    target_modules=find_target_modules(whisper, ADAPTED)))
    whisper.eval()
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    batch = make_batch(processor, batch_size, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = teacher_forced_loss(whisper, batch).loss
        loss.backward()
        optimizer.step()
    return step


STEPS = {
    BLORA: blora_step,
    PAPER: lambda *args: blora_step(*args, preset="paper"),
    CONVERGED: lambda *args: blora_step(*args, preset="converged"),
    LORA: lora_step,
}


def paired_ratio(reference: list[float], other: list[float]) -> Interval:
    """Mean of ``other`` over mean of ``reference``, repeats resampled in pairs (95% interval)."""
    times = np.stack([np.asarray(reference), np.asarray(other)])
    return bootstrap_ratios([(times, np.ones_like(times))], lambda values: values[..., 1] / values[..., 0])


def conditions() -> dict[str, float]:
    """What the machine was doing: the 1-minute load average and this process's torch threads."""
    return {"load": os.getloadavg()[0], "threads": torch.get_num_threads()}


def op_profile(step) -> dict[str, float]:
    """torch.profiler view of one step: the time inside torch operators and how many were called."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    heavy = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm")
                or "scaled_dot_product" in e.key)
    return {"op_seconds": sum(e.self_cpu_time_total for e in events) / 1e6, "op_calls": sum(e.count for e in events),
            "matmul_attention_seconds": heavy / 1e6, **conditions()}


def resident_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_of(method: str, args, device) -> dict[str, float]:
    """Peak memory of two steps above the memory after loading (MiB), with the load at the end."""
    step = STEPS[method](args.model, args.batch, device, args.precision)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(); step()
        torch.cuda.synchronize()
        return {"peak_mb": (torch.cuda.max_memory_allocated() - base) / 2**20, **conditions()}
    base, peak, running = resident_mb(), [0.0], [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], resident_mb())
            time.sleep(0.002)
    thread = threading.Thread(target=sample)
    thread.start()
    step(); step()
    running[0] = False
    thread.join()
    return {"peak_mb": peak[0] - base, **conditions()}


CATEGORIES = (
    ("backward pass (autograd engine)", lambda f, name: "run_backward" in name),
    ("Pyro (tracing, sampling, log-densities)", lambda f, name: "/pyro/" in f and "/pyro_blora/" not in f),
    ("pyro_blora (model, guide, ELBO terms)", lambda f, name: "/pyro_blora/" in f),
    ("optimiser step", lambda f, name: "/torch/optim/" in f),
    ("transformers + torch forward (layers, ops)", lambda f, name: True),
)


def own_seconds(profiler: cProfile.Profile, categories=CATEGORIES) -> tuple[dict[str, float], int]:
    """A finished profile's own seconds by category (the first whose test matches a function's file and
    name), and its number of Python function calls."""
    shares = {name: 0.0 for name, _ in categories}
    calls = 0
    for (filename, _, function), (_, count, own, _, _) in pstats.Stats(profiler).stats.items():
        calls += count
        for name, matches in categories:
            if matches(filename, function):
                shares[name] += own
                break
    return shares, calls


def profile(step) -> dict:
    """One step under cProfile (process CPU time): own seconds by category and Python function calls."""
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    step()
    profiler.disable()
    shares, calls = own_seconds(profiler)
    return {"seconds": shares, "python_calls": calls, **conditions()}


def load_note(loads: list[float]) -> str:
    return f"{statistics.mean(loads):.1f} ({min(loads):.1f}-{max(loads):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    parser.add_argument("--targets", default="qk", choices=tuple(TARGET_PRESETS), help="the adapted layers")
    parser.add_argument("--memory-of", choices=tuple(STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help="also write every figure as JSON here")
    parser.add_argument("--no-write", action="store_true", help="print, do not update BENCHMARKS.md")
    args = parser.parse_args()
    global ADAPTED
    ADAPTED = TARGET_PRESETS[args.targets]
    device = default_device()
    if args.memory_of:
        print(json.dumps(memory_of(args.memory_of, args, device)))
        return

    steps = {name: make(args.model, args.batch, device, args.precision) for name, make in STEPS.items()}
    for step in steps.values():
        step()  # warm-up
    names = list(steps)
    times = {name: [] for name in names}
    cpu_times = {name: [] for name in names}
    loads = {name: [] for name in names}
    for repeat in range(args.repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:  # every method takes every position in turn
            _, wall, cpu = timed(steps[name], device)
            times[name].append(wall)
            cpu_times[name].append(cpu)
            loads[name].append(os.getloadavg()[0])
    profiles = {name: profile(step) for name, step in steps.items()}
    ops = {name: op_profile(step) for name, step in steps.items()}
    del steps
    memory = {}
    for name in names:
        command = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch),
                   "--precision", args.precision, "--targets", args.targets, "--memory-of", name]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        memory[name] = json.loads(output.splitlines()[-1])

    threads = torch.get_num_threads()
    medians = {name: spread(times[name])["median"] for name in names}
    cpu_medians = {name: spread(cpu_times[name])["median"] for name in names}
    ratio = {name: medians[name] / medians[LORA] for name in TARGETS}
    cpu_ratio = {name: cpu_medians[name] / cpu_medians[LORA] for name in TARGETS}
    memory_ratio = {name: memory[name]["peak_mb"] / memory[LORA]["peak_mb"] for name in TARGETS}
    paired = {name: paired_ratio(cpu_times[LORA], cpu_times[name]) for name in TARGETS}
    conditions_columns = {"load (1 min): mean (range)": {name: load_note(loads[name]) for name in names},
                          "torch threads": {name: str(threads) for name in names}}
    command = f"OMP_NUM_THREADS={threads} python scripts/bench_training.py --model {args.model} --batch {args.batch} --repeats {args.repeats}" + (
        f" --precision {args.precision}" if args.precision != "fp32" else "") + (
        f" --targets {args.targets}" if args.targets != "qk" else "") + (f" --out {args.out}" if args.out else "")

    def interval_verdicts(intervals: dict[str, Interval]) -> str:
        def verdict(interval: Interval, target: float) -> str:
            if interval.high <= target:
                return "met"
            return "not met" if interval.low > target else "undecided"
        return "; ".join(f"{name} / LoRA **{i.estimate:.3f}** [{i.low:.3f}, {i.high:.3f}] (target <= {TARGETS[name]:.2f}, "
                         f"{verdict(i, TARGETS[name])})" for name, i in intervals.items())

    def verdicts(ratios: dict[str, float]) -> str:
        return "; ".join(f"{name} / LoRA **{value:.3f}** (target <= {TARGETS[name]:.2f}, "
                         f"{'met' if value <= TARGETS[name] else 'not met'})" for name, value in ratios.items())

    memory_table = markdown_table([
        {"": name, "peak (MiB)": f"{memory[name]['peak_mb']:.0f}", "load (1 min)": f"{memory[name]['load']:.1f}",
         "torch threads": memory[name]["threads"]} for name in names])
    profile_table = markdown_table([
        {"": category, **{name: f"{profiles[name]['seconds'][category]:.3f}" for name in names}}
        for category, _ in CATEGORIES])
    count_table = markdown_table([
        {"": name, "Python calls": profiles[name]["python_calls"], "operator calls": ops[name]["op_calls"],
         "operator time (s)": f"{ops[name]['op_seconds']:.2f}",
         "of it matrix products and attention (s)": f"{ops[name]['matmul_attention_seconds']:.2f}",
         "load (1 min): cProfile / profiler": f"{profiles[name]['load']:.1f} / {ops[name]['load']:.1f}",
         "torch threads": threads} for name in names])
    body = f"""
Training steps on Whisper `{args.model}`, rank 32, alpha 64, adapters on `{args.targets}` ({"q/k of every attention block" if args.targets == "qk" else "the layers of that preset"}), a batch
of {args.batch} utterances (30 s windows, {args.precision}), on {device}: **BLoRA** (`BLoRAConfig(rank=32)`,
`TrainConfig()`: SVI step with guide sample, model trace, Trace_ELBO terms, backward, Adam; Pyro's
validation on the warm-up step only, as in training), **BLoRA,
paper preset** (`BLoRAConfig.paper(target_modules=...)`, `TrainConfig.paper()`: the same with flipout weight
noise, the per-matrix KL and AdamW), **BLoRA, converged preset** (`BLoRAConfig.converged(target_modules=...)`,
`TrainConfig.converged()`: the paper preset's step with the scales at 30x the learning rate) and peft's
**LoRA** (teacher-forced cross-entropy, backward, Adam).
{args.repeats} repeats after one warm-up step each, all in turn with the order rotating every repeat; the
1-minute load average was read after every timed step.

```
{command}
```

Machine: {machine()}.

Wall time per step:

{table(times, "s", extra=conditions_columns)}

**Step time ratios (medians):** {verdicts(ratio)}.

CPU time of this process per step (the same steps; less sensitive to other processes than wall time):

{table(cpu_times, "s", extra=conditions_columns)}

**CPU time ratios (medians):** {verdicts(cpu_ratio)}.

Steps of one repeat ran back to back, so a repeat is a pair; resampling the {args.repeats} repeats in pairs
gives the ratio of mean CPU times a 95% interval, which says whether the target is decided at this
many repeats: {interval_verdicts(paired)}.

Peak memory of two steps above the memory after loading (each method in a fresh process; on CPU the
resident set sampled every 2 ms, on CUDA `max_memory_allocated`):

{memory_table}

**Memory ratios:** {verdicts(memory_ratio)}.

What one step does, counted (these counts do not depend on the machine's load; the seconds do): Python
function calls (cProfile), torch operator calls and the time inside them (torch.profiler, one step each):

{count_table}

Where one step spends its time (cProfile, own process CPU time per function, seconds; profiling inflates
Python-heavy parts):

{profile_table}

GPU numbers (step time, utterances/s, share of peak FLOP/s) are not measured yet: no GPU was available
for these runs; the script measures them unchanged on a CUDA machine.
"""
    print(body)
    if args.out:
        Path(args.out).write_text(json.dumps({
            "command": command, "machine": machine(), "times": times, "cpu_times": cpu_times, "loads": loads,
            "threads": threads, "memory": memory, "profiles": profiles, "ops": ops, "ratio": ratio,
            "cpu_ratio": cpu_ratio, "memory_ratio": memory_ratio,
            "paired_cpu_ratio": {name: interval.to_dict() for name, interval in paired.items()}}, indent=1))
    if not args.no_write:
        suffix = "" if args.targets == "qk" else f", {args.targets}"
        write_section(f"Training step: BLoRA vs LoRA ({args.model}, {device.type}{suffix})", body)


if __name__ == "__main__":
    main()
