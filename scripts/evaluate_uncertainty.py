r"""Monte Carlo uncertainty of a trained BLoRA posterior against the baseline LoRA, on the testbed's test splits.

A command-line wrapper of :func:`pyro_blora.experiments.uncertainty.uncertainty_study`. ``--posterior`` is a
finished ``pyro-blora train --method blora`` run (or its posterior folder); ``--lora`` a finished
``pyro-blora train --method lora`` run on the same base and adapters, the LoRA of every other table.
With ``--train-lora`` that run is trained first (into ``--lora``, default ``<out>/lora-run``) by
``run_training("lora")`` on the BLoRA run's base model, data, adapters and training options
(:func:`~pyro_blora.experiments.uncertainty.train_matching_lora`). Temperatures of the posterior mean and of
LoRA are fitted on ``--dev-clips`` dev utterances per domain (never on test). Records go to
``<out>/utterances.jsonl`` (a killed run continues where it stopped), the summary to
``<out>/summary.json`` and the plots next to it. ``--baselines beam,temperature`` also decodes the
posterior mean with S beams and with S samples at ``--sample-temperature``, MBR over the latter, each
against MBR over S posterior draws (``against_posterior_mbr``; :mod:`pyro_blora.predict.baselines`).

Example (real base model)::

    python scripts/evaluate_uncertainty.py --testbed testbed --posterior runs/blora \
        --lora runs/lora --clips-per-domain 50 --dev-clips 50 --samples 1 4 8 16 --out runs/unc \
        --baselines beam,temperature --sample-temperature 1.0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pyro_blora.evaluation.payoff import PayoffOptions
from pyro_blora.experiments.uncertainty import LORA_RUN, uncertainty_study

DEFAULTS = PayoffOptions()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--testbed", required=True, help="testbed folder (pyro-blora testbed --out ...)")
    parser.add_argument("--model", help="base Whisper (default: the one the posterior records)")
    parser.add_argument("--posterior", required=True, help="a finished blora run folder, or its posterior/ folder")
    parser.add_argument("--lora", help="a finished lora run folder (pyro-blora train --method lora); omit for no baseline")
    parser.add_argument("--train-lora", action="store_true", help="train the LoRA baseline into --lora "
                        f"(default <out>/{LORA_RUN}) to match the blora run, unless it is finished there")
    parser.add_argument("--domains", nargs="*", help="testbed domains (default: all)")
    parser.add_argument("--clips-per-domain", type=int, default=50, help="test utterances per domain")
    parser.add_argument("--dev-clips", type=int, default=50, help="dev utterances per domain for the temperatures "
                        "(0: no temperature scaling)")
    parser.add_argument("--samples", type=int, nargs="+", default=list(DEFAULTS.samples), help="values of S")
    parser.add_argument("--posterior-temperature", type=float, default=DEFAULTS.posterior_temperature,
                        help="scale of the posterior std when sampling")
    parser.add_argument("--widest-sites", type=int, help="sample only the N adapter sites of largest posterior variance")
    parser.add_argument("--entropy-alpha", type=float, default=DEFAULTS.entropy_alpha,
                        help="Tsallis alpha of the word entropy confidence (1: Gibbs entropy)")
    parser.add_argument("--baselines", default=",".join(DEFAULTS.baselines),
                        help="comma-separated decoders of the posterior mean at the same S passes: beam (S beams), "
                        "temperature (MBR over S samples); default none")
    parser.add_argument("--sample-temperature", type=float, default=DEFAULTS.sample_temperature,
                        help="temperature of the 'temperature' baseline's samples (1: the mean model's own distribution)")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens,
                        help="cap on generated tokens (stops repetition loops)")
    parser.add_argument("--bootstrap-samples", type=int, default=2000)
    parser.add_argument("--out", required=True, help="evaluation output folder")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
    args = parser.parse_args()

    options = PayoffOptions(samples=tuple(args.samples), posterior_temperature=args.posterior_temperature,
                            widest_sites=args.widest_sites, entropy_alpha=args.entropy_alpha, batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens, seed=args.seed, baselines=args.baselines,
                            sample_temperature=args.sample_temperature)
    summary = uncertainty_study(args.testbed, args.posterior, Path(args.out), options, lora=args.lora,
                                train_lora=args.train_lora, model=args.model, domains=args.domains,
                                clips_per_domain=args.clips_per_domain, dev_clips=args.dev_clips,
                                bootstrap_samples=args.bootstrap_samples)
    print(json.dumps({k: summary[k] for k in ("utterances", "error_rate", "against_mean", "against_posterior_mbr")}, indent=2))


if __name__ == "__main__":
    main()
