"""What a finished run learned: its adapters, how sparse they are, what the posterior says per layer.

:func:`load_run_weights` reads the trained adapters of any run folder (``posterior/`` of a blora or
map run, the peft ``adapter/`` of a LoRA run, ``model/`` of a full fine-tuning run, whose update
dW is the difference to the base weights). :func:`run_summary` condenses a run (its config,
training result, evaluation and dW sparsity) into one flat row: the unit of the sweep's results
table and of the report's frontier. Nothing here draws or writes files; :mod:`pyro_blora.report.pages`
renders these numbers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from pyro_blora.model.adapters import lora_delta_weight
from pyro_blora.evaluation.scoring import ce_scope, relative_changes
from pyro_blora.metrics import SparsityStats, sparsity_report
from pyro_blora.metrics.bootstrap import (
    DEFAULT_SAMPLES,
    Interval,
    backward_gain,
    bootstrap_evals,
    degradation_reduction,
    difference,
    has_records,
    relative_change,
)
from pyro_blora.data.training_data import load_training_data
from pyro_blora.runs import base_evaluation_path, find_runs, read_eval, read_run_config, scaled_evaluations
from pyro_blora.model.whisper import module_path

__all__ = [
    "MATRICES",
    "PRIOR_METHODS",
    "STATISTICS",
    "RunWeights",
    "base_evaluation",
    "early_stopping_step",
    "evaluation_fields",
    "find_runs",
    "interpolation_curve",
    "layer_table",
    "load_run_weights",
    "monte_carlo_examples",
    "paired_intervals",
    "run_summary",
    "setting_name",
    "scaled_evaluations",
    "sparsity_rows",
]

# Methods whose objective has the prior: β, σp and the KL normalisation act only on these.
PRIOR_METHODS = ("blora", "map")


def setting_name(method: str, rank: int, beta: float | None = None, prior_scale: float | None = None,
                 kl_normalization: str | None = None, seed: int = 0) -> str:  # noqa: ARG001 - a sweep point's fields
    """A sweep setting's name, without the seed: the runs of one setting over several seeds share it."""
    parts = [method, f"r{rank}"]
    if method in PRIOR_METHODS:
        parts += [f"beta{beta:g}", f"sp{prior_scale:g}", str(kl_normalization)]
    return "-".join(parts)
# The pools of weights whose sparsity is measured, and the four statistics measured on each.
MATRICES = ("A", "B", "dW")
STATISTICS = ("thresh_fraction", "adaptive_thresh_fraction", "top_energy_share", "hoyer_index")


@dataclass
class RunWeights:
    """A run's trained update, per adapted layer (keyed by its path inside the Whisper model).

    ``A`` and ``B`` are the posterior means (blora), point estimates (map) or LoRA matrices; a full
    fine-tuning run has none. ``stddev_A``/``stddev_B`` and ``kl`` (nats, A and B together) exist for
    Bayesian runs only."""

    name: str
    method: str
    run_dir: Path
    delta: dict[str, torch.Tensor]
    A: dict[str, torch.Tensor] = field(default_factory=dict)
    B: dict[str, torch.Tensor] = field(default_factory=dict)
    stddev_A: dict[str, torch.Tensor] = field(default_factory=dict)
    stddev_B: dict[str, torch.Tensor] = field(default_factory=dict)
    kl: dict[str, float] = field(default_factory=dict)
    # The prior's standard deviation sigma_p (blora and map), None otherwise.
    prior_scale: float | None = None

    @property
    def bayesian(self) -> bool:
        return bool(self.kl)

    def matrices(self) -> dict[str, dict[str, torch.Tensor]]:
        """The measured pools that this run has: A, B and dW (dW only for full fine-tuning)."""
        pools = {"A": self.A, "B": self.B, "dW": self.delta}
        return {name: pool for name, pool in pools.items() if pool}

    def sparsity(self) -> dict[str, SparsityStats]:
        """The four sparsity statistics of each pool, all layers pooled."""
        return {name: sparsity_report(pool) for name, pool in self.matrices().items()}


