"""BLoRATrainer: the Hugging Face Trainer with the beta-ELBO of ``pyro-blora train``.

Same seed, same data, same first loss and the same posterior after three steps as the library's
own loop; a posterior folder the commands read; an exact resume from the Trainer's checkpoints;
and two gloo processes giving the first step of one process on the combined batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch
from transformers import Seq2SeqTrainingArguments, TrainerCallback
from typer.testing import CliRunner

from pyro_blora import BLoRAConfig, TrainConfig, build_guide, train, wrap_whisper
from pyro_blora.training.hf_trainer import BLoRATrainer, train_config_from_arguments
from tests.test_distributed import free_port
from tests.test_transcribe import real_sized_tiny  # noqa: F401 - a fixture: tiny.en's vocabulary, 30 s input
from tests.tiny import TinyTask, collate, tiny_whisper
from tests.trainer_subprocess import first_step

ROOT = Path(__file__).resolve().parent.parent
STEPS = 3
LIBRARY = TrainConfig(steps=STEPS, lr=3e-2, batch_size=2, warmup_steps=2, checkpoint_every=1, progress=False)


def arguments(out: Path, **changes) -> Seq2SeqTrainingArguments:
    """The Trainer's arguments for LIBRARY's settings, a checkpoint every step."""
    values = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=LIBRARY.batch_size,
                  learning_rate=LIBRARY.lr, warmup_steps=LIBRARY.warmup_steps, seed=LIBRARY.seed, logging_steps=1,
                  save_steps=1, report_to="none", disable_tqdm=True, use_cpu=True)
    return Seq2SeqTrainingArguments(**{**values, **changes})


def tiny_trainer(out: Path, guide_seed: int = 0, **changes) -> BLoRATrainer:
    model = wrap_whisper(tiny_whisper(0), BLoRAConfig(rank=4))
    guide = build_guide(model, seed=guide_seed)
    return BLoRATrainer(model, arguments(out, **changes), TinyTask(8), collate, guide=guide, model_source="tiny")


def losses(history: list[dict]) -> list[float]:
    return [record["loss"] for record in history if "loss" in record]


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    """An uninterrupted 3-step Trainer run: (trainer, its output folder)."""
    pyro.clear_param_store()
    out = tmp_path_factory.mktemp("trainer") / "run"
    trainer = tiny_trainer(out)
    trainer.train()
    return trainer, out


def test_the_trainer_takes_the_steps_of_pyro_blora_train(trainer_run, tmp_path):
    trainer, out = trainer_run
    model = wrap_whisper(tiny_whisper(0), BLoRAConfig(rank=4))
    guide = build_guide(model, seed=0)
    library = train(model, guide, TinyTask(8), collate, LIBRARY, run_dir=tmp_path / "library")
    assert losses(trainer.state.log_history)[0] == library.history[0]["loss"]
    torch.testing.assert_close(losses(trainer.state.log_history), losses(library.history), rtol=1e-6, atol=0)
    # Same objective, Adam groups, scales' learning rate, schedule and clipping: the same posterior.
    for name, value in guide.state_dict().items():
        torch.testing.assert_close(trainer.guide.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # The ELBO's two terms reach the Trainer's log and the run folder's log.jsonl.
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3]
    for record, reference in zip(logged, library.history):
        assert record["nll"] + record["kl"] == pytest.approx(record["loss"], rel=1e-5)
        assert record["kl"] == pytest.approx(reference["kl"], rel=1e-5)


class _StopAfter(TrainerCallback):
    """Ends training after ``step`` steps, as a killed job would after its checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ARG002
        control.should_training_stop = state.global_step >= self.step
        return control


def test_a_resumed_run_ends_at_the_posterior_of_an_uninterrupted_one(trainer_run, tmp_path):
    uninterrupted, _ = trainer_run
    out = tmp_path / "run"
    stopped = tiny_trainer(out)
    stopped.add_callback(_StopAfter(2))
    stopped.train()
    assert stopped.state.global_step == 2 and not (out / "result.json").exists()
    # A fresh process: another guide start, which the checkpoint's guide must replace.
    resumed = tiny_trainer(out, guide_seed=1)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == STEPS and (out / "result.json").is_file()
    for name, value in uninterrupted.guide.state_dict().items():
        torch.testing.assert_close(resumed.guide.state_dict()[name], value, rtol=0, atol=0, msg=name)
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in logged] == losses(uninterrupted.state.log_history)


