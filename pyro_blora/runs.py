"""The run folder: its layout, its one "finished" test, and everything that reads a run back.

A run folder, as every method writes it::

    config.json        what the run is: adapter, training options, method, data, seed (written first)
    log.jsonl          one record per optimiser step
    checkpoints/       step-XXXXXXXX.pt, the newest few (resume continues from the last)
    posterior/         the trained weights: blora and map (a posterior folder) ...
    adapter/           ... lora (a PEFT adapter) ...
    model/             ... full (a transformers model)
    result.json        written last, after the weights: a run with a result has its weights
    eval.json          its evaluation (``eval-scale<λ>.json`` with its update scaled by λ,
                       ``eval-budget<b>.json`` scaled to a forgetting budget)

Experiments keep their runs as ``<experiment>/runs/<name>`` next to ``<experiment>/base/eval.json``,
the base model's evaluation on the same sets.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from transformers import WhisperForConditionalGeneration

from pyro_blora.base_models.loading import load_whisper
from pyro_blora.checkpoint import CheckpointDir, atomic_write_bytes, atomic_write_json
from pyro_blora.config import RetentionBudget, TrainConfig
from pyro_blora.model.encoder_window import FULL_WINDOW_SECONDS, set_encoder_window
from pyro_blora.posterior import load_posterior, read_posterior_config
from pyro_blora.predict.monte_carlo import posterior_mean_model

__all__ = [
    "CONFIG_FILE",
    "LOG_FILE",
    "METHODS",
    "RESULT_FILE",
    "WEIGHT_FOLDERS",
    "RunFolder",
    "base_evaluation_path",
    "base_model_of",
    "eval_file_name",
    "evaluated",
    "find_runs",
    "finished",
    "has_checkpoints",
    "is_run_folder",
    "load_for_transcription",
    "load_run_model",
    "posterior_encoder_window",
    "read_eval",
    "read_log",
    "read_result",
    "read_run_config",
    "run_encoder_window",
    "scaled_evaluations",
    "weights_folder",
]

METHODS = ("blora", "lora", "map", "full")
# Where each method's trained weights lie in its run folder.
WEIGHT_FOLDERS = {"blora": "posterior", "map": "posterior", "lora": "adapter", "full": "model"}
CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"
RESULT_FILE = "result.json"
CHECKPOINTS = "checkpoints"


def is_run_folder(folder: str | Path) -> bool:
    """A run folder, as opposed to a saved model (which has a config.json too, but no log)."""
    folder = Path(folder)
    return (folder / CONFIG_FILE).is_file() and (folder / LOG_FILE).exists()


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder: it has no {CONFIG_FILE} (train one with `pyro-blora train`)")
    return json.loads(path.read_text())


def run_encoder_window(config: Mapping[str, Any]) -> float:
    """Seconds of audio the encoder read when the run trained (from its config, as :func:`read_run_config`
    gives it): Whisper's 30 s unless it was trained with ``--encoder-window``."""
    return float((config.get("train") or {}).get("encoder_window_seconds", FULL_WINDOW_SECONDS))


def posterior_encoder_window(folder: str | Path) -> float:
    """The window a posterior folder was trained with: its own metadata, else the run folder holding it
    (``runs/x/posterior``)."""
    window = read_posterior_config(folder).get("metadata", {}).get("encoder_window_seconds")
    if window is not None:
        return float(window)
    run_dir = Path(folder).resolve().parent
    return run_encoder_window(read_run_config(run_dir)) if (run_dir / CONFIG_FILE).is_file() else FULL_WINDOW_SECONDS


def weights_folder(run_dir: str | Path) -> Path:
    """Where the run's trained weights are (or will be), by its method."""
    method = read_run_config(run_dir)["run"]["method"]
    if method not in WEIGHT_FOLDERS:
        raise ValueError(f"{run_dir} is a run of an unknown method {method!r}; known: {', '.join(METHODS)}")
    return Path(run_dir) / WEIGHT_FOLDERS[method]


def finished(run_dir: str | Path) -> bool:
    """The one test of a finished run: its config, its trained weights and its result, written last.

    A run killed after its result but before its weights (folders written by older versions) is not
    finished: training it again with resume continues from its last checkpoint and saves them."""
    folder = Path(run_dir)
    if not (folder / CONFIG_FILE).is_file() or not (folder / RESULT_FILE).is_file():
        return False
    try:
        return weights_folder(folder).is_dir()
    except ValueError:
        return False


def has_checkpoints(run_dir: str | Path) -> bool:
    """Whether training can resume (rather than start) in ``run_dir``."""
    return bool(CheckpointDir(Path(run_dir) / CHECKPOINTS).steps())


