"""Training step of BLoRA against peft's LoRA on a real Whisper: time, peak memory, profile.

Same base model, rank, targets (q/k), batch and optimiser (Adam); a step is forward + backward +
optimiser step. The two are timed alternately in one process (so load from other processes hits
both alike), after one warm-up step each. Peak memory: on CUDA ``max_memory_allocated`` in this
process; on CPU each method runs in a fresh subprocess that samples its resident set during the
steps (peak above the resident set after loading). The profile (cProfile) splits one step of each
by where its time goes. Writes its section of BENCHMARKS.md.

    python scripts/bench_training.py --model base --batch 2 --repeats 7
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_report import machine, spread, table, timed, write_section  # noqa: E402
from pyro_blora import BLoRAConfig, build_guide, load_whisper, wrap_whisper  # noqa: E402
from pyro_blora.distributed import default_device  # noqa: E402
from pyro_blora.injection import find_target_modules  # noqa: E402
from pyro_blora.methods import _teacher_forced_loss  # noqa: E402
from pyro_blora.objective import elbo_scaling, elbo_terms  # noqa: E402

SENTENCE = "the quick brown fox jumps over the lazy dog while the band plays on in the park"


def make_batch(processor, batch: int, device) -> dict:
    """Log-mel-like noise of a full 30 s window and a real transcript's tokens for every row."""
    generator = torch.Generator().manual_seed(0)
    bins = processor.feature_extractor.feature_size
    features = torch.randn(batch, bins, 3000, generator=generator) * 0.5
    ids = processor.tokenizer(SENTENCE).input_ids[1:]  # the model puts the start token back
    labels = torch.tensor([ids] * batch)
    return {"input_features": features.to(device), "labels": labels.to(device), "index": torch.arange(batch, device=device)}


