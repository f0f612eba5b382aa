"""The paper's experiment end to end: testbed, training, forward and backward evaluation, report.

:func:`run_evaluation` scores one model (base, run folder or any Whisper) and writes ``eval.json``;
:func:`run_main_job` is ``pyro-blora main``: build (or reuse) a testbed, train LoRA and BLoRA on one
code-switched domain, evaluate both against the base model and write ``report.md``.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from pyro_blora.training.budget import LABELS_FILE, choose_scale, load_retention_set, parameter_update, transcript_ce
from pyro_blora.checkpoint import atomic_write_json
from pyro_blora.config import BLoRAConfig, RetentionBudget, TrainConfig
from pyro_blora.evaluation.scoring import EvalOptions, EvalSet, evaluate_whisper, format_table, load_eval_sets, relative_changes
from pyro_blora.model.encoder_window import encoder_input_frames
from pyro_blora.model.encoder_window import encoder_window_seconds as window_of
from pyro_blora.model.encoder_window import set_encoder_window
from pyro_blora.training.methods import METHODS, load_run_model, load_training_data, read_run_config, run_training
from pyro_blora.testbed import TestbedConfig, build_testbed
from pyro_blora.base_models.loading import interpolate_weights, load_processor

__all__ = [
    "ALL_LINEAR_TARGETS",
    "MAIN_TESTBED",
    "MainJobConfig",
    "budget_scaled_model",
    "ensure_testbed",
    "eval_file_name",
    "export_run",
    "load_curve_sets",
    "read_eval",
    "run_evaluation",
    "run_main_job",
]

# Every linear layer of the attention and feed-forward blocks of encoder and decoder. LoRA on these
# forgets visibly on the testbed (q/k-only LoRA at this scale barely does).
ALL_LINEAR_TARGETS: tuple[str, ...] = (
    r".*layers\.\d+\.(self_attn|encoder_attn)\.(q|k|v|out)_proj$",
    r".*layers\.\d+\.fc[12]$",
)

# The main job's testbed: one code-switched domain, English and one backward language, sized so that
# the whole job fits in about 45 minutes on 2 CPU cores.
MAIN_TESTBED = TestbedConfig(
    pairs=("zh-en",),
    codeswitch_sizes=(200, 40, 40),
    english_sizes=(10, 40, 40),
    backward_languages=("es",),
    backward_size=30,
)


def ensure_testbed(folder: str | Path, config: TestbedConfig, seed: int = 0) -> Path:
    """Build the testbed into ``folder``, or reuse it when it was built with the same config and seed."""
    folder = Path(folder)
    stamp = folder / "build-config.json"
    wanted = json.loads(json.dumps({"settings": config.settings(), "seed": seed}, default=str))
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return folder
    build_testbed(folder, config, seed=seed, overwrite=True)
    atomic_write_json(stamp, wanted)
    return folder


def read_eval(path: str | Path) -> dict[str, Any]:
    """An ``eval.json``, given itself or the run folder holding it."""
    path = Path(path)
    path = path / "eval.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `pyro-blora evaluate` on that run first")
    return json.loads(path.read_text())


def eval_file_name(delta_scale: float | None = None) -> str:
    """``eval.json`` for the run as trained, ``eval-scale<λ>.json`` for its update scaled by λ."""
    return "eval.json" if delta_scale is None or delta_scale == 1 else f"eval-scale{delta_scale:g}.json"


def _run_folder(source: str | Path) -> Path | None:
    folder = Path(source)
    return folder if (folder / "log.jsonl").exists() and (folder / "config.json").is_file() else None


def _base_of_run(run_dir: Path, whisper):
    """The base model a run was trained from (``model_source`` in its config), cut to ``whisper``'s window."""
    base, _, _ = load_run_model(read_run_config(run_dir)["run"]["model_source"])
    set_encoder_window(base, window_of(whisper))
    return base


def _scaled_update(run_dir: Path, whisper, scale: float):
    """The run's model with its update scaled: W0 + λ (W_run − W0), W0 from the base the run records."""
    return interpolate_weights(_base_of_run(run_dir, whisper), whisper, scale)


