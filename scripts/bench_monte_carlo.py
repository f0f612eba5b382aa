"""Time Monte Carlo transcription: S samples in one batched pass (S x B rows) against S passes,
and against one posterior-mean pass.

A real Whisper checkpoint gets Bayesian adapters whose posterior is the guide's start (B = 0 means,
so the hypotheses have the base model's lengths) with the given standard deviation. Both paths
draw the same samples (same seed) and must give the same hypotheses; the script checks it.

    python scripts/bench_monte_carlo.py --model tiny.en --testbed testbed --domain en --clips 4 --samples 8 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import pyro
import torch

from pyro_blora import BLoRAConfig, build_guide, load_audio, load_speech_dataset, load_whisper, log_mel_features, monte_carlo_transcribe, wrap_whisper
from pyro_blora.predict.monte_carlo import point_transcribe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--testbed", required=True, help="testbed folder")
    parser.add_argument("--domain", default="en")
    parser.add_argument("--split", default="test")
    parser.add_argument("--clips", type=int, default=4, help="B, utterances per batch")
    parser.add_argument("--samples", type=int, default=8, help="S, posterior samples")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stddev", type=float, default=1e-3, help="posterior standard deviation of every adapter entry")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the timings as JSON here")
    args = parser.parse_args()

    whisper, processor = load_whisper(args.model)
    torch.manual_seed(args.seed)
    model = wrap_whisper(whisper, BLoRAConfig())
    guide = build_guide(model)
    guide.set_stddevs(args.stddev)
    rows = load_speech_dataset(os.path.join(args.testbed, args.domain), split=args.split).select(range(args.clips))
    features = log_mel_features(processor.feature_extractor, [load_audio(row["audio"]) for row in rows])
    language = rows[0]["language"]

    generate_kwargs = {"max_new_tokens": args.max_new_tokens}

    def run(path: str):
        pyro.set_rng_seed(args.seed)
        start = time.perf_counter()
        if path == "posterior_mean":  # one deterministic pass with the means held
            results = point_transcribe(model, guide.means(), features, processor.tokenizer, language=language,
                                       generate_kwargs=generate_kwargs)
            return time.perf_counter() - start, [[r.text] for r in results]
        results = monte_carlo_transcribe(
            model, guide, features, processor.tokenizer, num_samples=args.samples, choose="mbr",
            vectorized=path == "vectorized", language=language, generate_kwargs=generate_kwargs,
        )
        return time.perf_counter() - start, [r.hypotheses for r in results]

    run("vectorized")  # warm-up: first-call allocations and lazy initialisation
    times: dict[str, list[float]] = {"vectorized": [], "sequential": [], "posterior_mean": []}
    outputs = {}
    for _ in range(args.repeats):
        for name in times:
            seconds, hypotheses = run(name)
            times[name].append(seconds)
            outputs[name] = hypotheses
    same = outputs["vectorized"] == outputs["sequential"]
    summary = {
        "model": args.model,
        "clips": args.clips,
        "samples": args.samples,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "processor": platform.processor() or platform.machine(),
        "same_hypotheses": same,
        **{f"{name}_s": {"min": min(v), "median": statistics.median(v), "max": max(v)} for name, v in times.items()},
        "speedup_median": statistics.median(times["sequential"]) / statistics.median(times["vectorized"]),
        "vectorized_over_posterior_mean_median": statistics.median(times["vectorized"]) / statistics.median(times["posterior_mean"]),
        "distinct_hypotheses_per_clip": [len(set(h)) for h in outputs["vectorized"]],
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(summary, handle, indent=2)


if __name__ == "__main__":
    main()
