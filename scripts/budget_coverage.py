r"""Coverage of the forgetting budget's bound: how often a budgeted model stays inside its budget on
speech the budget never saw.

    python scripts/budget_coverage.py coverage --base faithful/base-eval.json --domain en --in-domain zh-en

DIR holds one folder per budgeted model, named ``<arm>-b<budget>-s<seed>`` (``lora-es-b0.05-s0``), each
with the ``eval.json`` of its test sets: a run folder trained with ``--retain-budget`` (its
``result.json`` says what the run kept and held), or the ``--out`` folder of ``pyro-blora evaluate
--retain-budget`` on an unbudgeted run (post-hoc λ; the eval file says what it held). A model covers when
its test CE on ``--domain`` is at most (1 + budget) times the base model's (``--base``, an eval of the
same test set). Writes ``coverage.md``, ``coverage.json`` and ``coverage.png`` into ``--out``:

- coverage per arm and budget and pooled, with Clopper-Pearson intervals;
- per run, the bound it held on its retention set against the change on test;
- with ``--in-domain``, each arm's in-domain error and test CE minus those of ``--reference`` at the
  same budget, paired over utterances and pooled over the seeds both have (bootstrap);
- the budget estimate's overhead (share of training time) per trained arm.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from matplotlib.figure import Figure

from pyro_blora.checkpoint import atomic_write_json, atomic_write_text
from pyro_blora.markdown import markdown_table
from pyro_blora.metrics.bootstrap import bootstrap_evals, difference
from pyro_blora.metrics.retention_bound import coverage_interval
from pyro_blora.report.plots import save_figure

FOLDER = re.compile(r"^(?P<arm>.+)-b(?P<budget>\d+(?:\.\d+)?)-s(?P<seed>\d+)$")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="folder of <arm>-b<budget>-s<seed> folders, each with eval.json")
    parser.add_argument("--base", type=Path, required=True, help="the base model's eval.json on the same test set")
    parser.add_argument("--domain", default="en", help="the kept domain coverage is judged on")
    parser.add_argument("--in-domain", help="the adapted domain of the in-domain table (e.g. zh-en)")
    parser.add_argument("--reference", default="lora-posthoc", help="the arm the in-domain table subtracts")
    parser.add_argument("--out", type=Path, help="where the page goes (default ROOT/coverage)")
    args = parser.parse_args()
    base = json.loads(args.base.read_text())["results"]
    if args.domain not in base:
        raise SystemExit(f"{args.base} has no domain {args.domain!r}; it has {sorted(base)}: give --domain")
    models = collect(args.root, base[args.domain]["ce"], args.domain)
    if not models:
        raise SystemExit(f"{args.root} holds no <arm>-b<budget>-s<seed> folder with an eval.json yet")
    out = args.out or args.root / "coverage"
    out.mkdir(parents=True, exist_ok=True)
    report = {"domain": args.domain, "base_ce": base[args.domain]["ce"], "models": [_public(m) for m in models],
              "coverage": coverage_rows(models)}
    if args.in_domain:
        report["in_domain"] = in_domain_rows(models, args.in_domain, args.domain, args.reference)
    report["overhead"] = overhead_rows(models)
    atomic_write_json(out / "coverage.json", report)
    save_figure(plot(models, args.domain), out / "coverage.png")
    page = render(report)
    atomic_write_text(out / "coverage.md", page)
    print(page)


def collect(root: Path, base_ce: float, domain: str) -> list[dict]:
    """One record per budgeted model: its arm, budget, seed, the bound it held and its change on test."""
    models = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        name, evaluation = FOLDER.match(folder.name), folder / "eval.json"
        if name is None or not evaluation.is_file():
            continue
        evaluated = json.loads(evaluation.read_text())
        result = folder / "result.json"
        held = json.loads(result.read_text())["budget"] if result.is_file() else evaluated.get("retention_budget")
        if held is None:
            raise SystemExit(f"{folder} is neither a budgeted run nor a post-hoc budget evaluation")
        budget = float(name["budget"])
        if abs(held["budget"]["budget"] - budget) > 1e-9:
            raise SystemExit(f"{folder}: its name says budget {budget} but it held {held['budget']['budget']}")
        tested = evaluated["results"][domain]
        change = tested["ce"] / base_ce - 1
        models.append({"arm": name["arm"], "budget": budget, "seed": int(name["seed"]), "folder": folder.name,
                       "evaluation": evaluated, "test_change": change, "covered": change <= budget,
                       "language_id": tested.get("language_id"),
                       "held_change": held.get("retain_change"), "held_upper": held.get("retain_change_upper"),
                       "utterances": held.get("utterances"), "met": held.get("met", True),
                       "kept": held.get("kept", "post-hoc"), "scale": held.get("scale"),
                       "overhead": _overhead(held), "final_beta": held.get("final_beta")})
    return models


def _overhead(held: dict) -> float | None:
    """The run's estimate overhead, or None where it is not the run's: a run resumed after its last step
    (before overheads spanned resumes) recorded only its final search over a training loop of no steps."""
    if held.get("measurements") and held.get("search_seconds") is not None \
            and held["estimate_seconds"] - held["search_seconds"] <= 0:
        return None
    return held.get("overhead")


def _public(model: dict) -> dict:
    return {k: v for k, v in model.items() if k != "evaluation"}


def _share(covered: int, runs: int) -> dict:
    low, high = coverage_interval(covered, runs)
    return {"covered": covered, "runs": runs, "share": covered / runs, "low": low, "high": high}


def coverage_rows(models: list[dict]) -> list[dict]:
    groups: dict[tuple[str, float], list[dict]] = {}
    for m in sorted(models, key=lambda m: m["seed"]):  # each group's lists run seed by seed
        groups.setdefault((m["arm"], m["budget"]), []).append(m)
    rows = [{"arm": arm, "budget": budget, **_share(sum(m["covered"] for m in group), len(group)),
             "test_changes": [round(m["test_change"], 4) for m in group],
             "held_uppers": [None if m["held_upper"] is None else round(m["held_upper"], 4) for m in group],
             "kept": [_kept(m) for m in group], "language_ids": [m["language_id"] for m in group]}
            for (arm, budget), group in sorted(groups.items())]
    rows.append({"arm": "pooled", "budget": None, **_share(sum(m["covered"] for m in models), len(models))})
    return rows


def in_domain_rows(models: list[dict], in_domain: str, kept: str, reference: str) -> list[dict]:
    """Each arm minus ``reference`` at the same budget, over the seeds both have."""
    by_key = {(m["arm"], m["budget"], m["seed"]): m for m in models}
    rows = []
    for arm, budget in sorted({(m["arm"], m["budget"]) for m in models if m["arm"] != reference}):
        seeds = sorted(s for (a, b, s) in by_key if a == arm and b == budget and (reference, budget, s) in by_key)
        if not seeds:
            continue
        pair = [[by_key[(reference, budget, s)]["evaluation"] for s in seeds],
                [by_key[(arm, budget, s)]["evaluation"] for s in seeds]]
        row = {"arm": arm, "budget": budget, "seeds": seeds}
        for label, domain, metric in (("in_domain_error", in_domain, "error_rate"), ("kept_ce", kept, "ce")):
            found = bootstrap_evals(pair, [domain], metric, difference)
            row[label] = {"difference": found.estimate, "low": found.low, "high": found.high}
        rows.append(row)
    return rows


def _kept(model: dict) -> str:
    """What a model kept, in a few characters: its update's scale, and the final beta of a budgeted-beta run."""
    parts = [] if model["scale"] in (None, 1.0) else [f"×{model['scale']:.3g}"]
    if model["final_beta"] is not None:
        parts.append(f"β {model['final_beta']:.2g}")
    if model["kept"] == "checkpoint":
        parts.append("checkpoint")
    return " ".join(parts) or "×1"


