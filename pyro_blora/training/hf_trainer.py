"""BLoRA inside the Hugging Face Trainer: a ``Seq2SeqTrainer`` whose loss is the beta-ELBO of ``pyro-blora train``.

A Whisper fine-tuning script built on ``Seq2SeqTrainer`` keeps its arguments, collator, loggers,
checkpoint rotation and launcher (``torchrun``, ``accelerate launch``); :class:`BLoRATrainer` swaps
the loss. It calls the functions :func:`pyro_blora.training.svi.train` calls (the ELBO's scaling,
the objective under weight noise, the Adam groups with the scales' learning rate, the warm-up +
cosine schedule, the batch order), so the two paths do not keep two copies of the objective.

It lives on the training floor, not beside the other integrations in ``interop/``, because those
functions do: ``interop`` sits below ``training`` and may not import it.

What it writes into ``args.output_dir`` is a run folder (:mod:`pyro_blora.runs`): ``config.json``,
``log.jsonl``, ``posterior/`` and, after ``train()``, ``result.json``; so ``transcribe --posterior``,
``evaluate``, ``export-posterior`` and ``inspect`` read it as they read a ``pyro-blora train`` run.
Every Trainer checkpoint (``checkpoint-N/``) holds the guide as a posterior folder beside the
Trainer's optimizer, scheduler and RNG states, which is what ``train(resume_from_checkpoint=...)`` reads.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator, Mapping

import pyro
import torch
from safetensors.torch import load_file
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

from pyro_blora.config import TrainConfig
from pyro_blora.model.guide import BLoRAGuide, build_guide
from pyro_blora.model.recompute import gradient_checkpointing
from pyro_blora.model.whisper import BLoRAWhisper
from pyro_blora.model.objective import elbo_scaling
from pyro_blora.posterior import save_posterior
from pyro_blora.predict.monte_carlo import posterior_mean_model
from pyro_blora.runs import RunFolder
from pyro_blora.training.loop import batch_order, count_label_tokens, lr_schedule, make_optimizer
from pyro_blora.training.svi import noisy_elbo_terms, svi_parameter_groups, validated_first_step

__all__ = ["MERGED_FOLDER", "POSTERIOR_FOLDER", "BLoRATrainer", "ElboModule", "StepOrderSampler",
           "train_config_from_arguments"]

POSTERIOR_FOLDER = "posterior"  # the run folder's (runs.WEIGHT_FOLDERS["blora"]) and each checkpoint's
MERGED_FOLDER = "merged"  # save_model's plain transformers Whisper with the posterior mean merged in


def _global_batch(args: Seq2SeqTrainingArguments) -> int:
    return args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps


def _from_arguments(args: Seq2SeqTrainingArguments) -> dict[str, Any]:
    """The TrainConfig fields the Trainer's arguments decide."""
    return {
        "steps": args.max_steps,
        "batch_size": _global_batch(args),
        "lr": args.learning_rate,
        "warmup_steps": args.get_warmup_steps(args.max_steps),
        "max_grad_norm": args.max_grad_norm or None,
        "weight_decay": args.weight_decay,
        "precision": "bf16" if args.bf16 else "fp32",
        "gradient_checkpointing": bool(args.gradient_checkpointing or args.activation_checkpointing),
        "seed": args.seed,
        "progress": not args.disable_tqdm,
    }


