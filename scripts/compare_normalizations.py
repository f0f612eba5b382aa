#!/usr/bin/env python
"""Measure how the KL normalisation and the scale parameterisation change what BLoRA learns.

Trains BLoRA briefly on one code-switched training split with each setting and prints, per setting,
the dev-set token NLL at the posterior mean before and after training, the KL term, the mean |mu| of
A and B, how far the posterior standard deviations moved, and whether collapse was reported.
The table goes to stdout and, with --markdown, into a file.

Example (real multilingual base on the testbed's Mandarin-English split):
  python scripts/compare_normalizations.py --testbed testbed --domain zh-en --steps 40
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import pyro_blora as pb
from pyro_blora.data.training_data import load_training_data
from pyro_blora.report.tables import markdown_table

SETTINGS = {
    "dataset": dict(kl_normalization="dataset"),
    "token": dict(kl_normalization="token"),
    "parameter": dict(kl_normalization="parameter"),
    "parameter, softplus, 1x scale lr": dict(kl_normalization="parameter", scale_parameterization="softplus"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base")
    parser.add_argument("--testbed", type=Path, default=Path("testbed"))
    parser.add_argument("--domain", default="zh-en")
    parser.add_argument("--train-size", type=int, default=64)
    parser.add_argument("--dev-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--cache", type=Path, default=Path(".cache/features"))
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)

    processor = pb.load_processor(args.model)
    training = load_training_data(args.testbed / args.domain, processor, "train", args.cache, limit=args.train_size)
    dev = load_training_data(args.testbed / args.domain, processor, "dev", args.cache, limit=args.dev_size)
    dev_batches = [dev.collate([dev.dataset[i] for i in range(s, min(s + 8, len(dev)))]) for s in range(0, len(dev), 8)]

    rows = []
    for name, overrides in SETTINGS.items():
        whisper, _ = pb.load_whisper(args.model)
        model = pb.wrap_whisper(whisper, pb.BLoRAConfig(**overrides))
        torch.manual_seed(args.seed)
        guide = pb.build_guide(model)
        std_before = {k: float(v.mean()) for k, v in guide.stddevs().items()}
        multiplier = 1.0 if "1x" in name else 10.0
        config = pb.TrainConfig(
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, scale_lr_multiplier=multiplier,
            seed=args.seed, checkpoint_every=0, precision="bf16" if args.bf16 else "fp32",
        )
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = pb.train(model, guide, training.dataset, training.collate, config, eval_batches=dev_batches)
        seconds = time.perf_counter() - start
        means, stds = guide.means(), guide.stddevs()
        mean_abs = {m: float(torch.cat([v.abs().flatten() for k, v in means.items() if k.endswith(m)]).mean()) for m in ("lora_A", "lora_B")}
        moved = {
            m: float(torch.tensor([float(stds[k].mean()) / std_before[k] for k in stds if k.endswith(m)]).mean())
            for m in ("lora_A", "lora_B")
        }
        rows.append(
            {
                "setting": name,
                "dev NLL before": result.base_nll,
                "dev NLL after": result.final_nll,
                "final KL term": result.final["kl"],
                "mean |mu_A|": mean_abs["lora_A"],
                "mean |mu_B|": mean_abs["lora_B"],
                "sigma_A after/before": moved["lora_A"],
                "sigma_B after/before": moved["lora_B"],
                "collapse reported": result.collapsed,
                "seconds": seconds,
                "warnings": len(caught),
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    table = markdown_table(rows)
    print(table)
    if args.markdown:
        args.markdown.write_text(f"Command: `python scripts/compare_normalizations.py {' '.join(argv or sys.argv[1:])}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
