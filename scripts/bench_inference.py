"""Greedy transcription with the posterior mean merged into the weights, against the base model.

The merged model is a plain transformers Whisper with W0 + dW folded in (what `evaluate` and
`load_run_model` use), so it should cost what the base model costs. Both decode the same clips of a
testbed, alternately, after a warm-up each. Writes its section of BENCHMARKS.md. (Monte Carlo
decoding, S samples vectorised vs sequential, is scripts/bench_monte_carlo.py.)

    python scripts/bench_inference.py --model base --testbed testbed --domain en --clips 2 --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_report import machine, spread, table, timed, write_section  # noqa: E402
from pyro_blora import BLoRAConfig, build_guide, load_audio, load_speech_dataset, load_whisper, log_mel_features, wrap_whisper  # noqa: E402
from pyro_blora.training.distributed import default_device  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base")
    parser.add_argument("--testbed", required=True)
    parser.add_argument("--domain", default="en")
    parser.add_argument("--split", default="test")
    parser.add_argument("--clips", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    device = default_device()

    base, processor = load_whisper(args.model)
    base.to(device).eval()
    model = wrap_whisper(copy.deepcopy(base), BLoRAConfig(rank=32))
    pyro.set_rng_seed(0)
    guide = build_guide(model)
    # A trained-looking posterior mean (B != 0): the merged weights differ from the base model's.
    guide.set_means({name: 0.01 * torch.randn_like(value) for name, value in guide.means().items()})
    merged = model.merged_whisper(guide.means()).to(device)
    del model, guide

    rows = load_speech_dataset(os.path.join(args.testbed, args.domain), split=args.split).select(range(args.clips))
    features = log_mel_features(processor.feature_extractor, [load_audio(r["audio"]) for r in rows]).to(device)
    language = rows[0]["language"]
    multilingual = bool(getattr(base.generation_config, "lang_to_id", None))
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": False, "num_beams": 1,
              **({"language": language, "task": "transcribe"} if multilingual else {})}
    models = {"base model": base, "posterior mean, merged": merged}

    @torch.no_grad()
    def decode(whisper) -> tuple[float, float, int]:
        """Wall seconds, process CPU seconds and generated tokens of one batched greedy decode."""
        ids, wall, cpu = timed(lambda: whisper.generate(features, **kwargs), device)
        return wall, cpu, int(ids.numel())

    for whisper in models.values():
        decode(whisper)
    times = {name: [] for name in models}
    per_token = {name: [] for name in models}  # CPU milliseconds per generated token
    tokens = {}
    for repeat in range(args.repeats):
        for name in (list(models) if repeat % 2 == 0 else list(reversed(models))):
            wall, cpu, tokens[name] = decode(models[name])
            times[name].append(wall)
            per_token[name].append(1000 * cpu / tokens[name])
    ratio = spread(times["posterior mean, merged"])["median"] / spread(times["base model"])["median"]
    token_ratio = spread(per_token["posterior mean, merged"])["median"] / spread(per_token["base model"])["median"]
    command = (f"OMP_NUM_THREADS={torch.get_num_threads()} python scripts/bench_inference.py --model {args.model} --testbed testbed --domain {args.domain} "
               f"--clips {args.clips} --repeats {args.repeats}")
    body = f"""
Greedy decoding of {args.clips} clips of the testbed's `{args.domain}` {args.split} split (at most
{args.max_new_tokens} new tokens) by Whisper `{args.model}` and by the same model with a BLoRA posterior
mean (rank 32, q/k) merged into its weights; alternating, {args.repeats} repeats after a warm-up each, on {device}.

```
{command}
```

Machine: {machine()}.

{table(times, "s")}

**Ratio merged / base (medians): {ratio:.3f}** (target <= 1.01).

The two models need not write transcripts of the same length ({tokens["base model"]} vs
{tokens["posterior mean, merged"]} token positions in the batch here), so the fair comparison is the cost per
generated token. Process CPU time per token position (ms; less sensitive to other load than wall time):

{table(per_token, "ms")}

**Ratio merged / base, CPU time per token (medians): {token_ratio:.3f}** (target <= 1.01). The merged
model has the base model's architecture and shapes; what remains is measurement noise.
GPU numbers are not measured yet (no GPU was available for these runs).
"""
    print(body)
    if not args.no_write:
        write_section(f"Inference: merged posterior mean vs base ({args.model}, {device.type})", body)


if __name__ == "__main__":
    main()