def blora_step(model_name: str, batch_size: int, device, precision: str):
    whisper, processor = load_whisper(model_name)
    model = wrap_whisper(whisper.to(device), BLoRAConfig(rank=32))
    pyro.set_rng_seed(0)
    guide = build_guide(model)
    model.configure_objective(elbo_scaling(model.config, 1000, 30_000, model.num_adapter_parameters()))
    optimizer = torch.optim.Adam(guide.parameters(), lr=1e-4)
    batch = make_batch(processor, batch_size, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = elbo_terms(model, guide, batch).loss
        loss.backward()
        optimizer.step()
    return step


def lora_step(model_name: str, batch_size: int, device, precision: str):
    from peft import LoraConfig, get_peft_model

    whisper, processor = load_whisper(model_name)
    whisper.to(device)
    config = BLoRAConfig(rank=32)
    peft_model = get_peft_model(whisper, LoraConfig(r=32, lora_alpha=config.scaling * 32, lora_dropout=0.0,
                                                    target_modules=find_target_modules(whisper, config.target_modules)))
    whisper.eval()
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    batch = make_batch(processor, batch_size, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = _teacher_forced_loss(whisper, batch).loss
        loss.backward()
        optimizer.step()
    return step


STEPS = {"BLoRA": blora_step, "LoRA (peft)": lora_step}


def op_profile(step) -> dict[str, float]:
    """torch.profiler view of one step: the time inside torch operators and how many were called."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    heavy = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm")
                or "scaled_dot_product" in e.key)
    return {"op_seconds": sum(e.self_cpu_time_total for e in events) / 1e6, "op_calls": sum(e.count for e in events),
            "matmul_attention_seconds": heavy / 1e6}


def resident_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_of(method: str, args, device) -> float:
    """Peak memory of two steps above the memory after loading (MiB)."""
    step = STEPS[method](args.model, args.batch, device, args.precision)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(); step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
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
    return peak[0] - base


CATEGORIES = (
    ("backward pass (autograd engine)", lambda f, name: "run_backward" in name),
    ("Pyro (tracing, sampling, log-densities)", lambda f, name: "/pyro/" in f and "/pyro_blora/" not in f),
    ("pyro_blora (model, guide, ELBO terms)", lambda f, name: "/pyro_blora/" in f),
    ("Adam step", lambda f, name: "/torch/optim/" in f),
    ("transformers + torch forward (layers, ops)", lambda f, name: True),
)


def profile(step) -> dict[str, float]:
    """Seconds of one step by category (own time of each function, cProfile)."""
    profiler = cProfile.Profile()
    profiler.enable()
    step()
    profiler.disable()
    shares = {name: 0.0 for name, _ in CATEGORIES}
    for (filename, _, function), (_, _, own, _, _) in pstats.Stats(profiler).stats.items():
        for name, matches in CATEGORIES:
            if matches(filename, function):
                shares[name] += own
                break
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--memory-of", choices=tuple(STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print, do not update BENCHMARKS.md")
    args = parser.parse_args()
    device = default_device()
    if args.memory_of:
        print(json.dumps({"peak_mb": memory_of(args.memory_of, args, device)}))
        return

    steps = {name: make(args.model, args.batch, device, args.precision) for name, make in STEPS.items()}
    for step in steps.values():
        step()  # warm-up
    times = {name: [] for name in steps}
    cpu_times = {name: [] for name in steps}
    for repeat in range(args.repeats):
        order = list(steps) if repeat % 2 == 0 else list(reversed(steps))
        for name in order:
            _, wall, cpu = timed(steps[name], device)
            times[name].append(wall)
            cpu_times[name].append(cpu)
    profiles = {name: profile(step) for name, step in steps.items()}
    ops = {name: op_profile(step) for name, step in steps.items()}
    del steps
    memory = {}
    for name in STEPS:
        command = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch),
                   "--precision", args.precision, "--memory-of", name]
        memory[name] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])["peak_mb"]

    blora, lora = (spread(times[name]) for name in STEPS)
    ratio = blora["median"] / lora["median"]
    cpu_ratio = spread(cpu_times["BLoRA"])["median"] / spread(cpu_times["LoRA (peft)"])["median"]
    memory_ratio = memory["BLoRA"] / memory["LoRA (peft)"]
    command = f"OMP_NUM_THREADS={torch.get_num_threads()} python scripts/bench_training.py --model {args.model} --batch {args.batch} --repeats {args.repeats}" + (
        f" --precision {args.precision}" if args.precision != "fp32" else "")
    profile_rows = "\n".join(
        f"| {category} | {profiles['BLoRA'][category]:.3f} | {profiles['LoRA (peft)'][category]:.3f} |"
        for category, _ in CATEGORIES
    )
    body = f"""
BLoRA (SVI step: guide sample, model trace, Trace_ELBO terms, backward, Adam) against peft's LoRA
(teacher-forced cross-entropy, backward, Adam) on Whisper `{args.model}`: rank 32, alpha 64, q/k of every
attention block, batch of {args.batch} utterances (30 s windows, {args.precision}), {args.repeats} alternating
repeats after one warm-up step each, on {device}.

```
{command}
```

Machine: {machine()}.

{table(times, "s")}

**Step time ratio BLoRA / LoRA (medians): {ratio:.3f}** (target <= 1.05).

CPU time of this process per step (the same steps):

{table(cpu_times, "s")}

**CPU time ratio BLoRA / LoRA (medians): {cpu_ratio:.3f}.**

Inside torch's operators (torch.profiler, one step each): BLoRA {ops['BLoRA']['op_seconds']:.2f} s in
{ops['BLoRA']['op_calls']} operator calls, of which {ops['BLoRA']['matmul_attention_seconds']:.2f} s in matrix
products and attention; LoRA {ops['LoRA (peft)']['op_seconds']:.2f} s in {ops['LoRA (peft)']['op_calls']} calls,
{ops['LoRA (peft)']['matmul_attention_seconds']:.2f} s in matrix products and attention.

Peak memory of two steps above the memory after loading (each method in a fresh process; on CPU the
resident set sampled every 2 ms, on CUDA `max_memory_allocated`): BLoRA {memory['BLoRA']:.0f} MiB, LoRA
{memory['LoRA (peft)']:.0f} MiB, **ratio {memory_ratio:.3f}** (target <= 1.05).

Where one step spends its time (cProfile, own time per function, seconds; profiling inflates
Python-heavy parts):

| | BLoRA | LoRA (peft) |
|---|---|---|
{profile_rows}

GPU numbers (step time, utterances/s, share of peak FLOP/s) are not measured yet: no GPU was available
for these runs; the script measures them unchanged on a CUDA machine.
"""
    print(body)
    if not args.no_write:
        write_section(f"Training step: BLoRA vs LoRA ({args.model}, {device.type})", body)


if __name__ == "__main__":
    main()
