"""Speed options: gradient checkpointing gives the gradients of the run without it; the encoder
window cuts the model, refuses longer clips and is honoured again when a run is evaluated."""

from __future__ import annotations

import json

import pyro
import pytest
import torch
from pyro.infer import is_validation_enabled

from pyro_blora import BLoRAConfig, TrainConfig, build_guide, train, wrap_whisper
from pyro_blora.data import SpeechCollator
from pyro_blora.model.encoder_window import encoder_input_frames, set_encoder_window, window_frames
from pyro_blora.model.objective import elbo_scaling, elbo_terms
from pyro_blora.model.recompute import gradient_checkpointing
from pyro_blora.training import svi
from tests.tiny import FRAMES, TinyTask, collate, tiny_whisper


def blora_and_batch():
    model = wrap_whisper(tiny_whisper(0), BLoRAConfig(rank=4))
    pyro.set_rng_seed(0)
    guide = build_guide(model)
    model.configure_objective(elbo_scaling(model.config, 8, 40, model.num_adapter_parameters()))
    batch = collate([TinyTask(8)[i] for i in range(3)])
    batch["index"] = torch.arange(3)
    return model, guide, batch


def gradients(model, guide, batch, recompute) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of one ELBO estimate (fixed seed) and how many times adapters ran."""
    calls = []
    hooks = [a.register_forward_hook(lambda *_: calls.append(1)) for a in model.adapters().values()]
    guide.zero_grad()
    pyro.set_rng_seed(1)
    with recompute:
        elbo_terms(model, guide, batch).loss.backward()
    for hook in hooks:
        hook.remove()
    return {n: p.grad.clone() for n, p in guide.named_parameters()}, len(calls)


def test_gradient_checkpointing_reuses_each_adapter_draw_and_gives_the_same_gradients():
    model, guide, batch = blora_and_batch()
    plain, plain_calls = gradients(model, guide, batch, torch.enable_grad())
    checkpointed, calls = gradients(model, guide, batch, gradient_checkpointing(model.whisper, model.adapters().values()))
    assert calls == 2 * plain_calls  # every layer was recomputed in the backward pass
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=0, msg=name)
    # without handing over the draws the recomputation samples new adapters: another computation
    try:
        redrawn, _ = gradients(model, guide, batch, gradient_checkpointing(model.whisper))
    except torch.utils.checkpoint.CheckpointError:
        pass  # torch noticed
    else:
        assert any(not torch.allclose(redrawn[n], plain[n]) for n in plain)
    assert not model.whisper.model.encoder.gradient_checkpointing  # switched off on leaving


def test_training_with_gradient_checkpointing_reaches_the_same_posterior():
    config = TrainConfig(steps=3, batch_size=2, lr=3e-2, warmup_steps=1, progress=False)
    finals = []
    for recompute in (False, True):
        model = wrap_whisper(tiny_whisper(0), BLoRAConfig(rank=4))
        pyro.set_rng_seed(0)
        guide = build_guide(model)
        train(model, guide, TinyTask(8), collate, config.replace(gradient_checkpointing=recompute))
        finals.append(guide.means())
    for name in finals[0]:
        torch.testing.assert_close(finals[1][name], finals[0][name], msg=name)


def test_encoder_window_cuts_the_encoder_and_refuses_longer_clips():
    assert window_frames(10) == 1000 and window_frames(30) == 3000
    with pytest.raises(ValueError, match="multiple of 0.02 s"):
        window_frames(10.005)
    with pytest.raises(ValueError, match=r"\(0, 30\]"):
        window_frames(40)
    whisper = tiny_whisper(0)
    positions = whisper.model.encoder.embed_positions.weight[:30].clone()
    set_encoder_window(whisper, 0.6)  # the tiny model's full window is 1 s (100 frames)
    assert encoder_input_frames(whisper) == 60
    torch.testing.assert_close(whisper.model.encoder.embed_positions.weight, positions)
    features = torch.randn(2, 16, 60)
    whisper(input_features=features, decoder_input_ids=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="only shorten"):
        set_encoder_window(whisper, 0.8)
    collator = SpeechCollator(decoder_start_token_id=1, n_frames=60)
    item = {"input_features": torch.zeros(FRAMES, 16).numpy(), "labels": [1, 5, 2], "index": 0, "id": "long"}
    with pytest.raises(ValueError, match=r"'long' is 1.00 s long .* at most 0.60 s"):
        collator([item])


def test_training_refuses_a_window_the_model_was_not_cut_to():
    model = wrap_whisper(tiny_whisper(0), BLoRAConfig(rank=4))
    with pytest.raises(ValueError, match="set_encoder_window"):
        train(model, build_guide(model), TinyTask(8), collate, TrainConfig(steps=1, encoder_window_seconds=10))


def test_a_run_is_evaluated_with_the_window_it_was_trained_with(tmp_path):
    from pyro_blora.data.training_data import load_training_data
    from pyro_blora.runs import load_run_model
    from pyro_blora.training.methods import run_training
    from pyro_blora.base_models.loading import load_processor
    from tests.experiment_fixtures import fake_testbed, small_whisper_folder

    model = small_whisper_folder(tmp_path / "model")
    data = load_training_data(fake_testbed(tmp_path / "testbed") / "zh-en", load_processor(model))
    config = TrainConfig(steps=1, batch_size=2, warmup_steps=0, progress=False, encoder_window_seconds=10)
    run_training("lora", model, data, tmp_path / "run", BLoRAConfig(rank=2), config)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["encoder_window_seconds"] == 10
    whisper, _, _ = load_run_model(tmp_path / "run")
    assert encoder_input_frames(whisper) == 1000


def test_only_the_first_svi_step_runs_under_pyro_validation(monkeypatch):
    """Pyro's per-site checks run on the first step of a training call (a resumed run's too) and
    not after; with validation switched off by the user they never run."""
    seen = []
    real = svi.noisy_elbo_terms

    def recording(*args, **kwargs):
        seen.append(is_validation_enabled())
        return real(*args, **kwargs)
    monkeypatch.setattr(svi, "noisy_elbo_terms", recording)
    model, guide, _ = blora_and_batch()
    config = TrainConfig(steps=3, batch_size=2, progress=False, eval_every=0)
    train(model, guide, TinyTask(8), collate, config)
    assert seen == [True, False, False]
    assert is_validation_enabled()  # restored after every step
    seen.clear()
    with pyro.validation_enabled(False):
        train(model, guide, TinyTask(8), collate, config)
    assert seen == [False, False, False]
