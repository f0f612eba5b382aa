r"""Paired bootstrap differences of evaluated runs against a reference run, per domain and metric.

    python scripts/paired_differences.py --base base/eval.json --against runs/lora/eval.json \
        runs/blora/eval.json runs/map/eval.json --domain zh-en:error_rate --domain en:error_rate

Every eval file must hold per-utterance records (``pyro-blora evaluate`` writes them). Prints, for each
run, run − reference with its 95% interval over utterances, and the share of the reference's English
degradation against the base model that the run avoids (degradation reduction). A thin wrapper over
:mod:`pyro_blora.metrics.bootstrap`; ``pyro-blora report`` shows the same intervals for whole run folders.
"""

from __future__ import annotations

import argparse
import json

from pyro_blora.metrics.bootstrap import bootstrap_evals, compare_evals, degradation_reduction

DEFAULT_PAIRS = ("zh-en:error_rate", "en:error_rate", "en:ce", "en:language_id", "backward-es:error_rate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="eval.json files of the compared runs")
    parser.add_argument("--against", required=True, help="eval.json of the reference run (e.g. LoRA)")
    parser.add_argument("--base", required=True, help="eval.json of the base model")
    parser.add_argument("--domain", action="append", help=f"domain:metric pairs (default {', '.join(DEFAULT_PAIRS)})")
    parser.add_argument("--degradation-domain", default="en", help="backward domain of the degradation reduction")
    parser.add_argument("--samples", type=int, default=2000)
    args = parser.parse_args()

    def read(path: str) -> dict:
        with open(path) as handle:
            return json.load(handle)

    base, reference = read(args.base), read(args.against)
    for path in args.runs:
        run = read(path)
        for pair in args.domain or DEFAULT_PAIRS:
            domain, _, metric = pair.partition(":")
            interval = compare_evals(reference, run, domain, metric, samples=args.samples)
            print(f"{path} − {args.against}  {domain} {metric}: {interval.estimate:+.4f} "
                  f"[{interval.low:+.4f}, {interval.high:+.4f}]")
        interval = bootstrap_evals([[base], [reference], [run]], [args.degradation_domain], "error_rate",
                                   degradation_reduction, samples=args.samples)
        print(f"{path}  degradation reduction ({args.degradation_domain} error): {interval.estimate:.3f} "
              f"[{interval.low:.3f}, {interval.high:.3f}]")


if __name__ == "__main__":
    main()
