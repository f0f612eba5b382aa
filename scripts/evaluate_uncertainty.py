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
        --train-utterances 120 --train-steps 80 --lora-steps 80 --clips-per-domain 8 --out runs/unc/eval
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import pyro
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
from pyro_blora.inference import minimum_bayes_risk, monte_carlo_transcribe, point_transcribe
from pyro_blora.data import load_audio
from pyro_blora.features import log_mel_features
from pyro_blora.peft_io import peft_site_values
from pyro_blora.metrics import normalize_text, scoring_unit, utterance_error_counts
from pyro_blora.training import batch_order
from pyro_blora.transcribe import UtteranceTranscript, collect_utterances, word_confidences
from pyro_blora.uncertainty import evaluate_uncertainty, plot_report


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
    """Phase 1: a BLoRA posterior, then (with --lora-steps > 0) a plain LoRA from the same start."""
    out = Path(args.train_dir)
    lora_wanted = args.lora_steps > 0 and not (out / "lora.safetensors").exists()
    if (out / "blora" / "posterior.json").exists() and not lora_wanted:
        return
    whisper, processor = load_whisper(args.model)
    prepared = _prepared(Path(args.testbed), args.train_domain, "train", processor, args.train_utterances, out / "cache")
    dataset = PreparedSpeechDataset(prepared)
    collate = SpeechCollator(decoder_start_token_id(processor.tokenizer))
    torch.manual_seed(args.seed)
    model = wrap_whisper(whisper, BLoRAConfig())
    guide = build_guide(model)
    init = guide.means()
    config = TrainConfig(steps=args.train_steps, batch_size=args.train_batch_size, warmup_steps=min(10, args.train_steps // 5),
                         lr=args.lr, precision="bf16", seed=args.seed, checkpoint_every=0)
    log = json.loads((out / "train.json").read_text()) if (out / "train.json").exists() else {}
    if not (out / "blora" / "posterior.json").exists():
        start = time.perf_counter()
        result = train(model, guide, dataset, collate, config)
        log.update(blora_s=time.perf_counter() - start, base_nll=result.base_nll, final_nll=result.final_nll)
        save_posterior(out / "blora", model, guide, {"base_model": args.model, "train_domain": args.train_domain,
                                                     "train_utterances": len(dataset), "steps": args.train_steps, **log})
    if lora_wanted:
        start = time.perf_counter()
        lora = _train_lora(model, init, dataset, collate, config.replace(steps=args.lora_steps))
        log.update(lora_s=time.perf_counter() - start, lora_steps=args.lora_steps)
        save_file({k: v.contiguous() for k, v in lora.items()}, str(out / "lora.safetensors"))
    (out / "train.json").write_text(json.dumps(log, indent=2))


# ------------------------------------------------------------------ phase 2
def _sample_prefix_records(batch, mc, lora_points, sizes, timing) -> list[dict]:
    """Per utterance: the mean, MBR-at-S and LoRA hypotheses, with the scores of each S."""
    rows = []
    for utterance, result, lora in zip(batch, mc, lora_points):
        language = utterance.language
        row = {"id": utterance.id, "language": language, "reference": utterance.reference,
               "mean": result.mean_hypothesis, "mean_log_prob": result.mean_log_prob,
               "lora": None if lora is None else lora.text, "lora_log_prob": None if lora is None else lora.mean_log_prob,
               "samples": result.hypotheses, "token_entropy": result.mean_token_entropy, "by_s": {}, **timing}
        for size in sizes:
            prefix = result.hypotheses[:size]
            best, disagreement = minimum_bayes_risk(prefix, language)
            row["by_s"][str(size)] = {"mbr": prefix[best], "disagreement": disagreement}
        rows.append(row)
    return rows


def _lora_values(path: Path, model) -> dict[str, torch.Tensor]:
    """Plain LoRA adapter values for the model's sites: a safetensors file of site values, a peft
    adapter folder, or a ``pyro-blora train --method lora`` run folder."""
    if path.is_file():
        return load_file(str(path))
    if (path / "adapter").is_dir():
        path = path / "adapter"
    return peft_site_values(path, model)


def evaluate(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    posterior = Path(args.posterior or Path(args.train_dir) / "blora")
    whisper, processor = load_whisper(args.model)
    if (posterior / "posterior").is_dir():  # a blora run folder
        posterior = posterior / "posterior"
    model, guide = load_posterior(posterior, whisper)
    lora_path = Path(args.lora) if args.lora else (Path(args.train_dir) / "lora.safetensors" if args.train_dir else None)
    lora = _lora_values(lora_path, model) if lora_path is not None and lora_path.exists() else None
    sizes = sorted(set(args.samples))
    largest = sizes[-1]
    domains = args.domains or sorted(p.name for p in Path(args.testbed).iterdir() if (p / "dataset_dict.json").exists())
    records_path = out / "utterances.jsonl"
    done = {json.loads(line)["id"] for line in records_path.open()} if records_path.exists() else set()
    generate_kwargs = {"max_new_tokens": args.max_new_tokens}
    pyro.set_rng_seed(args.seed)
    with records_path.open("a", encoding="utf-8") as handle:
        for domain in domains:
            utterances = [u for u in collect_utterances(Path(args.testbed) / domain, split="test", limit=args.clips_per_domain)
                          if u.id not in done]
            for start in tqdm(range(0, len(utterances), args.batch_size), desc=domain):
                batch = utterances[start:start + args.batch_size]
                language = batch[0].language
                features = log_mel_features(processor.feature_extractor, [load_audio(u.audio) for u in batch])
                tick = time.perf_counter()
                mc = monte_carlo_transcribe(model, guide, features, processor.tokenizer, num_samples=largest,
                                            choose="mbr", language=language, generate_kwargs=generate_kwargs)
                sampled_s = time.perf_counter() - tick
                tick = time.perf_counter()
                means = point_transcribe(model, guide.means(), features, processor.tokenizer, language=language,
                                         generate_kwargs=generate_kwargs)
                mean_s = time.perf_counter() - tick
                lora_points = point_transcribe(model, lora, features, processor.tokenizer, language=language,
                                               generate_kwargs=generate_kwargs) if lora else [None] * len(batch)
                for result, mean in zip(mc, means):
                    result.mean_hypothesis, result.mean_log_prob = mean.text, mean.mean_log_prob
                timing = {"batch": len(batch), "sampled_pass_s": sampled_s, "mean_pass_s": mean_s}
                for row in _sample_prefix_records(batch, mc, lora_points, sizes, timing):
                    handle.write(json.dumps({"domain": domain, **row}, ensure_ascii=False) + "\n")
                handle.flush()
    summarise(records_path, sizes, out)


def _error_rate(rows, key) -> float:
    counts = []
    for row in rows:
        code = row["language"] or "und"
        ref, hyp = normalize_text(row["reference"], code), normalize_text(key(row), code)
        counts.append(utterance_error_counts([ref], [hyp], scoring_unit(code, [ref]))[0])
    errors, length = sum(c.errors for c in counts), sum(c.reference_length for c in counts)
    return errors / length


def summarise(records_path: Path, sizes: list[int], out: Path) -> dict:
    rows = [json.loads(line) for line in records_path.open()]
    have_lora = all(row["lora"] is not None for row in rows)
    summary: dict = {"utterances": len(rows), "domains": {}, "error_rate": {}, "uncertainty": {}}
    methods = {"mean": lambda r: r["mean"], **{f"mbr@{s}": (lambda r, s=s: r["by_s"][str(s)]["mbr"]) for s in sizes}}
    if have_lora:
        methods["lora"] = lambda r: r["lora"]
    by_domain: dict[str, list] = {}
    for row in rows:
        by_domain.setdefault(row["domain"], []).append(row)
    for name, key in methods.items():
        summary["error_rate"][name] = {"all": _error_rate(rows, key), **{d: _error_rate(rs, key) for d, rs in by_domain.items()}}
    largest = sizes[-1]
    summary["seconds_per_utterance"] = {
        f"sampled_pass_S{largest}": sum(r["sampled_pass_s"] / r["batch"] for r in rows) / len(rows),
        "mean_pass": sum(r["mean_pass_s"] / r["batch"] for r in rows) / len(rows),
    }
    for size in [s for s in sizes if s > 1]:
        transcripts = [
            UtteranceTranscript(
                id=r["id"], source=None, language=r["language"], text=r["mean"], chooser="mean", num_samples=size,
                samples=r["samples"][:size], uncertainty=r["by_s"][str(size)]["disagreement"],
                mean_token_entropy=r["token_entropy"] if size == largest else 0.0,
                mean_log_prob=r["mean_log_prob"], words=word_confidences(r["mean"], r["samples"][:size], r["language"]),
                reference=r["reference"],
            )
            for r in rows
        ]
        extra = {"lora_neg_log_prob": [-r["lora_log_prob"] for r in rows]} if have_lora else {}
        report = evaluate_uncertainty(transcripts, extra_scores=extra)
        if size != largest:
            report.scores.pop("token_entropy")  # recorded for all S samples only
        summary["uncertainty"][f"S={size}"] = report.to_dict()
        if size == largest:
            plot_report(report, out, prefix=f"S{size}-")
    if have_lora:
        lora_transcripts = [
            UtteranceTranscript(
                id=r["id"], source=None, language=r["language"], text=r["lora"], chooser="lora", num_samples=1,
                samples=[r["lora"]], uncertainty=-r["lora_log_prob"], mean_token_entropy=0.0, mean_log_prob=r["lora_log_prob"],
                words=word_confidences(r["lora"], [r["lora"]], r["language"]), reference=r["reference"],
            )
            for r in rows
        ]
        lora_report = evaluate_uncertainty(lora_transcripts)
        # LoRA's confidence judged on LoRA's own errors (its transcript carries LoRA's log-probability).
        own = asdict(lora_report.scores["mean_model_neg_log_prob"])
        summary["uncertainty"]["lora_own_errors"] = {"error_rate": lora_report.error_rate, "lora_neg_log_prob": own}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    print(json.dumps({k: summary[k] for k in ("utterances", "error_rate", "seconds_per_utterance")}, indent=2, ensure_ascii=False))
    return summary


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
    parser.add_argument("--lora-steps", type=int, default=0, help="steps of the plain LoRA baseline (0: no LoRA baseline)")
    parser.add_argument("--train-only", action="store_true", help="stop after phase 1")
    parser.add_argument("--posterior", help="evaluate this posterior (or blora run) folder instead of the one in --train-dir")
    parser.add_argument("--lora", help="LoRA baseline: a lora run folder, a peft adapter folder, or safetensors of adapter sites")
    parser.add_argument("--domains", nargs="*", help="testbed domains (default: all)")
    parser.add_argument("--clips-per-domain", type=int, default=8)
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 4, 8, 16], help="values of S")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=96, help="cap on generated tokens (stops repetition loops)")
    parser.add_argument("--out", help="evaluation output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.train_dir:
        train_adapters(args)
    if args.train_only:
        return
    if not args.out or not (args.posterior or args.train_dir):
        parser.error("evaluation needs --out and --posterior (or --train-dir)")
    evaluate(args)


if __name__ == "__main__":
    main()
