r"""The converged-posterior study's pages: convergence plots and tables, and seed-pooled paired differences.

    # sigma trajectories, sigma/sigma* histograms and the convergence table of finished blora runs
    python scripts/posterior_study.py convergence runs/blora-x1 runs/blora-x30 --out results/posterior/convergence

    # sigma* of one run under its own, "token" and "dataset" weighting of the same curvature
    python scripts/posterior_study.py weightings runs/blora-x30

    # b − a, seeds paired position by position and pooled (utterance of one seed = resampled unit)
    python scripts/posterior_study.py compare --a map-s0/eval.json map-s1/eval.json \
        --b blora-s0/eval.json blora-s1/eval.json --pair en:ce --pair zh-en:error_rate

    # question (a) as frontiers: in-domain error against kept-domain CE, one panel per kept domain
    python scripts/posterior_study.py frontier results/posterior/frontier.json --out results/posterior/frontier.png

Thin wrappers over :mod:`pyro_blora.report.convergence_plots`, :mod:`pyro_blora.metrics.bootstrap`
and the run folder readers; every number comes from committed files.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

from pyro_blora.checkpoint import atomic_write_text
from pyro_blora.metrics.bootstrap import bootstrap_evals, difference
from pyro_blora.report.convergence_plots import plot_scale_trajectories, plot_sigma_over_optimum
from pyro_blora.report.plots import save_figure
from pyro_blora.report.tables import markdown_table
from pyro_blora.runs import read_log, read_result

COLUMNS = ("run", "converged", "median σ/σ*", "p90 |log σ/σ*|", "within 1.5×", "KL change, last fifth",
           "KL at the end: means / scales", "pinned by data")


def kl_parts(run: Path) -> tuple[float, float]:
    """The final KL term split into its mean part, β Σ_m Σ μ²/(2σp² P_m), and its scale part (the rest),
    from the saved posterior; the run's prior is the default N(0, σp) (no prior.safetensors)."""
    import torch
    from safetensors.torch import load_file

    from pyro_blora.posterior import read_posterior_config

    folder = run / "posterior"
    info = read_posterior_config(folder)
    if (folder / "prior.safetensors").exists():
        raise SystemExit(f"{run} has a non-default prior; the KL split assumes N(0, sigma_p)")
    config, scaling = info["blora_config"], info["elbo_scaling"]
    state = load_file(str(folder / "posterior.safetensors"))
    sigma_p, means, scales = config["prior_scale"], 0.0, 0.0
    for key, loc in state.items():
        if not key.startswith("locs."):
            continue
        raw = state["scales." + key[len("locs."):]].double()
        sigma = raw.exp() if config["scale_parameterization"] == "exp" else torch.nn.functional.softplus(raw)
        weight = scaling["kl"] / (loc.numel() if scaling["per_matrix"] else 1)
        means += weight * float((loc.double() ** 2).sum()) / (2 * sigma_p**2)
        scales += weight * float((torch.log(sigma_p / sigma) + sigma**2 / (2 * sigma_p**2) - 0.5).sum())
    return means, scales