def train_config_from_arguments(args: Seq2SeqTrainingArguments, options: TrainConfig | None = None) -> TrainConfig:
    """The :class:`TrainConfig` a Trainer run trains with: steps, batch, learning rate, warm-up,
    clipping, weight decay, precision, recomputation and seed from ``args``; the BLoRA-only options
    (scales' learning rate, final learning rate, particles, estimator, weight noise) from ``options``.

    An ``options`` field that the arguments decide is refused when it was set (differs from
    TrainConfig's default) to another value: one setting, one place."""
    if args.max_steps is None or args.max_steps <= 0:
        raise ValueError("BLoRATrainer needs max_steps in the training arguments (e.g. max_steps=4000): the beta-ELBO's "
                         "warm-up + cosine schedule is counted in optimiser steps, as in pyro-blora train")
    if args.fp16:
        raise ValueError("fp16 is not supported: the ELBO is trained in float32 or under bfloat16 autocast, as in "
                         "pyro-blora train; use bf16=True instead")
    decided = _from_arguments(args)
    options = options or TrainConfig()
    defaults = TrainConfig()
    for name, value in decided.items():
        given = getattr(options, name)
        if name != "progress" and given != getattr(defaults, name) and given != value:
            raise ValueError(
                f"train_config.{name}={given!r} but the training arguments give {value!r}; the Trainer's arguments "
                f"decide {name}: set it there, or leave train_config.{name} at its default"
            )
    config = options.replace(**decided)
    if config.gradient_checkpointing and config.weight_noise != "shared":
        raise ValueError(f"gradient checkpointing recomputes layers with one adapter draw per batch, which "
                         f"weight_noise={config.weight_noise!r} does not make; turn one of them off")
    return config


class StepOrderSampler(torch.utils.data.Sampler[int]):
    """The dataset positions of every step's global batch in ``pyro-blora train``'s order
    (:func:`~pyro_blora.training.loop.batch_order`), one step after another.

    The Trainer cuts it into per-device batches: with ``world_size`` processes and no accumulation,
    process r gets the r-th contiguous share of each global batch, as the library's data parallelism
    does; a resumed run skips whole steps and continues on the same utterances."""

    def __init__(self, num_items: int, batch_size: int, seed: int, steps: int) -> None:
        if num_items < batch_size:
            raise ValueError(f"the training set has {num_items} utterances, fewer than one global batch of {batch_size} "
                             "(per-device batch x processes x accumulation steps); lower per_device_train_batch_size")
        self.num_items, self.batch_size, self.seed, self.steps = num_items, batch_size, seed, steps

    def __iter__(self) -> Iterator[int]:
        for step in range(self.steps):
            yield from batch_order(self.num_items, self.batch_size, self.seed, step).tolist()

    def __len__(self) -> int:
        return self.steps * self.batch_size


class ElboModule(torch.nn.Module):
    """The Trainer's model: the Pyro Whisper and its guide in one module whose forward is the beta-ELBO.

    One module, so that DDP (or DeepSpeed) sees the guide's parameters (ordinary ``nn.Parameter``s of
    a module-local param store) and reduces their gradients as it does any model's. Its forward names
    the collator's keys so that the Trainer's column filter keeps them."""

    def __init__(self, model: BLoRAWhisper, guide: BLoRAGuide, config: TrainConfig) -> None:
        super().__init__()
        self.blora = model
        self.guide = guide
        self.train_config = config
        self.objective = validated_first_step(lambda batch: noisy_elbo_terms(model, guide, batch, config))

    def forward(self, input_features: torch.Tensor, labels: torch.Tensor, index: torch.Tensor | None = None,
                id: Any = None, ids: Any = None) -> dict[str, torch.Tensor]:  # noqa: A002 - the dataset's column
        batch = {"input_features": input_features, "labels": labels}
        if index is not None:
            batch["index"] = index
        terms = self.objective(batch)
        return {"loss": terms.loss, "nll": torch.as_tensor(terms.nll).detach(), "kl": torch.as_tensor(terms.kl).detach()}

    def train(self, mode: bool = True) -> "ElboModule":
        """Dropout stays off: the randomness of SVI is the adapter noise alone, as in ``pyro-blora train``."""
        super().train(mode)
        self.blora.train(False)
        return self

    def activation_checkpointing_enable(self, **kwargs: Any) -> None:  # noqa: ARG002
        """Nothing to do here: :meth:`BLoRATrainer.train` recomputes layers with the library's own
        checkpointing, which reuses each adapter draw (Hugging Face's would draw the adapters again)."""