def budget_scaled_model(run_dir: str | Path, whisper, processor, retain: str | Path, budget: RetentionBudget,
                        split: str = "dev", cache_dir: str | Path | None = None) -> tuple[Any, dict[str, Any]]:
    """A finished run's model (``whisper``, changed in place) with its update scaled, W0 + lambda dW,
    by the largest lambda in [0, 1] whose retention loss on ``retain`` stays inside ``budget``, with
    no retraining; and what was measured. Any method: dW is the difference of the run's weights and
    its base model's. Retention utterances without transcripts are labelled by the base model's
    greedy transcripts (the run's ``retention-labels.json`` when it holds them)."""
    run_dir = Path(run_dir)
    model_source = read_run_config(run_dir)["run"]["model_source"]
    base = _base_of_run(run_dir, whisper)
    retention = load_retention_set(retain, processor, base, budget.utterances, split, cache_dir, run_dir / LABELS_FILE,
                                   encoder_input_frames(whisper), model_name=str(model_source))
    device = next(whisper.parameters()).device
    retention = retention.to(device)
    reference = dict(base.named_parameters())
    params = dict(whisper.named_parameters())
    origin = {name: reference[name].detach().to(device) for name, p in params.items()
              if name in reference and not torch.equal(p.detach(), reference[name].detach().to(device))}
    del base, reference
    update = parameter_update(whisper, params, origin)

    def measure(scale: float) -> float:
        with update.scaled(scale) as model:
            return transcript_ce(model, retention.batches)

    base_ce = measure(0.0)
    limit = budget.limit(base_ce)
    scale, tried = choose_scale(measure, limit, budget.scale_grid, budget.scale_refine)
    if scale is None:
        raise ValueError(f"the forgetting budget ({budget.describe()}: at most {limit:.4f}) is below even the base "
                         f"model's retention loss ({base_ce:.4f}) on {retain}; give a larger budget")
    update.commit(scale)
    info = {"budget": budget.to_dict(), "described": budget.describe(), "retention": retention.describe(),
            "base_retain_ce": base_ce, "retain_limit": limit, "scale": scale, "retain_ce": dict(tried)[scale],
            "scales_tried": tried}
    return whisper, info


def _budget_file_name(budget: RetentionBudget) -> str:
    return f"eval-budget{budget.budget:g}{'' if budget.kind == 'relative' else '-absolute'}.json"