def convergence(runs: list[Path], out: Path) -> str:
    logs = {run.name: read_log(run) for run in runs}
    summaries = {run.name: (read_result(run) or {}).get("posterior") for run in runs}
    missing = [name for name, summary in summaries.items() if not summary]
    if missing:
        raise SystemExit(f"no convergence summary in result.json of {', '.join(missing)}: train with curvature_batches > 0")
    save_figure(plot_scale_trajectories(logs, prior_scale=0.01), out / "trajectories.png")
    save_figure(plot_sigma_over_optimum(summaries), out / "optimum.png")
    rows = [{"run": run.name, "converged": s["converged"], "median σ/σ*": f"{s['sigma_vs_optimum/median_ratio']:.3f}",
             "p90 |log σ/σ*|": f"{s['sigma_vs_optimum/p90_abs_log_ratio']:.3f}",
             "within 1.5×": f"{100 * s['sigma_vs_optimum/share_within']:.1f}%",
             "KL change, last fifth": "–" if s["kl_change_last_fifth"] is None else f"{100 * s['kl_change_last_fifth']:.1f}%",
             "KL at the end: means / scales": "{:.2f} / {:.2f}".format(*kl_parts(run)),
             "pinned by data": f"{s['pinned_by_data']['all']} of {s['entries']}"}
            for run, s in zip(runs, summaries.values())]
    pinned = {name: {k: v for k, v in s["pinned_by_data"].items() if v} for name, s in summaries.items()}
    page = "\n".join(["# Posterior convergence", "", f"Rule: {next(iter(summaries.values()))['rule']}.", "",
                      markdown_table(rows, COLUMNS), "", "Pinned entries by group and layer kind (non-zero only):", "",
                      *(f"- {name}: {json.dumps(counts)}" for name, counts in pinned.items()), "",
                      "![trajectories](trajectories.png)", "", "![sigma over sigma*](optimum.png)", ""])
    atomic_write_text(out / "convergence.md", page)
    return page


def weightings(run: Path, batches: int) -> str:
    """sigma* of one finished blora run's posterior mean under three weightings of the same likelihood
    curvature: the run's own, "token" and "dataset" (the textbook ELBO) at the run's beta, and how
    many entries each lets the data pin (data precision above the prior's)."""
    import torch

    from pyro_blora.model.curvature import diagonal_fisher, optimal_scales
    from pyro_blora.model.objective import elbo_scaling
    from pyro_blora.metrics.scales import scale_quantiles
    from pyro_blora.training.convergence import pinned_by_data, run_curvature, site_prior_scales

    measured = run_curvature(run, batches)
    model, data, tokens = measured.model, measured.data, measured.tokens
    fisher = diagonal_fisher(model, measured.guide.means(), measured.batches, generator=torch.Generator().manual_seed(0))
    priors = site_prior_scales(model)
    lines = [f"{run.name}: {tokens} training tokens, curvature on {fisher.batches} batches ({fisher.tokens} tokens)"]
    for normalization in (model.config.kl_normalization, "token", "dataset"):
        adapter = model.config.replace(kl_normalization=normalization)
        model.configure_objective(elbo_scaling(adapter, len(data.dataset), tokens, model.num_adapter_parameters()))
        sigma_star = optimal_scales(model, fisher.per_token, tokens)
        quantiles = scale_quantiles(sigma_star, (0.001, 0.01, 0.5), prefix="sigma*")
        lines.append(f"- {normalization}: pinned {pinned_by_data(sigma_star, priors)}; "
                     + ", ".join(f"{k} {v:.2e}" for k, v in quantiles.items()))
    return "\n".join(lines)


def compare(a: list[str], b: list[str], pairs: list[str]) -> str:
    if len(a) != len(b):
        raise SystemExit(f"--a and --b pair seed by seed: give as many files to each (got {len(a)} and {len(b)})")
    read = [[json.loads(Path(p).read_text()) for p in files] for files in (a, b)]
    lines = []
    for pair in pairs:
        domain, _, metric = pair.partition(":")
        found = bootstrap_evals(read, [domain], metric, difference)
        lines.append(f"{domain} {metric}: b − a = {found.estimate:+.4f} [{found.low:+.4f}, {found.high:+.4f}] "
                     f"({len(a)} seed pair{'s' if len(a) > 1 else ''})")
    return "\n".join(lines)


