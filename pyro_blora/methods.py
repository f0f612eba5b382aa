"""The adaptation methods the experiment compares, each trained the same way on the same data.

* ``blora``: Bayesian LoRA, SVI with the mean-field :class:`~pyro_blora.guide.BLoRAGuide`;
* ``map``: the same Pyro model with point estimates (:class:`~pyro_blora.guide.BLoRAMAPGuide`): the
  prior acts as an L2 penalty with BLoRA's weight;
* ``lora``: peft's LoRA on the same target layers, rank and scaling (no prior);
* ``full``: every weight trainable.

All of them run :func:`pyro_blora.training.run_steps`: the same batch order, optimiser (Adam), LR
schedule, gradient clipping, precision, checkpoints and log format. A run folder holds
``config.json``, ``log.jsonl``, ``checkpoints/``, ``result.json`` and the trained weights:
``posterior/`` (blora, map), ``adapter/`` (lora, peft format) or ``model/`` (full).
"""

from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pyro
import torch
from transformers import WhisperForConditionalGeneration
from transformers.models.whisper.modeling_whisper import shift_tokens_right

from pyro_blora import distributed
from pyro_blora.config import BLoRAConfig, TrainConfig
from pyro_blora.data import PreparedSpeechDataset, SpeechCollator, decoder_start_token_id, load_speech_dataset, prepare_dataset
from pyro_blora.encoder_window import FULL_WINDOW_SECONDS, set_encoder_window, window_frames
from pyro_blora.evaluation import EvalOptions, EvalSet, evaluate_whisper
from pyro_blora.guide import build_guide
from pyro_blora.inference import posterior_mean_model, token_nll
from pyro_blora.injection import find_target_modules
from pyro_blora.model import BLoRAWhisper, wrap_whisper
from pyro_blora.objective import ElboTerms
from pyro_blora.posterior import load_posterior, save_posterior
from pyro_blora.recompute import gradient_checkpointing
from pyro_blora.training import (
    Optimization,
    RunFolder,
    TrainResult,
    batch_order,
    make_batch,
    run_steps,
    train,
)
from pyro_blora.weights import load_whisper

__all__ = ["METHODS", "TrainingData", "load_training_data", "run_training", "load_run_model", "read_run_config"]

METHODS = ("blora", "lora", "map", "full")


@dataclass
class TrainingData:
    """A prepared training split and how to batch it."""

    dataset: PreparedSpeechDataset
    collate: SpeechCollator
    source: str
    split: str

    def __len__(self) -> int:
        return len(self.dataset)


def load_training_data(source: str | Path, processor, split: str = "train", cache_dir: str | Path | None = None,
                       limit: int | None = None) -> TrainingData:
    """A split of any source :func:`~pyro_blora.data.load_speech_dataset` reads (e.g. a testbed domain folder)."""
    rows = load_speech_dataset(source, split=split)
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    prepared, _ = prepare_dataset(rows, processor, cache_dir=cache_dir)
    collate = SpeechCollator(decoder_start_token_id(processor.tokenizer))
    return TrainingData(PreparedSpeechDataset(prepared), collate, str(source), split)


def _curve(sets: Mapping[str, EvalSet] | None, options: EvalOptions, processor,
           model_for_eval: Callable[[], Any]) -> Callable[[], dict[str, float]] | None:
    """Log fields ``<domain>/ce``, ``<domain>/error_rate`` (and ``/language_id``) of the model as trained so far."""
    if not sets:
        return None

    def evaluate() -> dict[str, float]:
        with model_for_eval() as whisper:
            results = evaluate_whisper(whisper, processor, sets, replace(options, progress=False))
        return {f"{domain}/{metric}": value for domain, entry in results.items()
                for metric, value in entry.items() if metric in ("ce", "error_rate", "language_id")}

    return evaluate


class _TrainableState:
    """The trainable tensors of a module as a checkpointable state (frozen weights are not saved)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        params = dict(self.module.named_parameters())
        for name, value in state.items():
            params[name].copy_(value)


def _teacher_forced_loss(whisper: WhisperForConditionalGeneration, batch: Mapping) -> ElboTerms:
    """Mean token cross-entropy: the NLL term of the other methods' objective, with no KL."""
    labels = batch["labels"]
    cfg = whisper.config
    decoder_input_ids = shift_tokens_right(labels, cfg.pad_token_id, cfg.decoder_start_token_id)
    logits = whisper(input_features=batch["input_features"], decoder_input_ids=decoder_input_ids).logits
    nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100)
    num_tokens = int((labels != -100).sum())
    return ElboTerms(loss=nll, nll=nll, kl=torch.zeros(()), num_tokens=num_tokens, weight=float(num_tokens))