def _split_sites(values: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """{"A": {layer: tensor}, "B": {...}} from values keyed by Pyro site."""
    pools: dict[str, dict[str, torch.Tensor]] = {"lora_A": {}, "lora_B": {}}
    for site, value in values.items():
        path, leaf = module_path(site)
        pools[leaf][path] = value
    return pools["lora_A"], pools["lora_B"]


@torch.no_grad()
def _bayesian_weights(run_dir: Path, method: str, base_model: str) -> RunWeights:
    from pyro_blora.model.guide import BLoRAGuide
    from pyro_blora.model.objective import analytic_kl
    from pyro_blora.posterior import load_posterior
    from pyro_blora.base_models.loading import load_whisper

    folder = run_dir / "posterior"
    if not folder.is_dir():
        raise FileNotFoundError(f"{run_dir} has no posterior/ folder: the {method} run has not finished (resume it)")
    whisper, _ = load_whisper(base_model)
    model, guide = load_posterior(folder, whisper)
    means = guide.means()
    A, B = _split_sites(means)
    weights = RunWeights(run_dir.name, method, run_dir, model.delta_weights(means), A, B,
                         prior_scale=model.config.prior_scale)
    if isinstance(guide, BLoRAGuide):
        weights.stddev_A, weights.stddev_B = _split_sites(guide.stddevs())
        for site, value in analytic_kl(model, guide).items():
            path, _ = module_path(site)
            weights.kl[path] = weights.kl.get(path, 0.0) + float(value)
    return weights


def _lora_weights(run_dir: Path) -> RunWeights:
    from pyro_blora.interop.peft import read_peft_adapter

    folder = run_dir / "adapter"
    if not folder.is_dir():
        raise FileNotFoundError(f"{run_dir} has no adapter/ folder: the LoRA run has not finished (resume it)")
    adapter = read_peft_adapter(folder)
    A = {path: pair[0].float() for path, pair in adapter.weights.items()}
    B = {path: pair[1].float() for path, pair in adapter.weights.items()}
    delta = {path: lora_delta_weight(A[path], B[path], adapter.scaling) for path in A}
    return RunWeights(run_dir.name, "lora", run_dir, delta, A, B)


@torch.no_grad()
def _full_weights(run_dir: Path, base_model: str) -> RunWeights:
    from pyro_blora.config import ALL_LINEAR_TARGETS
    from pyro_blora.model.injection import find_target_modules
    from pyro_blora.base_models.loading import load_whisper

    if not (run_dir / "model").is_dir():
        raise FileNotFoundError(f"{run_dir} has no model/ folder: the full fine-tuning run has not finished")
    trained, _ = load_whisper(run_dir / "model")
    base, _ = load_whisper(base_model)
    trained_modules, base_modules = dict(trained.named_modules()), dict(base.named_modules())
    delta = {
        path: trained_modules[path].weight.float() - base_modules[path].weight.float()
        for path in find_target_modules(base, ALL_LINEAR_TARGETS)
    }
    return RunWeights(run_dir.name, "full", run_dir, delta)


def load_run_weights(run_dir: str | Path) -> RunWeights:
    """The trained update of a finished run folder (any method). Loads the run's base model."""
    run_dir = Path(run_dir)
    run = read_run_config(run_dir)["run"]
    method, base_model = run["method"], run["model_source"]
    if method in ("blora", "map"):
        return _bayesian_weights(run_dir, method, base_model)
    if method == "lora":
        return _lora_weights(run_dir)
    if method == "full":
        return _full_weights(run_dir, base_model)
    raise ValueError(f"{run_dir}: unknown method {method!r} in config.json")


def sparsity_rows(runs: Iterable[RunWeights]) -> list[dict[str, Any]]:
    """One row per (run, matrix) with the four statistics: the comparison table between runs."""
    rows = []
    for weights in runs:
        for matrix, stats in weights.sparsity().items():
            rows.append({"run": weights.name, "method": weights.method, "matrix": matrix, "n": stats.n,
                         **{name: getattr(stats, name) for name in STATISTICS}})
    return rows


def _mean(values: Iterable[torch.Tensor]) -> float:
    values = list(values)
    return float(torch.cat([v.reshape(-1).float() for v in values]).mean()) if values else math.nan


def layer_table(weights: RunWeights) -> list[dict[str, Any]]:
    """Per adapted layer: size of the update, posterior scale (mean std of A and B) and KL (Bayesian runs)."""
    rows = []
    for path, delta in weights.delta.items():
        row: dict[str, Any] = {"layer": path, "dW_norm": float(torch.linalg.vector_norm(delta.float()))}
        if path in weights.A:
            row["mean_abs_A"] = _mean([weights.A[path].abs()])
            row["mean_abs_B"] = _mean([weights.B[path].abs()])
        if weights.bayesian:
            row["mean_std_A"] = _mean([weights.stddev_A[path]])
            row["mean_std_B"] = _mean([weights.stddev_B[path]])
            row["kl"] = weights.kl[path]
        rows.append(row)
    return rows


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _mean_of(entries: Iterable[Mapping[str, Any]], metric: str) -> float | None:
    values = [float(e[metric]) for e in entries if metric in e]
    return sum(values) / len(values) if values else None


def evaluation_fields(results: Mapping[str, Mapping], in_domain: str,
                      changes: Mapping[str, Mapping] | None = None) -> dict[str, Any]:
    """In-domain and backward (every other domain) error, CE and language ID of an eval result, with
    their relative changes when ``changes`` is given."""
    backward = [d for d in results if d != in_domain]
    fields: dict[str, Any] = {"in_domain": in_domain, "backward_domains": ",".join(backward)}
    for metric, name in (("error_rate", "error"), ("ce", "ce")):
        fields[f"in_domain_{name}"] = _mean_of([results[in_domain]], metric)
        fields[f"backward_{name}"] = _mean_of([results[d] for d in backward], metric)
        if changes is not None:
            fields[f"in_domain_{name}_change"] = _mean_of([changes.get(in_domain, {})], metric)
            fields[f"backward_{name}_change"] = _mean_of([changes.get(d, {}) for d in backward], metric)
    # Unforced language identification of the backward sets: the first thing adapters break.
    fields["backward_language_id"] = _mean_of([results[d] for d in backward], "language_id")
    # What CE covers: "transcript" tokens, or "all" label tokens in results written before the split.
    fields["ce_scope"] = ce_scope(results[in_domain])
    return fields


def _trained_domain(run: Mapping[str, Any], results: Mapping[str, Any], in_domain: str | None) -> str:
    """``in_domain``, else the folder name of the run's training data, else the first evaluated domain."""
    domain = in_domain or Path(run.get("train_data", "")).name
    return domain if domain in results else next(iter(results))


def interpolation_curve(run_dir: str | Path, in_domain: str | None = None) -> list[dict[str, Any]]:
    """In-domain and backward metrics (:func:`evaluation_fields`) of the run at every delta scale it
    was evaluated at, each row with its ``scale``: the run's stability-plasticity curve."""
    run = read_run_config(run_dir)["run"]
    rows = []
    for scale, evaluation in scaled_evaluations(run_dir).items():
        results = evaluation["results"]
        rows.append({"scale": scale, **evaluation_fields(results, _trained_domain(run, results, in_domain))})
    return rows


def base_evaluation(run_dir: str | Path, base: Mapping[str, Any] | str | Path | None = None) -> dict[str, Any] | None:
    """The base model's eval result for a run: ``base`` (a result, its file or folder), else the
    ``base/eval.json`` of the sweep or main job that holds the run (``<job>/runs/<run>``), else None."""
    if base is not None:
        return dict(base) if isinstance(base, Mapping) else read_eval(base)
    path = base_evaluation_path(run_dir)
    return read_eval(path) if path is not None else None


def paired_intervals(runs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]], base: Mapping[str, Any], *,
                     samples: int = DEFAULT_SAMPLES, seed: int = 0, level: float = 0.95) -> dict[str, dict[str, Interval]]:
    """Per setting, paired bootstrap intervals (:mod:`pyro_blora.metrics.bootstrap`) of its differences
    on the same test utterances: against the base model (``in_domain_error_vs_base``,
    ``backward_error_vs_base``, ``backward_ce_vs_base``; differences M - base) and, for BLoRA and MAP,
    against LoRA of the same rank and targets (``in_domain_error_vs_lora``, ``backward_error_vs_lora``,
    ``backward_gain``, ``in_domain_drop``, ``degradation_reduction``). Backward values are means over
    the backward domains, each domain resampled on its own.

    Seeds are pooled by concatenating utterances: seed s of the setting is paired with seed s of
    LoRA and with the one base evaluation, and the resampled unit is one utterance of one seed. The
    interval thus reflects which utterances are in the test set, with the trained runs held fixed;
    the spread between seeds is what the ± std columns show. Only seeds both settings have are
    paired. ``runs`` are (summary row, eval result) of evaluated runs; a row names its ``setting``,
    ``seed``, ``method``, ``rank``, ``in_domain`` and ``backward_domains`` (:func:`run_summary` with the
    setting and seed), and may name its adapters' ``targets``; the first LoRA setting of the same rank
    and targets is the baseline. Differences whose eval.json
    files lack per-utterance records (written before them) are left out."""
    groups: dict[str, dict[int, Mapping[str, Any]]] = {}
    first: dict[str, Mapping[str, Any]] = {}
    for row, evaluation in runs:
        groups.setdefault(row["setting"], {})[row["seed"]] = evaluation
        first.setdefault(row["setting"], row)
    lora: dict[Any, str] = {}  # the LoRA setting of each (rank, targets): the same adapters without a prior
    for setting in groups:
        if first[setting]["method"] == "lora":
            lora.setdefault((first[setting]["rank"], first[setting].get("targets")), setting)

    def interval(systems, domains, metric, statistic) -> Interval | None:
        if not domains or not all(has_records(e, d, metric) for results in systems for e in results for d in domains):
            return None
        return bootstrap_evals(systems, domains, metric, statistic, samples=samples, seed=seed, level=level)

    out: dict[str, dict[str, Interval]] = {}
    for setting, by_seed in groups.items():
        row = first[setting]
        in_domain, backward = [row["in_domain"]], [d for d in row["backward_domains"].split(",") if d]
        method = [by_seed[s] for s in sorted(by_seed)]
        bases = [base] * len(method)
        found = {
            "in_domain_error_vs_base": interval([bases, method], in_domain, "error_rate", difference),
            "backward_error_vs_base": interval([bases, method], backward, "error_rate", difference),
            "backward_ce_vs_base": interval([bases, method], backward, "ce", difference),
        }
        baseline = groups.get(lora.get((row["rank"], row.get("targets"))), {})
        common = sorted(set(by_seed) & set(baseline))
        if row["method"] in PRIOR_METHODS and common:
            m, lora_runs = [by_seed[s] for s in common], [baseline[s] for s in common]
            found.update(
                in_domain_error_vs_lora=interval([lora_runs, m], in_domain, "error_rate", difference),
                backward_error_vs_lora=interval([lora_runs, m], backward, "error_rate", difference),
                backward_gain=interval([lora_runs, m], backward, "error_rate", backward_gain),
                in_domain_drop=interval([lora_runs, m], in_domain, "error_rate", relative_change),
                degradation_reduction=interval([[base] * len(common), lora_runs, m], backward, "error_rate",
                                               degradation_reduction),
            )
        out[setting] = {name: value for name, value in found.items() if value is not None}
    return out