def read_result(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RESULT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's ``log.jsonl`` (one per step)."""
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {LOG_FILE}: it is not a run folder")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def eval_file_name(delta_scale: float | None = None, budget: RetentionBudget | None = None) -> str:
    """``eval.json`` for the run as trained, ``eval-scale<λ>.json`` for its update scaled by λ,
    ``eval-budget<b>.json`` for its update scaled to fit a forgetting budget."""
    if budget is not None:
        return f"eval-budget{budget.budget:g}{'' if budget.kind == 'relative' else '-absolute'}.json"
    return "eval.json" if delta_scale is None or delta_scale == 1 else f"eval-scale{delta_scale:g}.json"


def evaluated(run_dir: str | Path, delta_scale: float | None = None) -> bool:
    return (Path(run_dir) / eval_file_name(delta_scale)).is_file()


def read_eval(path: str | Path) -> dict[str, Any]:
    """An ``eval.json``, given itself or the run folder holding it."""
    path = Path(path)
    path = path / eval_file_name() if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `pyro-blora evaluate` on that run first")
    return json.loads(path.read_text())


def scaled_evaluations(run_dir: str | Path) -> dict[float, dict[str, Any]]:
    """A run's evaluations by delta scale λ (``eval-scale<λ>.json``; ``eval.json`` is λ = 1), sorted."""
    run_dir = Path(run_dir)
    found = {}
    for path in run_dir.glob("eval-scale*.json"):
        evaluation = json.loads(path.read_text())
        found[float(evaluation["delta_scale"])] = evaluation
    if evaluated(run_dir):
        found[1.0] = read_eval(run_dir)
    return dict(sorted(found.items()))


def base_evaluation_path(run_dir: str | Path) -> Path | None:
    """``<experiment>/base/eval.json`` for a run kept as ``<experiment>/runs/<name>``, when it exists."""
    run_dir = Path(run_dir)
    path = run_dir.parent.parent / "base" / eval_file_name()
    return path if run_dir.parent.name == "runs" and path.is_file() else None


def find_runs(paths: Sequence[str | Path], with_result: bool = True) -> list[Path]:
    """Run folders given directly or found below ``paths``, sorted; with ``with_result`` only those
    whose training ended (a ``result.json``). Reports read results, logs and evaluations, not weights,
    so a run folder published without its weights still reports."""
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; give run folders or folders that hold them")
        candidates = [path] if (path / LOG_FILE).exists() else sorted(p.parent for p in path.rglob(LOG_FILE))
        found += [c for c in candidates if is_run_folder(c) and (not with_result or (c / RESULT_FILE).is_file())]
    unique = sorted(dict.fromkeys(found))
    if not unique:
        raise FileNotFoundError(
            f"no {'finished ' if with_result else ''}run folders ({CONFIG_FILE}, {LOG_FILE}"
            f"{', ' + RESULT_FILE if with_result else ''}) in {', '.join(map(str, paths))}; "
            "train one with `pyro-blora train`"
        )
    return unique


def base_model_of(source: str | Path) -> str:
    """The model under a chain of run folders (``source`` itself if it is a model): where the
    processor of a run's model is loaded from."""
    folder = Path(source)
    if not is_run_folder(folder):
        return str(source)
    run = read_run_config(folder)["run"]
    return str(folder / WEIGHT_FOLDERS["full"]) if run["method"] == "full" else base_model_of(run["model_source"])


def load_run_model(source: str | Path, encoder_window: float | None = None) -> tuple[WhisperForConditionalGeneration, Any, str]:
    """A plain Whisper for evaluation, its processor and a description: a run folder (posterior mean,
    merged adapter, or fully fine-tuned weights, on its base, which may itself be a run folder) or any
    model :func:`~pyro_blora.base_models.loading.load_whisper` takes.

    A run's adapter goes onto its base cut to the window it was trained with, unless ``encoder_window``
    asks for a wider one (e.g. Whisper's own 30 s): the adapters act on linear layers, not on the
    positional embeddings that a window cuts, so an adapter trained at 10 s can be used at 30 s."""
    folder = Path(source)
    if not is_run_folder(folder):
        whisper, processor = load_whisper(source)
        return whisper, processor, f"model {source}"
    config = read_run_config(folder)
    method, base = config["run"]["method"], config["run"]["model_source"]
    weights = weights_folder(folder)
    if not weights.is_dir():
        raise FileNotFoundError(f"{folder} has no {weights.name}/ folder: the {method} run has not finished "
                                "(train it again with --resume to finish it)")
    window = run_encoder_window(config)
    if encoder_window is not None:
        if encoder_window < window:
            raise ValueError(f"{folder} was trained with a {window:g} s encoder window; it can be used at that window "
                             f"or a wider one (up to Whisper's {FULL_WINDOW_SECONDS:g} s), not at {encoder_window:g} s")
        window = encoder_window
    if method == "full":
        whisper, processor = load_whisper(weights)
        return whisper, processor, f"{method} run {folder.name}"
    whisper, processor, _ = load_run_model(base)
    set_encoder_window(whisper, window)  # the window the run was trained with
    if method == "lora":
        from peft import PeftModel

        merged = PeftModel.from_pretrained(whisper, str(weights)).merge_and_unload()
        return merged.eval(), processor, f"{method} run {folder.name}"
    model, guide = load_posterior(weights, whisper)
    return posterior_mean_model(model, guide), processor, f"{method} run {folder.name} (posterior mean)"


def load_for_transcription(posterior: str | Path, model: str | Path | None = None, *, keep_window: bool = False):
    """The model, guide and processor of a posterior folder, on its recorded base model unless ``model`` is given.

    Runs trained with a shorter encoder window are refused: their adapters were fitted to a model that
    reads at most that many seconds, and transcription runs Whisper's 30 s windows. ``keep_window``
    is for scoring short utterances instead (an evaluation): the model is cut to the posterior's
    window, and its input features must have ``encoder_input_frames(model.whisper)`` frames."""
    folder = Path(posterior)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"posterior folder {folder} does not exist; give the posterior/ folder of a finished blora run "
            "(e.g. runs/x/posterior, written by `pyro-blora train --method blora`)"
        )
    window = posterior_encoder_window(folder)
    if window < FULL_WINDOW_SECONDS and not keep_window:
        raise ValueError(
            f"{folder} was trained with a {window:g} s encoder window (--encoder-window), and transcription runs "
            "Whisper's 30 s windows, which that posterior was not fitted to; score it with `pyro-blora evaluate` "
            "(which keeps the window), or train with the full window (the default) to transcribe"
        )
    base = model or read_posterior_config(folder).get("metadata", {}).get("base_model")
    if not base:
        raise ValueError(f"{folder} does not name its base model in posterior.json; pass it with --model (e.g. --model base)")
    whisper, processor, _ = load_run_model(base)
    if window < FULL_WINDOW_SECONDS:
        set_encoder_window(whisper, window)
    blora, guide = load_posterior(folder, whisper)
    return blora, guide, processor


