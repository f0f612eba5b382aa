"""Monte Carlo uncertainty of a trained BLoRA posterior against the baseline LoRA, on the testbed's test splits.

It trains nothing: ``--posterior`` is a finished ``pyro-blora train --method blora`` run (or its
posterior folder) and ``--lora`` a finished ``pyro-blora train --method lora`` run on the same base
and adapters, the LoRA of every other table. Temperatures of the posterior mean and of LoRA are
fitted on ``--dev-clips`` dev utterances per domain (never on test). The work is done by
:mod:`pyro_blora.evaluation.payoff`; records go to ``<out>/utterances.jsonl`` (a killed run continues where it
stopped), the summary to ``<out>/summary.json`` and the plots next to it.

Example (real base model)::

    python scripts/evaluate_uncertainty.py --testbed testbed --model base --posterior runs/blora \
        --lora runs/lora --clips-per-domain 50 --dev-clips 50 --samples 1 4 8 16 --out runs/unc
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pyro_blora import UncertaintyReport, load_posterior, load_whisper
from pyro_blora.training.methods import load_training_data
from pyro_blora.predict.confidence import TemperatureFit
from pyro_blora.evaluation.payoff import (
    PayoffOptions,
    decode_payoff_records,
    fit_model_temperatures,
    lora_run_values,
    summarise_payoff,
    write_records,
)
from pyro_blora.predict.transcribe import collect_utterances
from pyro_blora.report.plots import write_uncertainty_plots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--testbed", required=True, help="testbed folder (pyro-blora testbed --out ...)")
    parser.add_argument("--model", default="base", help="base Whisper of both runs: bundled name, folder or hub id")
    parser.add_argument("--posterior", required=True, help="a finished blora run folder, or its posterior/ folder")
    parser.add_argument("--lora", help="a finished lora run folder (pyro-blora train --method lora); omit for no baseline")
    parser.add_argument("--domains", nargs="*", help="testbed domains (default: all)")
    parser.add_argument("--clips-per-domain", type=int, default=50, help="test utterances per domain")
    parser.add_argument("--dev-clips", type=int, default=50, help="dev utterances per domain for the temperatures "
                        "(0: no temperature scaling)")
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 4, 8, 16], help="values of S")
    parser.add_argument("--posterior-temperature", type=float, default=1.0, help="scale of the posterior std when sampling")
    parser.add_argument("--widest-sites", type=int, help="sample only the N adapter sites of largest posterior variance")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=96, help="cap on generated tokens (stops repetition loops)")
    parser.add_argument("--bootstrap-samples", type=int, default=2000)
    parser.add_argument("--out", required=True, help="evaluation output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    options = PayoffOptions(samples=tuple(args.samples), posterior_temperature=args.posterior_temperature,
                            widest_sites=args.widest_sites, batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    posterior = Path(args.posterior)
    posterior = posterior / "posterior" if (posterior / "posterior").is_dir() else posterior
    whisper, processor = load_whisper(args.model)
    model, guide = load_posterior(posterior, whisper)
    lora = lora_run_values(args.lora, model) if args.lora else None
    testbed = Path(args.testbed)
    domains = args.domains or sorted(p.name for p in testbed.iterdir() if (p / "dataset_dict.json").exists())

    fits_path = out / "temperatures.json"
    if fits_path.exists():
        fits = {k: TemperatureFit(**v) for k, v in json.loads(fits_path.read_text()).items()}
    elif args.dev_clips:
        dev = [load_training_data(testbed / d, processor, split="dev", cache_dir=out / "cache", limit=args.dev_clips)
               for d in domains]
        fits = fit_model_temperatures(model, {"mean": guide.means(), **({"lora": lora} if lora else {})}, dev)
        fits_path.write_text(json.dumps({k: vars(v) for k, v in fits.items()}, indent=2))
    else:
        fits = {}

    records = out / "utterances.jsonl"
    done = {json.loads(line)["id"] for line in records.open()} if records.exists() else set()
    for domain in domains:
        utterances = [u for u in collect_utterances(testbed / domain, split="test", limit=args.clips_per_domain)
                      if u.id not in done]
        rows = decode_payoff_records(model, guide, processor, utterances, options, lora,
                                     {k: v.temperature for k, v in fits.items()})
        write_records(rows, records, {"domain": domain})
    rows = [json.loads(line) for line in records.open()]
    summary = summarise_payoff(rows, options, fits, bootstrap_samples=args.bootstrap_samples)
    largest = options.samples[-1]
    write_uncertainty_plots(UncertaintyReport.from_dict(summary["uncertainty"][f"S={largest}"]), out, prefix=f"S{largest}-")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    print(json.dumps({k: summary[k] for k in ("utterances", "error_rate", "against_mean")}, indent=2))


if __name__ == "__main__":
    main()