def early_stopping_step(run_dir: str | Path, domain: str) -> int | None:
    """The step that dev-loss early stopping would keep: the lowest ``<domain>/ce`` of the dev curves
    in ``log.jsonl`` (None without curves)."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    scored = [(r[f"{domain}/ce"], r["step"]) for r in records if f"{domain}/ce" in r]
    return min(scored)[1] if scored else None


def run_summary(
    run_dir: str | Path,
    *,
    base: Mapping[str, Any] | str | Path | None = None,
    in_domain: str | None = None,
    weights: RunWeights | None = None,
    sparsity: bool = True,
) -> dict[str, Any]:
    """One flat row for a finished run: method and settings, training NLL, evaluation (when
    ``eval.json`` exists) and the sparsity statistics of dW.

    The in-domain set is ``in_domain`` or the domain the run was trained on; every other evaluated
    domain counts as backward (forgetting). Changes (relative, positive = worse) are taken against
    ``base`` (an eval result, its file or run folder) or else the ``relative_to_base`` of eval.json."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    run, blora = config["run"], config.get("blora") or {}
    row: dict[str, Any] = {
        "run": run_dir.name, "method": run["method"], "path": str(run_dir),
        "rank": blora.get("rank"), "beta": blora.get("beta"), "prior_scale": blora.get("prior_scale"),
        "kl_normalization": blora.get("kl_normalization"), "steps": config["train"]["steps"],
    }
    if run["method"] in ("lora", "full"):  # no prior: these settings did not act
        row.update(beta=None, prior_scale=None, kl_normalization=None)
    result = _read_json(run_dir / "result.json") or {}
    row["base_nll"], row["nll"] = result.get("base_nll"), result.get("final_nll")
    evaluation = _read_json(run_dir / "eval.json")
    if evaluation is not None:
        results = evaluation["results"]
        domain = _trained_domain(run, results, in_domain)
        if base is not None:
            changes = relative_changes(results, base_evaluation(run_dir, base)["results"])
        else:
            changes = evaluation.get("relative_to_base")
        row.update(evaluation_fields(results, domain, changes))
    row["early_stopping_step"] = early_stopping_step(run_dir, in_domain or Path(run.get("train_data", "")).name)
    if sparsity:
        stats = (weights or load_run_weights(run_dir)).sparsity()["dW"]
        row.update({f"dW_{name}": getattr(stats, name) for name in STATISTICS})
    return row