def run_evaluation(
    source: str | Path,
    sets: Mapping[str, EvalSet] | None = None,
    *,
    testbed: str | Path | None = None,
    domains: Sequence[str] = ("zh-en", "en"),
    split: str = "test",
    limit: int | None = None,
    options: EvalOptions = EvalOptions(),
    base: Mapping[str, Any] | str | Path | None = None,
    against: Mapping[str, Any] | str | Path | None = None,
    out: str | Path | None = None,
    cache_dir: str | Path | None = None,
    delta_scale: float | None = None,
    encoder_window_seconds: float | None = None,
    retain: str | Path | None = None,
    retain_budget: RetentionBudget | None = None,
    retain_split: str = "dev",
) -> dict[str, Any]:
    """Evaluate ``source`` (a run folder or a model) and write ``eval.json``.

    The sets are ``sets`` or the ``domains`` of ``testbed``. ``base`` and ``against`` are eval
    results (or their files / run folders) to report relative changes against. ``out`` defaults to
    the run folder's ``eval.json`` (for a run) and is not written for a bare model without ``out``.
    ``delta_scale`` λ evaluates a run with its update scaled, W0 + λ (W_run − W0), into
    ``eval-scale<λ>.json`` (λ = 1: the run as trained). ``encoder_window_seconds`` cuts a model's
    encoder to that window (a base model scored beside windowed runs); a run keeps the window it
    was trained with and refuses another. ``retain_budget`` with ``retain`` (retention data) evaluates a
    run with its update scaled by the largest λ inside that forgetting budget
    (:func:`budget_scaled_model`), into ``eval-budget<budget>.json``."""
    run_dir = _run_folder(source)
    whisper, processor, description = load_run_model(source)
    if encoder_window_seconds is not None:
        if run_dir is not None and encoder_window_seconds != window_of(whisper):
            raise ValueError(f"{source} was trained with a {window_of(whisper):g} s encoder window; evaluate it "
                             f"without an encoder window (it uses its own), not {encoder_window_seconds:g} s")
        set_encoder_window(whisper, encoder_window_seconds)
    if delta_scale is not None and delta_scale != 1:
        if run_dir is None:
            raise ValueError(f"a delta scale scales a run's update against its base model; {source} is not a run "
                             "folder (give one trained with `pyro-blora train`)")
        whisper = _scaled_update(run_dir, whisper, delta_scale)
        description += f", update scaled by {delta_scale:g}"
    budget_info = None
    if (retain is None) != (retain_budget is None):
        raise ValueError("a forgetting budget needs both the retention data (--retain) and the budget (--retain-budget)")
    if retain_budget is not None:
        if run_dir is None or delta_scale is not None:
            raise ValueError("a forgetting budget chooses the scale of a run's update: give a run folder, and no "
                             "delta scale next to it")
        whisper, budget_info = budget_scaled_model(run_dir, whisper, processor, retain, retain_budget, retain_split,
                                                   cache_dir)
        description += f", update scaled by {budget_info['scale']:.4g} ({retain_budget.describe()} on {retain})"
    if sets is None:
        if testbed is None:
            raise ValueError("give the evaluation sets or a testbed folder (--testbed) to take them from")
        sets = load_eval_sets(testbed, domains, processor, split=split, limit=limit, cache_dir=cache_dir)
    start = time.perf_counter()
    results = evaluate_whisper(whisper, processor, sets, options)
    report: dict[str, Any] = {
        "model": description,
        "source": str(source),
        "options": asdict(options),
        "encoder_window_seconds": window_of(whisper),
        "results": results,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if delta_scale is not None:
        report["delta_scale"] = delta_scale
    if budget_info is not None:
        report["delta_scale"], report["retention_budget"] = budget_info["scale"], budget_info
    for name, reference in (("relative_to_base", base), ("relative_to_against", against)):
        if reference is not None:
            other = reference if isinstance(reference, Mapping) else read_eval(reference)
            report[name] = relative_changes(results, other["results"])
            report[name.replace("relative_to_", "") + "_source"] = other.get("source")
    name = _budget_file_name(retain_budget) if retain_budget is not None else eval_file_name(delta_scale)
    target = Path(out) if out else (run_dir / name if run_dir is not None else None)
    if target is not None:
        atomic_write_json(target, report)
    return report


def export_run(source: str | Path, out: str | Path, retain: str | Path | None = None,
               retain_budget: RetentionBudget | None = None, retain_split: str = "dev",
               cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Write a run's model as a plain transformers Whisper folder (weights and processor): the posterior
    mean or the merged adapter on its base, or the fully fine-tuned weights; with ``retain_budget``,
    the update scaled by the largest λ inside that forgetting budget on ``retain``
    (``budget.json`` beside the weights says what was measured)."""
    run_dir = _run_folder(source)
    if run_dir is None:
        raise ValueError(f"{source} is not a run folder (one written by `pyro-blora train`)")
    if (retain is None) != (retain_budget is None):
        raise ValueError("a forgetting budget needs both the retention data (--retain) and the budget (--retain-budget)")
    whisper, processor, description = load_run_model(run_dir)
    info: dict[str, Any] = {"model": description, "source": str(source)}
    if retain_budget is not None:
        whisper, info["retention_budget"] = budget_scaled_model(run_dir, whisper, processor, retain, retain_budget,
                                                                retain_split, cache_dir)
    out = Path(out)
    whisper.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    atomic_write_json(out / "budget.json" if retain_budget is not None else out / "export.json", info)
    return info


@dataclass(frozen=True)
class MainJobConfig:
    """What ``pyro-blora main`` runs. Defaults fit in about 45 minutes on 2 CPU cores."""

    out: Path = Path("main-job")
    # The base model: the multilingual Whisper base shipped in PyPI packages.
    model: str = "base"
    # The code-switched domain adapted to, and the domains evaluated (in-domain first).
    domain: str = "zh-en"
    eval_domains: tuple[str, ...] = ("zh-en", "en", "backward-es")
    methods: tuple[str, ...] = ("lora", "blora")
    testbed: TestbedConfig = MAIN_TESTBED
    testbed_seed: int = 0
    # LoRA r=32, alpha=64 on every linear layer (both methods use these adapters).
    blora: BLoRAConfig = BLoRAConfig(target_modules=ALL_LINEAR_TARGETS)
    train: TrainConfig = TrainConfig(
        steps=80, batch_size=4, lr=1e-3, warmup_steps=5, precision="bf16", eval_every=20, checkpoint_every=20
    )
    # Curves during training: CE on this many dev utterances per domain, greedy error on the first few.
    curve_utterances: int = 16
    curve_decoded: int = 4
    # Test utterances per domain (None: the whole test split).
    eval_limit: int | None = None

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose among {METHODS}")
        if self.domain not in self.eval_domains:
            raise ValueError(f"the trained domain {self.domain!r} must be among eval_domains {self.eval_domains}")

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["testbed"] = self.testbed.settings()
        return json.loads(json.dumps(values, default=str))


def load_curve_sets(testbed: str | Path, domains: Sequence[str], processor, limit: int,
                    cache_dir: str | Path | None = None) -> dict[str, EvalSet]:
    """The dev sets of the forgetting curves: every domain of ``domains`` with a dev split (backward
    sets have only a test split), ``limit`` utterances each."""
    curve_domains = [d for d in domains if not d.startswith("backward-")]
    return load_eval_sets(testbed, curve_domains, processor, split="dev", limit=limit, cache_dir=cache_dir)


def run_main_job(config: MainJobConfig = MainJobConfig(), echo=print) -> dict[str, Any]:
    """Testbed, base evaluation, training and evaluation of each method, comparison table and report."""
    start = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "main-config.json", config.to_dict())
    cache = out / "cache"
    echo(f"[1/4] testbed -> {out / 'testbed'}")
    testbed = ensure_testbed(out / "testbed", config.testbed, config.testbed_seed)
    echo(f"[2/4] base model {config.model!r}: evaluation on {', '.join(config.eval_domains)}")
    processor = load_processor(config.model)
    sets = load_eval_sets(testbed, config.eval_domains, processor, limit=config.eval_limit, cache_dir=cache)
    curve_sets = load_curve_sets(testbed, config.eval_domains, processor, config.curve_utterances, cache)
    base_path = out / "base" / "eval.json"
    base = read_eval(base_path) if base_path.is_file() else run_evaluation(config.model, sets, out=base_path)
    evaluations = {"base": base}
    data = load_training_data(testbed / config.domain, processor, cache_dir=cache)
    for number, method in enumerate(config.methods, 1):
        run_dir = out / "runs" / method
        echo(f"[3/4] training {method} ({number}/{len(config.methods)}) -> {run_dir}")
        if not (run_dir / "result.json").is_file():
            run_training(
                method, config.model, data, run_dir, config.blora, config.train,
                curve_sets=curve_sets, curve_options=EvalOptions(decode_limit=config.curve_decoded),
                resume=(run_dir / "checkpoints").is_dir(), run_info={"main_job": str(out)},
            )
        echo(f"[4/4] evaluating {method}")
        evaluations[method] = run_evaluation(run_dir, sets, base=base) if not (run_dir / "eval.json").is_file() \
            else read_eval(run_dir)
    table = format_table({name: e["results"] for name, e in evaluations.items()}, baseline="base")
    minutes = (time.perf_counter() - start) / 60
    atomic_write_json(out / "comparison.json", {name: e["results"] for name, e in evaluations.items()})
    (out / "report.md").write_text(_report(config, evaluations, table, minutes))
    echo(table)
    echo(f"report: {out / 'report.md'} ({minutes:.1f} min)")
    return {"evaluations": evaluations, "table": table, "minutes": minutes}


def _curve_lines(run_dir: Path) -> list[str]:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    evaluated = [r for r in records if any("/" in key for key in r)]
    if not evaluated:
        return []
    keys = sorted({k for r in evaluated for k in r if "/" in k})
    lines = ["| step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r in evaluated:
        lines.append(f"| {r['step']} | " + " | ".join(f"{r[k]:.3f}" if k in r else "" for k in keys) + " |")
    return lines


def _report(config: MainJobConfig, evaluations: Mapping[str, Mapping], table: str, minutes: float) -> str:
    lines = [
        "# Main job",
        "",
        f"Base model `{config.model}`; adapted to `{config.domain}` with {', '.join(config.methods)}; "
        f"evaluated on {', '.join(config.eval_domains)} (test splits, greedy decoding with the language forced; "
        "CE is teacher-forced cross-entropy per token; LID is language-ID accuracy with the language not forced).",
        "",
        f"Adapters: rank {config.blora.rank}, alpha {config.blora.rank * config.blora.scaling:g}, targets "
        f"`{', '.join(config.blora.target_modules)}`. BLoRA: prior σp {config.blora.prior_scale}, β {config.blora.beta}, "
        f"KL normalisation `{config.blora.kl_normalization}`. Training: {config.train.steps} steps, batch "
        f"{config.train.batch_size}, Adam lr {config.train.lr}, precision {config.train.precision}, seed {config.train.seed}.",
        "",
        "Δ columns: relative change against the base model (positive = worse for error and CE).",
        "",
        "```",
        table,
        "```",
        "",
        f"Wall time: {minutes:.1f} min on {platform.machine()} with {torch.get_num_threads()} torch threads. "
        "One seed: differences of a few points are within seed noise.",
    ]
    for method in config.methods:
        curve = _curve_lines(Path(config.out) / "runs" / method)
        if curve:
            lines += ["", f"## Dev curves during training: {method}", "", *curve]
    return "\n".join(lines) + "\n"