def _fingerprint(method: str, model_source: str, data: TrainingData, blora_config: BLoRAConfig,
                 train_config: TrainConfig, extra: Mapping[str, Any]) -> dict[str, Any]:
    run = {"method": method, "model_source": str(model_source), "train_data": data.source,
           "train_split": data.split, "train_utterances": len(data), "seed": train_config.seed, **extra}
    return {"blora": blora_config.to_dict(), "train": train_config.to_dict(), "run": run}


def run_training(
    method: str,
    model_source: str | Path,
    data: TrainingData,
    out_dir: str | Path,
    blora_config: BLoRAConfig = BLoRAConfig(),
    train_config: TrainConfig = TrainConfig(),
    *,
    whisper_and_processor: tuple[WhisperForConditionalGeneration, Any] | None = None,
    curve_sets: Mapping[str, EvalSet] | None = None,
    curve_options: EvalOptions = EvalOptions(decode_limit=8),
    resume: bool = False,
    run_info: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
) -> TrainResult:
    """Train ``method`` from ``model_source`` on ``data`` into the run folder ``out_dir``.

    ``blora_config`` gives the adapter (targets, rank, alpha) for blora, map and lora, and the prior
    for blora and map. With ``train_config.eval_every`` the ``curve_sets`` are scored every that many
    steps (teacher-forced CE on all, greedy error on ``curve_options.decode_limit`` utterances) and
    the scores go into that step's log record. ``whisper_and_processor`` reuses an already loaded
    base model (it is modified in place). ``device`` defaults to this process's GPU when there is one.

    Launched by torchrun (``torchrun --nproc-per-node K -m pyro_blora.cli train ...``) it trains
    data-parallel: each process scores its share of every batch and rank 0 writes the run folder
    (gloo on CPUs, NCCL on GPUs; see :mod:`pyro_blora.distributed`).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    device = torch.device(device) if device is not None else distributed.default_device()
    with distributed.distributed_session(device):
        return _run_training(method, model_source, data, out_dir, blora_config, train_config, device,
                             whisper_and_processor, curve_sets, curve_options, resume, run_info)


def _run_training(method, model_source, data: TrainingData, out_dir, blora_config: BLoRAConfig,
                  train_config: TrainConfig, device: torch.device, whisper_and_processor, curve_sets,
                  curve_options, resume, run_info) -> TrainResult:
    whisper, processor = whisper_and_processor or load_whisper(model_source)
    set_encoder_window(whisper, train_config.encoder_window_seconds)
    data = replace(data, collate=replace(data.collate, n_frames=window_frames(train_config.encoder_window_seconds)))
    whisper.to(device)
    context = distributed.current()
    out = Path(out_dir)
    fingerprint = _fingerprint(method, str(model_source), data, blora_config, train_config, dict(run_info or {}))
    torch.manual_seed(train_config.seed)
    pyro.set_rng_seed(train_config.seed)
    if method in ("blora", "map"):
        model = wrap_whisper(whisper, blora_config)
        guide = build_guide(model, "normal" if method == "blora" else "delta")
        evaluate = _curve(curve_sets, curve_options, processor, lambda: _means_held(model, guide))
        result = train(model, guide, data.dataset, data.collate, train_config, run_dir=out, resume=resume,
                       run_info=fingerprint["run"], evaluate=evaluate)
        if context.is_main:
            save_posterior(out / "posterior", model, guide, metadata={"base_model": str(model_source), "method": method})
        return result
    return _train_plain(method, whisper, processor, data, out, blora_config, train_config, fingerprint,
                        curve_sets, curve_options, resume)


@contextmanager
def _means_held(model: BLoRAWhisper, guide) -> Iterator[WhisperForConditionalGeneration]:
    """The BLoRA model's Whisper with the guide's means held in the adapters."""
    with model.hold_adapters(guide.means()):
        yield model.whisper


def _train_plain(method, whisper, processor, data: TrainingData, out: Path, blora_config: BLoRAConfig,
                 train_config: TrainConfig, fingerprint, curve_sets, curve_options, resume) -> TrainResult:
    """LoRA (peft) or full fine-tuning with the shared loop."""
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = find_target_modules(whisper, blora_config.target_modules)
        lora = LoraConfig(r=blora_config.rank, lora_alpha=blora_config.scaling * blora_config.rank,
                          target_modules=targets, lora_dropout=0.0)
        trainable = get_peft_model(whisper, lora)  # injects into `whisper` in place
    else:
        fingerprint["blora"] = None
        for parameter in whisper.parameters():
            parameter.requires_grad_(True)
        trainable = whisper
    device = next(whisper.parameters()).device
    context = distributed.current()
    run = context.on_main(lambda: RunFolder(out, fingerprint, resume, train_config.keep_checkpoints))
    eval_batches = [make_batch(data.dataset, data.collate,
                               batch_order(len(data), train_config.batch_size, train_config.seed, 0), device)]
    curve = _curve(curve_sets, curve_options, processor, lambda: nullcontext(whisper))

    def periodic_eval() -> dict[str, float]:
        fields = {"eval_nll": token_nll(whisper, eval_batches)}
        if curve is not None:
            fields.update(curve())
        return fields

    params = [p for p in trainable.parameters() if p.requires_grad]
    optimization = Optimization(
        objective=lambda batch: _teacher_forced_loss(whisper, batch),
        stateful={"trainable": _TrainableState(trainable)},
        optimizer=torch.optim.Adam(params, lr=train_config.lr),
        config=train_config,
        evaluate=periodic_eval,
        failure_hint=f"Likely cause: a learning rate too high ({train_config.lr}).",
        desc=method,
    )
    result = TrainResult(run_dir=out)
    state = context.on_main(run.latest_state)
    start = 0
    if state is not None:
        start = optimization.restore(state)
        result.history, result.base_nll = state["history"], state["base_nll"]
    else:
        result.base_nll = token_nll(whisper, eval_batches)
    whisper.eval()  # dropout off, as in SVI
    with gradient_checkpointing(whisper) if train_config.gradient_checkpointing else nullcontext():
        run_steps(optimization, data.dataset, data.collate, device, result.history, start, run,
                  extra_state={"base_nll": result.base_nll})
    result.final_nll = token_nll(whisper, eval_batches)
    if not context.is_main:
        return result
    if method == "lora":
        trainable.save_pretrained(str(out / "adapter"))
    else:
        whisper.save_pretrained(str(out / "model"))
        processor.save_pretrained(str(out / "model"))
    run.write_result({k: v for k, v in vars(result).items() if k != "history"})
    return result


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder: it has no config.json (train one with `pyro-blora train`)")
    return json.loads(path.read_text())


def load_run_model(source: str | Path) -> tuple[WhisperForConditionalGeneration, Any, str]:
    """A plain Whisper for evaluation, its processor and a description: a run folder (posterior mean,
    merged adapter, or fully fine-tuned weights) or any model :func:`~pyro_blora.weights.load_whisper` takes."""
    folder = Path(source)
    if not (folder / "config.json").is_file() or not (folder / "log.jsonl").exists():
        whisper, processor = load_whisper(source)
        return whisper, processor, f"model {source}"
    config = read_run_config(folder)
    run = config["run"]
    method, base = run["method"], run["model_source"]
    window = (config.get("train") or {}).get("encoder_window_seconds", FULL_WINDOW_SECONDS)
    if method == "full":
        if not (folder / "model").is_dir():
            raise FileNotFoundError(f"{folder} has no model/ folder: the full fine-tuning run has not finished")
        whisper, processor = load_whisper(folder / "model")
        return whisper, processor, f"{method} run {folder.name}"
    whisper, processor = load_whisper(base)
    set_encoder_window(whisper, window)  # the window the run was trained with
    if method == "lora":
        from peft import PeftModel

        if not (folder / "adapter").is_dir():
            raise FileNotFoundError(f"{folder} has no adapter/ folder: the LoRA run has not finished")
        merged = PeftModel.from_pretrained(whisper, str(folder / "adapter")).merge_and_unload()
        return merged.eval(), processor, f"{method} run {folder.name}"
    if not (folder / "posterior").is_dir():
        raise FileNotFoundError(f"{folder} has no posterior/ folder: the {method} run has not finished")
    model, guide = load_posterior(folder / "posterior", whisper)
    return posterior_mean_model(model, guide), processor, f"{method} run {folder.name} (posterior mean)"