def overhead_rows(models: list[dict]) -> list[dict]:
    rows = []
    for arm in sorted({m["arm"] for m in models}):
        shares = [m["overhead"] for m in models if m["arm"] == arm and m["overhead"] is not None]
        if shares:
            rows.append({"arm": arm, "runs": len(shares), "median": statistics.median(shares),
                         "min": min(shares), "max": max(shares)})
    return rows


def _pct(value: float | None, signed: bool = True) -> str:
    return "-" if value is None else (f"{100 * value:+.1f}%" if signed else f"{100 * value:.0f}%")


def render(report: dict) -> str:
    lines = [f"Coverage on `{report['domain']}` (base CE {report['base_ce']:.4f}): a model covers when its test CE "
             "is at most (1 + budget) times the base model's. Intervals: Clopper-Pearson 95%.", ""]
    lines.append(markdown_table([
        {"arm": r["arm"], "budget": "all" if r["budget"] is None else _pct(r["budget"], False),
         "covered": f"{r['covered']} of {r['runs']}",
         "share [95%]": f"{_pct(r['share'], False)} [{_pct(r['low'], False)}, {_pct(r['high'], False)}]",
         "test change per seed": ", ".join(_pct(c) for c in r.get("test_changes", [])) or "-",
         "bound held per seed": ", ".join(_pct(c) for c in r.get("held_uppers", [])) or "-",
         "kept per seed": ", ".join(r.get("kept", [])) or "-",
         **({"language ID per seed": ", ".join("-" if v is None else f"{100 * v:.1f}%" for v in r.get("language_ids", []))
                or "-"}
            if any(v is not None for c in report["coverage"] for v in c.get("language_ids", [])) else {})}
        for r in report["coverage"]]))
    if report.get("in_domain"):
        lines += ["", "Against the reference arm at the same budget, paired over utterances, seeds pooled "
                      "(error rate in points, CE in nats per token):", ""]

        def interval(found: dict, scale: float, digits: int) -> str:
            return (f"{scale * found['difference']:+.{digits}f} [{scale * found['low']:+.{digits}f}, "
                    f"{scale * found['high']:+.{digits}f}]")
        lines.append(markdown_table([
            {"arm": r["arm"], "budget": _pct(r["budget"], False), "seeds": ", ".join(map(str, r["seeds"])),
             "in-domain error": interval(r["in_domain_error"], 100, 1), "kept-domain CE": interval(r["kept_ce"], 1, 3)}
            for r in report["in_domain"]]))
    if report["overhead"]:
        lines += ["", "The budget estimate's time over training time:", ""]
        lines.append(markdown_table([{"arm": r["arm"], "runs": r["runs"], "median": _pct(r["median"], False),
                                      "range": f"{_pct(r['min'], False)}-{_pct(r['max'], False)}"}
                                     for r in report["overhead"]]))
    return "\n".join(lines) + "\n"


