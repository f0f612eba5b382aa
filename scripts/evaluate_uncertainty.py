"""Monte Carlo uncertainty of a BLoRA posterior on the testbed's test splits.

Two phases, each skipped when its output exists:

1. ``--train-dir``: a short BLoRA run and a plain LoRA run (same adapters, data, steps and seed) on a
   code-switched training split, saved as ``blora/`` (a posterior folder) and ``lora.safetensors``.
   Pass ``--posterior`` instead to evaluate a posterior trained elsewhere (then the LoRA baseline
   is left out unless ``--lora`` names its adapter file).
2. Evaluation: every test split is transcribed under S posterior samples (the largest S asked for;
   smaller S use the first draws), with the posterior mean and with LoRA; the report, plots and
   JSON lines go to ``--out``.

Example (real base model, a few clips per domain)::

    python scripts/evaluate_uncertainty.py --testbed testbed --model base --train-dir runs/unc \
        --train-utterances 120 --train-steps 80 --clips-per-domain 8 --out runs/unc/eval
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import datasets
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from pyro_blora import (
    BLoRAConfig,
    TrainConfig,
    build_guide,
    load_posterior,
    load_speech_dataset,
    load_whisper,
    prepare_dataset,
    save_posterior,
    train,
    wrap_whisper,
)
from pyro_blora.data import PreparedSpeechDataset, SpeechCollator, decoder_start_token_id
from pyro_blora.training import batch_order


def _prepared(testbed: Path, domain: str, split: str, processor, limit: int | None, cache: Path):
    dataset = load_speech_dataset(testbed / domain, split=split)
    if limit is not None and limit < len(dataset):
        dataset = dataset.select(range(limit))
    prepared, _ = prepare_dataset(dataset, processor, cache_dir=cache)
    return prepared


def _train_lora(model, init: dict[str, torch.Tensor], dataset, collate, config: TrainConfig) -> dict[str, torch.Tensor]:
    """Plain LoRA: the same adapters held as point values and fitted to the mean token cross-entropy."""
    params = {site: torch.nn.Parameter(value.clone()) for site, value in init.items()}
    optimizer = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=0.0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if config.precision == "bf16" else nullcontext()
    model.eval()
    for step in tqdm(range(config.steps), desc="LoRA"):
        indices = batch_order(len(dataset), config.batch_size, config.seed, step)
        batch = collate([dataset[int(i)] for i in indices])
        with model.hold_adapters(params), autocast:
            logits = model.logits(batch)
        loss = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), batch["labels"], ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm or float("inf"))
        optimizer.step()
    return {site: value.detach().clone() for site, value in params.items()}


def train_adapters(args) -> None:
    out = Path(args.train_dir)
    if (out / "blora" / "posterior.json").exists() and (out / "lora.safetensors").exists():
        return
    whisper, processor = load_whisper(args.model)
    prepared = _prepared(Path(args.testbed), args.train_domain, "train", processor, args.train_utterances, out / "cache")
    dataset = PreparedSpeechDataset(prepared)
    collate = SpeechCollator(decoder_start_token_id(processor.tokenizer))
    torch.manual_seed(args.seed)
    model = wrap_whisper(whisper, BLoRAConfig())
    guide = build_guide(model)
    init = guide.means()
    config = TrainConfig(steps=args.train_steps, batch_size=args.train_batch_size, warmup_steps=min(10, args.train_steps // 5), lr=args.lr, precision="bf16", seed=args.seed, checkpoint_every=0)
    timings = {}
    start = time.perf_counter()
    result = train(model, guide, dataset, collate, config)
    timings["blora_s"] = time.perf_counter() - start
    save_posterior(out / "blora", model, guide, {"base_model": args.model, "train_domain": args.train_domain,
                                                 "train_utterances": len(dataset), "steps": args.train_steps,
                                                 "base_nll": result.base_nll, "final_nll": result.final_nll})
    start = time.perf_counter()
    lora = _train_lora(model, init, dataset, collate, config)
    timings["lora_s"] = time.perf_counter() - start
    save_file({k: v.contiguous() for k, v in lora.items()}, str(out / "lora.safetensors"))
    (out / "train.json").write_text(json.dumps({**timings, "base_nll": result.base_nll, "final_nll": result.final_nll}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--testbed", required=True, help="testbed folder (pyro-blora testbed --out ...)")
    parser.add_argument("--model", default="base", help="base Whisper: bundled name, folder or hub id")
    parser.add_argument("--train-dir", help="where the short BLoRA and LoRA runs are written / found")
    parser.add_argument("--train-domain", default="zh-en")
    parser.add_argument("--train-utterances", type=int, default=120)
    parser.add_argument("--train-steps", type=int, default=80)
    parser.add_argument("--train-batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train-only", action="store_true", help="stop after phase 1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.train_dir:
        train_adapters(args)
    if args.train_only:
        return


if __name__ == "__main__":
    main()