def test_conflicting_settings_and_unwrapped_models_are_refused(tmp_path):
    args = arguments(tmp_path)
    assert train_config_from_arguments(args, TrainConfig(weight_noise="flipout")).lr == args.learning_rate
    with pytest.raises(ValueError, match="train_config.lr=0.5 but the training arguments give 0.03"):
        train_config_from_arguments(args, TrainConfig(lr=0.5))
    with pytest.raises(ValueError, match="needs max_steps"):
        train_config_from_arguments(arguments(tmp_path, max_steps=-1, num_train_epochs=1))
    with pytest.raises(ValueError, match="use bf16=True"):
        train_config_from_arguments(arguments(tmp_path, fp16=True))
    with pytest.raises(ValueError, match="pyro-blora evaluate"):
        BLoRATrainer(wrap_whisper(tiny_whisper(0), BLoRAConfig(rank=4)), arguments(tmp_path, eval_strategy="steps"),
                     TinyTask(8), collate, model_source="tiny")
    with pytest.raises(TypeError, match="wrap_whisper"):
        BLoRATrainer(tiny_whisper(0), args, TinyTask(8), collate)
    with pytest.raises(ValueError, match="model_source="):
        BLoRATrainer(wrap_whisper(tiny_whisper(0), BLoRAConfig(rank=4)), args, TinyTask(8), collate)


# ------------------------------------------------------------ the commands read what it writes
@pytest.fixture(scope="module")
def speech_run(real_sized_tiny, tmp_path_factory):
    """Three Trainer steps of a tiny random Whisper with tiny.en's vocabulary and input size on prepared
    speech data (PreparedSpeechDataset and SpeechCollator), then save_model: (output folder, audio folder)."""
    from pyro_blora import load_speech_dataset, load_whisper, prepare_dataset
    from pyro_blora.data import PreparedSpeechDataset, SpeechCollator, decoder_start_token_id

    _, _, processor, folder = real_sized_tiny
    prepared, _ = prepare_dataset(load_speech_dataset(folder / "manifest.csv"), processor)
    model = wrap_whisper(load_whisper(folder / "model")[0], BLoRAConfig(rank=2))
    out = tmp_path_factory.mktemp("speech") / "run"
    trainer = BLoRATrainer(model, arguments(out, save_steps=STEPS), PreparedSpeechDataset(prepared),
                           SpeechCollator(decoder_start_token_id(processor.tokenizer)),
                           model_source=str(folder / "model"), processing_class=processor)
    trainer.train()
    trainer.save_model()
    return out, folder / "audio"


def test_the_run_folder_loads_in_transcribe_export_evaluate_and_inspect(speech_run, tmp_path):
    from pyro_blora.cli import app
    from pyro_blora.posterior import read_posterior_tensors
    from pyro_blora.runs import finished, load_run_model

    run, audio = speech_run
    transcripts = tmp_path / "out.jsonl"
    done = CliRunner().invoke(app, ["transcribe", str(audio / "a.wav"), "--posterior", str(run / "posterior"),
                                    "--samples", "2", "--jsonl", str(transcripts)])
    assert done.exit_code == 0, done.output
    assert len(transcripts.read_text().splitlines()) == 1
    done = CliRunner().invoke(app, ["export-posterior", str(run / "posterior"), "--out", str(tmp_path / "export")])
    assert done.exit_code == 0, done.output
    tensors, header = read_posterior_tensors(tmp_path / "export")
    assert header["rank"] == 2 and len(tensors) == 4 * len(header["modules"])
    assert all((tensors[k] > 0).all() for k in tensors if k.endswith(".std"))
    # `evaluate` and `inspect` take the run folder: finished, and its model is the posterior mean.
    assert finished(run)
    whisper, _, description = load_run_model(run)
    merged = whisper.state_dict()
    saved = type(whisper).from_pretrained(run / "merged").state_dict()  # save_model's merged Whisper
    assert "posterior mean" in description and merged.keys() == saved.keys()
    for name in merged:
        torch.testing.assert_close(saved[name], merged[name], msg=name)
    done = CliRunner().invoke(app, ["inspect", str(run), "--out", str(tmp_path / "inspection")])
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "inspection" / "inspect.json").read_text())["scales"]


# ------------------------------------------------------------ data parallelism
def test_two_gloo_processes_match_one_process_on_the_combined_batch(tmp_path):
    """Each process scores 2 of the 4 utterances of the first batch; DDP averages the gradients."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "-m", "tests.trainer_subprocess", str(tmp_path / "two"),
               "--per-device-batch", "2"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    two = torch.load(tmp_path / "two" / "first_step.pt", weights_only=False)
    one = first_step(tmp_path / "one", per_device_batch=4)
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert one["grads"].keys() == two["grads"].keys()
    # Up to float32 summation order (4 utterances summed at once, or 2 + 2): 1e-6 on a gradient of norm ~3.
    for name in one["grads"]:
        torch.testing.assert_close(two["grads"][name], one["grads"][name], rtol=1e-5, atol=1e-6, msg=name)