def frontier(spec_file: Path, out: Path) -> str:
    """Question (a) as frontiers. The spec (JSON, paths relative to it) names ``x`` (domain, metric) read
    from every point's ``synthetic`` file, ``panels`` (title, y (domain, metric), the point file key) and
    ``points`` (label, group, λ, files); a group's points at several λ are joined, λ ascending."""
    from matplotlib.figure import Figure

    spec = json.loads(spec_file.read_text())
    @functools.cache
    def read(name: str) -> dict:  # each evaluation file is read once, however many panels use it
        return json.loads((spec_file.parent / name).read_text())["results"]

    (x_domain, x_metric) = spec["x"]
    figure = Figure(figsize=(6 * len(spec["panels"]), 5))
    colours = {group: f"C{i}" for i, group in enumerate(dict.fromkeys(p["group"] for p in spec["points"]))}
    lines = []
    for position, panel in enumerate(spec["panels"], 1):
        axes = figure.add_subplot(1, len(spec["panels"]), position)
        (y_domain, y_metric), key = panel["y"], panel["file"]
        curves: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
        for point in spec["points"]:
            if key not in point["files"]:
                continue
            x = read(point["files"]["synthetic"])[x_domain].get(x_metric)
            y = read(point["files"][key])[y_domain].get(y_metric)
            if x is None or y is None:  # e.g. a CE-only evaluation on the error-rate axis
                continue
            curves.setdefault((point["group"], point.get("curve", point["label"])), []).append((point["scale"], x, y))
            lines.append(f"{panel['title']}: {point['label']} λ {point['scale']:g}: {x_domain} {x_metric} {x:.4f}, "
                         f"{y_domain} {y_metric} {y:.4f}")
        labelled = set()
        for (group, _), points in curves.items():
            points.sort()
            axes.plot([100 * p[1] for p in points], [p[2] for p in points], marker="o", markersize=5,
                      color=colours[group], linewidth=1.2, label=None if group in labelled else group)
            labelled.add(group)
            for scale, x, y in points:
                if scale != 1:
                    axes.annotate(f"{scale:g}", (100 * x, y), fontsize=7, color="dimgrey", xytext=(3, -9),
                                  textcoords="offset points")
        axes.set(xlabel=f"{x_domain} {x_metric.replace('_', ' ')} (%)", ylabel=f"{y_domain} {y_metric}",
                 title=panel["title"])
        if "xlim" in panel or "ylim" in panel:  # a zoom: say what falls outside it
            (x0, x1), (y0, y1) = panel.get("xlim", axes.get_xlim()), panel.get("ylim", axes.get_ylim())
            axes.set(xlim=(x0, x1), ylim=(y0, y1))
            outside: dict[float, set[float]] = {}
            for points in curves.values():
                for s, x, y in points:
                    if not (x0 <= 100 * x <= x1 and y0 <= y <= y1):
                        outside.setdefault(s, set()).add(round(y, 2))
            if outside:
                note = "; ".join(f"λ {s:g} (y {min(v):.2f}" + (f"-{max(v):.2f})" if len(v) > 1 else ")")
                                 for s, v in sorted(outside.items()))
                axes.set_xlabel(axes.get_xlabel() + f"\noff the panel: {note}", fontsize=8)
        axes.grid(True, linewidth=0.5, alpha=0.5)
        axes.legend(fontsize=8)
    figure.suptitle("Does the posterior matter for forgetting? (lower left is better; LoRA's update scaled by λ)")
    figure.tight_layout()
    save_figure(figure, out)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    pages = commands.add_parser("convergence", help="plots and table of finished blora runs")
    pages.add_argument("runs", nargs="+", type=Path)
    pages.add_argument("--out", type=Path, required=True)
    pairs = commands.add_parser("compare", help="seed-pooled paired differences b − a")
    pairs.add_argument("--a", nargs="+", required=True)
    pairs.add_argument("--b", nargs="+", required=True)
    pairs.add_argument("--pair", action="append", required=True, help="domain:metric, e.g. en:ce")
    weights = commands.add_parser("weightings", help="sigma* of a run under its own, token and dataset weighting")
    weights.add_argument("run", type=Path)
    weights.add_argument("--batches", type=int, default=8)
    frontiers = commands.add_parser("frontier", help="question (a) as frontiers, from a JSON spec")
    frontiers.add_argument("spec", type=Path)
    frontiers.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "weightings":
        print(weightings(args.run, args.batches))
    elif args.command == "convergence":
        print(convergence(args.runs, args.out))
    elif args.command == "frontier":
        print(frontier(args.spec, args.out))
    else:
        print(compare(args.a, args.b, args.pair))


if __name__ == "__main__":
    main()