def plot(models: list[dict], domain: str) -> Figure:
    """The bound each model held on its retention set against its change on the test set."""
    figure = Figure(figsize=(6.5, 5))
    axes = figure.subplots()
    markers = dict(zip(sorted({m["budget"] for m in models}), "os^Dv"))
    colours = {arm: f"C{i}" for i, arm in enumerate(sorted({m["arm"] for m in models}))}
    for m in models:
        axes.scatter(100 * (m["held_upper"] if m["held_upper"] is not None else float("nan")),
                     100 * m["test_change"], marker=markers[m["budget"]], color=colours[m["arm"]],
                     facecolors=colours[m["arm"]] if m["covered"] else "none", s=45)
    for budget in markers:
        axes.axhline(100 * budget, color="grey", lw=0.8, ls="--")
    limits = axes.get_xlim()
    axes.plot(limits, limits, color="black", lw=0.6)
    for arm, colour in colours.items():
        axes.scatter([], [], color=colour, label=arm)
    for budget, marker in markers.items():
        axes.scatter([], [], marker=marker, color="grey", label=f"budget {_pct(budget, False)}")
    axes.set_xlabel("bound held on the retention set (change of CE, %)")
    axes.set_ylabel(f"change of {domain} test CE (%)")
    axes.set_title("Budget coverage (hollow: outside its budget on test)")
    axes.legend(fontsize=7)
    return figure


if __name__ == "__main__":
    main()