def monte_carlo_examples(run_dir: str | Path, count: int = 3, num_samples: int = 8, split: str = "test",
                         seed: int = 0, max_new_tokens: int = 48) -> list[dict[str, Any]]:
    """Transcripts of the first ``count`` utterances of the run's own data source (``split``, or the
    training split when it has none) under ``num_samples`` posterior draws, with their disagreement."""
    import pyro

    from pyro_blora.data import is_english_only, load_speech_dataset
    from pyro_blora.predict.decoding import greedy_generate_kwargs
    from pyro_blora.predict.monte_carlo import monte_carlo_transcribe
    from pyro_blora.posterior import load_posterior, read_posterior_config
    from pyro_blora.base_models.loading import load_whisper

    run_dir = Path(run_dir)
    run = read_run_config(run_dir)["run"]
    if read_posterior_config(run_dir / "posterior").get("guide") != "normal":
        raise ValueError(f"{run_dir} is a {run['method']} run without a posterior distribution; give a blora run")
    whisper, processor = load_whisper(run["model_source"])
    model, guide = load_posterior(run_dir / "posterior", whisper)
    available = load_speech_dataset(run["train_data"], columns=run.get("train_columns"))
    chosen_split = split if split in available else run.get("train_split", "train")
    data = load_training_data(run["train_data"], processor, split=chosen_split, limit=count,
                              columns=run.get("train_columns"))
    features = data.collate([data.dataset[i] for i in range(len(data))])["input_features"]
    prepared = data.dataset.prepared
    # Greedy decoding with the evaluation's fast token suppression.
    generate_kwargs = greedy_generate_kwargs(whisper, not is_english_only(processor.tokenizer), max_new_tokens)
    pyro.set_rng_seed(seed)
    languages, texts = prepared["language"], prepared["text"]
    out: list[dict[str, Any]] = [{} for _ in texts]
    for language in dict.fromkeys(languages):  # one batched decode per language
        rows = [i for i, lang in enumerate(languages) if lang == language]
        transcripts = monte_carlo_transcribe(model, guide, features[rows], processor.tokenizer, num_samples=num_samples,
                                             language=language, generate_kwargs=generate_kwargs)
        for i, transcript in zip(rows, transcripts):
            out[i] = {"reference": texts[i], "language": language, **transcript.to_dict()}
    return out
