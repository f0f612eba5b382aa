r"""How many retention utterances a forgetting budget needs: the width of its upper bound per size.

    python scripts/budget_variance.py RUN --retain testbed/en --retain-split dev \
        --sizes 16,32,64,128,256 --out budget/variance

For a finished run (its update scaled by ``--scale``, e.g. to where its change is near the budget) against
its base model, on the first N utterances of the retention set for each N
of ``--sizes``: the relative change of the transcript-token CE, its one-sided upper bound at
``--confidence`` (the estimator the budget uses, ``pyro_blora.training.budget_bound``), the bound's width
(upper - estimate), the spread of the estimate over disjoint sets of N utterances (an empirical check of
the bound's standard error) and the seconds one measurement of N utterances takes (the median of
``--repeats``), in ``--precision`` (the base model's losses too). The smallest N whose width is at most
``--tight`` of the budget is the size the budget can rely on. Writes ``variance.json`` and ``variance.md``
into ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from pyro_blora.checkpoint import atomic_write_json
from pyro_blora.config import PRECISIONS, RetentionBudget
from pyro_blora.experiments.budget_frontier import scaled_run
from pyro_blora.markdown import markdown_table
from pyro_blora.metrics.retention_bound import ratio_upper_bound
from pyro_blora.runs import is_run_folder, load_run_model
from pyro_blora.training.budget_bound import retention_losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished run folder")
    parser.add_argument("--retain", required=True, help="retention data (e.g. testbed/en)")
    parser.add_argument("--retain-split", default="dev")
    parser.add_argument("--sizes", default="16,32,64,128,256", help="comma-separated numbers of utterances")
    parser.add_argument("--confidence", type=float, default=RetentionBudget.confidence)
    parser.add_argument("--budget", type=float, default=0.03, help="the relative budget the width is judged against")
    parser.add_argument("--tight", type=float, default=0.5, help="a width of at most this share of the budget is tight")
    parser.add_argument("--scale", type=float, default=1.0, help="λ: the run's update scaled by it (1: the run as trained)")
    parser.add_argument("--repeats", type=int, default=3, help="timed measurements per size (0: none)")
    parser.add_argument("--precision", choices=PRECISIONS, default=RetentionBudget.precision,
                        help="precision of every measurement (RetentionBudget.precision)")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    try:
        sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        parser.error(f"--sizes takes comma-separated integers, got {args.sizes!r}")
    if args.repeats < 0 or args.scale < 0:
        parser.error("--repeats and --scale must be >= 0")
    if not sizes or sizes[0] < 2:
        parser.error("every size must be at least 2 utterances (a bound needs a variance)")
    if not is_run_folder(args.run):
        parser.error(f"{args.run} is not a run folder (one written by `pyro-blora train`)")
    try:
        report = measure(args, sizes)
    except KeyError as error:  # a split the retention set lacks: one line naming the splits it has
        parser.error(f"{error.args[0]}; pass one of them with --retain-split")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "variance.json", report)
    (out / "variance.md").write_text(page(report))
    print(page(report))


def measure(args, sizes: list[int]) -> dict:
    """Per-utterance losses of the run and its base on max(sizes) utterances, then each size's bound
    (its first N) and the time of one measurement of N."""
    whisper, processor, description = load_run_model(args.run)
    run = scaled_run(args.run, whisper, processor, args.retain, max(sizes), args.retain_split, args.cache_dir,
                     args.precision)
    available = len(run.retention)
    losses = run.losses(args.scale)
    rows = []
    for n in [s for s in sizes if s <= available] or [available]:
        bound = ratio_upper_bound(losses.ce_sum[:n], run.base.ce_sum[:n], args.confidence)
        groups = [range(i, i + n) for i in range(0, available - n + 1, n)]
        estimates = [sum(losses.ce_sum[i] for i in g) / sum(run.base.ce_sum[i] for i in g) - 1 for g in groups]
        batches = _first(run.retention.batches, n)
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            retention_losses(whisper, batches, args.precision)
            seconds.append(time.perf_counter() - start)
        width = bound.upper - bound.estimate
        rows.append({"utterances": n, "change": bound.estimate - 1, "upper": bound.upper - 1, "width": width,
                     "standard_error": bound.standard_error, "disjoint_sets": len(groups),
                     "spread_of_estimate": statistics.stdev(estimates) if len(estimates) > 1 else None,
                     "seconds_per_measurement": statistics.median(seconds) if seconds else None,
                     "tight": width <= args.tight * args.budget})
    chosen = next((r["utterances"] for r in rows if r["tight"]), None)
    return {"run": str(args.run), "scale": args.scale, "precision": args.precision, "model": description,
            "retention": run.retention.describe(),
            "available": available, "confidence": args.confidence, "budget": args.budget, "tight": args.tight,
            "sizes": rows, "smallest_tight": chosen}


def _first(batches: list[dict], n: int) -> list[dict]:
    """The first ``n`` utterances of the retention batches (whole batches, the last one cut)."""
    out, left = [], n
    for batch in batches:
        if left <= 0:
            break
        rows = int(batch["labels"].shape[0])
        out.append(batch if rows <= left else {k: (v[:left] if hasattr(v, "shape") or isinstance(v, list) else v)
                                               for k, v in batch.items()})
        left -= rows
    return out


def page(report: dict) -> str:
    conf = f"{100 * report['confidence']:g}%"
    rows = [{"N": r["utterances"], "CE change": f"{100 * r['change']:+.2f}%",
             f"{conf} upper bound": f"{100 * r['upper']:+.2f}%", "width": f"{100 * r['width']:.2f} points",
             "spread over disjoint sets (sd)": "-" if r["spread_of_estimate"] is None
             else f"{100 * r['spread_of_estimate']:.2f} points ({r['disjoint_sets']} sets)",
             "standard error": f"{100 * r['standard_error']:.2f} points",
             "seconds / measurement": "-" if r["seconds_per_measurement"] is None
             else f"{r['seconds_per_measurement']:.2f}"} for r in report["sizes"]]
    smallest = report["smallest_tight"]
    verdict = (f"The smallest N whose bound is at most {100 * report['tight']:g}% of a {100 * report['budget']:g}% "
               f"budget wide: {smallest if smallest is not None else 'none of these'}.")
    precision = report.get("precision", "fp32")
    return "\n".join([f"# Retention bound width per size: {report['run']} × {report.get('scale', 1.0):g}"
                      + ("" if precision == "fp32" else f", {precision}"), "",
                      f"{report['retention']['source']} ({report['retention']['split']}), {report['available']} "
                      "utterances available; the run against its base model, paired per utterance.", "",
                      markdown_table(rows), "", verdict, ""])


if __name__ == "__main__":
    main()