class RunFolder:
    """The writer of a run folder, shared by every training method: checks that an existing folder
    holds this very run, keeps its checkpoints and log, and writes the result last."""

    def __init__(self, run_dir: str | Path, fingerprint: Mapping[str, Any], resume: bool, keep: int = 2) -> None:
        self.path = Path(run_dir)
        self.checkpoints = _checked_folder(self.path, dict(fingerprint), resume)
        self.checkpoints.keep = keep
        self.resume = resume

    def latest_state(self) -> dict[str, Any] | None:
        return self.checkpoints.load_latest() if self.resume else None

    def rewrite_log(self, history: Sequence[Mapping[str, Any]]) -> None:
        """Make log.jsonl hold exactly ``history``: a killed run may have logged steps after its
        last checkpoint, or a half-written line."""
        atomic_write_bytes(self.path / LOG_FILE, "".join(json.dumps(dict(r)) + "\n" for r in history).encode())

    def log(self, record: Mapping[str, Any]) -> None:
        with (self.path / LOG_FILE).open("a") as handle:
            handle.write(json.dumps(dict(record)) + "\n")

    def write_result(self, result: Mapping[str, Any]) -> None:
        """Mark the run finished: call only once its weights are saved."""
        atomic_write_json(self.path / RESULT_FILE, dict(result))


def _checked_folder(run_dir: Path, fingerprint: dict[str, Any], resume: bool) -> CheckpointDir:
    config_path = run_dir / CONFIG_FILE
    checkpoints = CheckpointDir(run_dir / CHECKPOINTS)
    if config_path.exists():
        saved = json.loads(config_path.read_text())
        if saved != _as_saved_by(saved, json.loads(json.dumps(fingerprint, sort_keys=True, default=str))):
            raise ValueError(
                f"{run_dir} holds a different run (its {CONFIG_FILE} differs from this one). "
                "Choose another output folder, or delete that one to start over."
            )
        if checkpoints.steps() and not resume:
            raise ValueError(
                f"{run_dir} already holds checkpoints of this run; pass resume=True (--resume) to continue it, "
                "or choose another output folder"
            )
    else:
        atomic_write_json(config_path, fingerprint)
    return checkpoints


def _as_saved_by(saved: Mapping[str, Any], fingerprint: dict[str, Any]) -> dict[str, Any]:
    """``fingerprint`` without the training and budget options a folder written before they existed
    lacks, where they hold their defaults (so such a run still resumes)."""

    def without_new_defaults(given: Mapping[str, Any], old: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict:
        return {k: v for k, v in given.items() if k in old or v != defaults.get(k, _NO_DEFAULT)}

    fingerprint = dict(fingerprint)
    if "train" in fingerprint:
        fingerprint["train"] = without_new_defaults(fingerprint["train"] or {}, saved.get("train") or {},
                                                    TrainConfig().to_dict())
    budget = (fingerprint.get("retention") or {}).get("budget")
    if budget is not None:
        old = (saved.get("retention") or {}).get("budget") or {}
        defaults = {f.name: f.default for f in dataclasses.fields(RetentionBudget)}
        fingerprint["retention"] = {**fingerprint["retention"], "budget": without_new_defaults(budget, old, defaults)}
    return fingerprint


_NO_DEFAULT = object()