class BLoRATrainer(Seq2SeqTrainer):
    """``Seq2SeqTrainer`` training a BLoRA posterior with the beta-ELBO of ``pyro-blora train``.

    ``model`` is a :class:`BLoRAWhisper` (``pyro_blora.wrap_whisper``); ``guide`` defaults to
    ``build_guide(model, seed=args.seed)``. ``train_config`` gives the BLoRA-only options
    (:func:`train_config_from_arguments`). ``model_source`` names the base model in the run folder and the
    posterior's metadata (a bundled name, folder or hub id; default: the Whisper's ``name_or_path``).
    ``args.max_steps`` is required; the learning-rate schedule is the library's (``lr_scheduler_type``
    is not used). Other keyword arguments go to ``Seq2SeqTrainer``.
    """

    def __init__(self, model: BLoRAWhisper, args: Seq2SeqTrainingArguments, train_dataset, data_collator, *,
                 guide: BLoRAGuide | None = None, train_config: TrainConfig | None = None,
                 model_source: str | Path | None = None, **kwargs: Any) -> None:
        if not isinstance(model, BLoRAWhisper):
            raise TypeError(f"BLoRATrainer trains a BLoRAWhisper, got {type(model).__name__}; wrap the Whisper first: "
                            "model = pyro_blora.wrap_whisper(whisper, pyro_blora.BLoRAConfig(...))")
        if train_dataset is None or data_collator is None:
            raise ValueError("BLoRATrainer needs train_dataset and data_collator (e.g. PreparedSpeechDataset(prepared) "
                             "and SpeechCollator(decoder_start_token_id(tokenizer))): the ELBO is scaled by their size")
        if args.fsdp or _zero_stage(args) == 3:
            raise ValueError("FSDP and DeepSpeed ZeRO-3 shard the guide's parameters, which the posterior folder is "
                             "written from whole; use DDP or DeepSpeed ZeRO-2 (see README: From a Hugging Face Trainer script)")
        if args.eval_strategy != "no" or kwargs.get("eval_dataset") is not None:
            raise ValueError("BLoRATrainer does not evaluate during training (its model decodes through the posterior, "
                             "not generate()); set eval_strategy='no' and score the run folder afterwards with "
                             "`pyro-blora evaluate <output_dir>`")
        self.train_config = train_config_from_arguments(args, train_config)
        source = model_source or model.whisper.config.name_or_path
        if not source:
            raise ValueError("the base Whisper has no name_or_path; pass model_source= (a bundled name, a folder saved "
                             "with save_pretrained, or a hub id) so the posterior folder can name its base model")
        self.model_source = str(source)
        self.blora = model
        self.guide = guide if guide is not None else build_guide(model, seed=args.seed)
        StepOrderSampler(len(train_dataset), self.train_config.batch_size, args.seed, args.max_steps)  # checks the size
        num_tokens = count_label_tokens(train_dataset, data_collator)
        model.configure_objective(elbo_scaling(model.config, len(train_dataset), num_tokens, model.num_adapter_parameters()))
        self.fingerprint = {
            "blora": model.config.to_dict(), "train": self.train_config.to_dict(),
            "run": {"method": "blora", "model_source": self.model_source, "trainer": "transformers.Seq2SeqTrainer",
                    "train_utterances": len(train_dataset), "seed": self.train_config.seed},
        }
        if args.ddp_find_unused_parameters is None:  # every guide parameter has a gradient at every step
            args.ddp_find_unused_parameters = False
        self._seed_first_step = False
        self._terms = torch.zeros(3, dtype=torch.float64)
        self._run: RunFolder | None = None
        self._log_rewritten = False
        super().__init__(model=ElboModule(model, self.guide, self.train_config), args=args, train_dataset=train_dataset,
                         data_collator=data_collator, **kwargs)

    # ------------------------------------------------------------------ what is trained, and how
    def _get_train_sampler(self, train_dataset=None) -> StepOrderSampler:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return StepOrderSampler(len(dataset), self.train_config.batch_size, self.train_config.seed, self.args.max_steps)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = make_optimizer(svi_parameter_groups(self.guide, self.train_config), self.train_config)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None) -> torch.optim.lr_scheduler.LRScheduler:
        if self.lr_scheduler is None:
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer,
                                                                  lr_schedule(self.train_config))
        return self.lr_scheduler

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        if self._seed_first_step:  # where pyro-blora train seeds: right before its first step
            pyro.set_rng_seed(self.train_config.seed)
            self._seed_first_step = False
        outputs = model(**inputs)
        if model.training:  # (nll, kl, optimiser steps) since the last log
            one = torch.ones((), device=outputs["nll"].device)
            parts = torch.stack([outputs["nll"], outputs["kl"], one]).double().cpu()
            self._terms += parts / self.current_gradient_accumulation_steps
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """Train, then write the posterior and ``result.json`` into ``args.output_dir`` (a finished run folder)."""
        fresh = resume_from_checkpoint is None or resume_from_checkpoint is False
        self._seed_first_step = fresh
        self._log_rewritten = False
        if self.args.should_save:
            self._run = RunFolder(self.args.output_dir, self.fingerprint, resume=not fresh,
                                  keep=self.train_config.keep_checkpoints)
        recompute = gradient_checkpointing(self.blora.whisper, self.blora.adapters().values()) \
            if self.train_config.gradient_checkpointing else nullcontext()
        with recompute:
            output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        if self.args.should_save and self.state.global_step >= self.args.max_steps:
            self._save_posterior(Path(self.args.output_dir))
            self._run.write_result({"steps": self.state.global_step, "final": self._record(self.state.log_history),
                                    "run_dir": str(self.args.output_dir)})
        return output

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log, with the ELBO's two terms (averaged like its loss) on training steps;
        each training record also goes into the run folder's ``log.jsonl``."""
        step_record = "loss" in logs
        if step_record:
            nll, kl, steps = self.accelerator.reduce(self._terms.to(self.args.device), reduction="mean").tolist()
            logs = {**logs, "nll": nll / max(steps, 1), "kl": kl / max(steps, 1)}
            self._terms.zero_()
        super().log(logs, start_time)
        if step_record and self._run is not None:
            if self._log_rewritten:
                self._run.log(self._record(self.state.log_history))
            else:  # a resumed run may have logged steps after its checkpoint
                self._run.rewrite_log([self._record([r]) for r in self.state.log_history if "loss" in r])
                self._log_rewritten = True

    @staticmethod
    def _record(history: list[Mapping[str, Any]]) -> dict[str, Any]:
        """The newest training record of ``history`` in log.jsonl's fields."""
        last = next((r for r in reversed(history) if "loss" in r), {})
        return {"step": last.get("step"), "loss": last.get("loss"), "nll": last.get("nll"), "kl": last.get("kl"),
                "grad_norm": last.get("grad_norm"), "lr": last.get("learning_rate")}

    # ------------------------------------------------------------------ saving and resuming
    def _metadata(self) -> dict[str, Any]:
        return {"base_model": self.model_source, "method": "blora",
                "encoder_window_seconds": self.train_config.encoder_window_seconds}

    def _save_posterior(self, folder: Path) -> Path:
        return save_posterior(folder / POSTERIOR_FOLDER, self.blora, self.guide, metadata=self._metadata())

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``<dir>/posterior`` (a posterior folder); called by a user, also ``<dir>/merged``: the posterior
        mean merged into a plain Whisper (with the processing class, if the Trainer has one)."""
        folder = Path(output_dir or self.args.output_dir)
        if self.args.should_save:
            self._save_posterior(folder)
            if not _internal_call:
                posterior_mean_model(self.blora, self.guide).save_pretrained(folder / MERGED_FOLDER)
                if self.processing_class is not None:
                    self.processing_class.save_pretrained(folder / MERGED_FOLDER)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _load_guide(self, checkpoint: str | Path) -> None:
        path = Path(checkpoint) / POSTERIOR_FOLDER / "posterior.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{checkpoint} holds no {POSTERIOR_FOLDER}/posterior.safetensors: it was not written "
                                    "by BLoRATrainer; resume from one of its checkpoint-N folders")
        state = load_file(str(path), device=str(next(self.guide.parameters()).device))
        self.guide.load_state_dict(state, strict=True)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self._load_guide(resume_from_checkpoint)


def _zero_stage(args: Seq2SeqTrainingArguments) -> int | None:
    """The DeepSpeed ZeRO stage the arguments configure (None without DeepSpeed)."""
    plugin = getattr(args, "hf_deepspeed_config", None)
    if plugin is None:
        return None
    stage = plugin.config.get("zero_optimization", {}).get("stage")
    return None if stage is None else int(stage)
