"""Interoperability: PEFT adapters in and out, plain posterior tensors, trackers, hub publishing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyro
import pytest
import torch
from transformers.models.whisper.modeling_whisper import shift_tokens_right

from pyro_blora import BLoRAConfig, TrainConfig, build_guide, posterior_mean_model, save_posterior, train, wrap_whisper
from pyro_blora.interop.peft import blora_config_from_peft, export_peft, import_peft, read_peft_adapter
from pyro_blora.posterior import export_posterior_tensors, read_posterior_tensors
from pyro_blora.interop.tracking import make_tracker
from pyro_blora.interop.hub import push_to_hub
from tests.tiny import FRAMES, MELS, SOT, TinyTask, collate, tiny_whisper

peft = pytest.importorskip("peft")

TARGETS = (r".*\.q_proj$", r".*\.v_proj$", r".*\.fc1$")
FAST = dict(lr=3e-2, batch_size=4, warmup_steps=2, progress=False, checkpoint_every=0)


def make(config: BLoRAConfig | None = None, seed: int = 0):
    model = wrap_whisper(tiny_whisper(seed), config or BLoRAConfig(rank=4))
    pyro.set_rng_seed(seed)
    return model, build_guide(model)


@pytest.fixture(scope="module")
def trained():
    """A briefly trained tiny BLoRA (module-scoped: the tests below only read it)."""
    pyro.clear_param_store()
    model, guide = make(BLoRAConfig(rank=4, target_modules=TARGETS))
    train(model, guide, TinyTask(8), collate, TrainConfig(steps=8, **FAST))
    return model, guide


def batch_of(task: TinyTask, idx=(0, 1, 2, 3)) -> dict:
    return collate([task[i] for i in idx])


def logits_of(whisper, batch):
    decoder_ids = shift_tokens_right(batch["labels"], whisper.config.pad_token_id, whisper.config.decoder_start_token_id)
    return whisper(input_features=batch["input_features"], decoder_input_ids=decoder_ids).logits


# ---------------------------------------------------------------- PEFT out
def test_peft_export_reproduces_the_merged_posterior_mean(trained, tmp_path):
    model, guide = trained
    export_peft(model, guide, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (4, 8, ["fc1", "q_proj", "v_proj"])
    batch = batch_of(TinyTask(8))
    expected = logits_of(posterior_mean_model(model, guide), batch)
    with torch.no_grad():
        peft_model = peft.PeftModel.from_pretrained(tiny_whisper(), str(tmp_path)).eval()
        got = logits_of(peft_model, batch)
    assert (got - expected).abs().max() < 1e-5
    assert (got - logits_of(tiny_whisper(), batch)).abs().max() > 1e-3  # the adapter does something


def test_peft_export_with_unusual_targets_uses_a_path_regex(tmp_path):
    targets = (r"model\.decoder\.layers\.0\.self_attn\.q_proj", r".*fc1")
    model, guide = make(BLoRAConfig(rank=2, alpha=3.0, target_modules=targets))
    export_peft(model, guide, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert isinstance(config["target_modules"], str)
    with torch.no_grad():
        wrapped = peft.PeftModel.from_pretrained(tiny_whisper(), str(tmp_path))
    lora_layers = {name for name, m in wrapped.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    assert {n.removeprefix("base_model.model.") for n in lora_layers} == set(read_peft_adapter(tmp_path).weights)
    assert len(lora_layers) == 1 + 4  # one q_proj, fc1 of 2 encoder + 2 decoder layers


def test_pruning_reports_fraction_and_change(trained, tmp_path):
    model, guide = trained
    task = TinyTask(8)
    report = export_peft(model, guide, tmp_path, prune_threshold=0.05, batches=[batch_of(task)])
    exported = read_peft_adapter(tmp_path).weights
    entries = torch.cat([t.flatten() for pair in exported.values() for t in pair])
    zeros = float((entries == 0).float().mean())
    assert 0 < report.pruned_fraction < 1
    assert abs(report.pruned_fraction - zeros) < 1e-6
    assert entries.abs()[entries != 0].min() >= 0.05
    assert report.max_logit_change > 0 and report.nll_change is not None
    assert json.loads((tmp_path / "pruning.json").read_text())["pruned_fraction"] == report.pruned_fraction
    # A zero threshold prunes nothing and changes nothing.
    same = export_peft(model, guide, tmp_path / "zero", prune_threshold=0.0, batches=[batch_of(task)])
    assert same.pruned_fraction == 0 and same.max_logit_change == 0 and same.nll_change == 0


# ---------------------------------------------------------------- PEFT in
def peft_lora(tmp_path, r=4, alpha=8, targets=("q_proj", "k_proj")):
    """A LoRA trained elsewhere: random non-zero A and B, saved by peft itself."""
    torch.manual_seed(1)
    wrapped = peft.get_peft_model(tiny_whisper(), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0))
    for name, parameter in wrapped.named_parameters():
        if "lora_" in name:
            parameter.data.normal_(0, 0.05)
    folder = tmp_path / "lora"
    wrapped.save_pretrained(str(folder))
    return folder


def test_peft_import_then_export_round_trips(tmp_path):
    folder = peft_lora(tmp_path, r=4, alpha=16)
    model, guide = make(blora_config_from_peft(folder, prior_scale=0.02))
    assert (model.config.rank, model.config.scaling, model.config.prior_scale) == (4, 4.0, 0.02)
    scales_before = guide.stddevs()
    import_peft(folder, model, guide)
    assert all(torch.equal(scales_before[s], v) for s, v in guide.stddevs().items())  # scales untouched
    export_peft(model, guide, tmp_path / "again")
    original, again = read_peft_adapter(folder).weights, read_peft_adapter(tmp_path / "again").weights
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k][i], again[k][i]) for k in original for i in (0, 1))


@pytest.mark.parametrize(
    "config, message",
    [
        (BLoRAConfig(rank=2), "rank r=4 but the BLoRAConfig has rank=2"),
        (BLoRAConfig(rank=4, alpha=4.0), "lora_alpha / r = 2 but the BLoRAConfig's alpha / rank is 1"),
        (BLoRAConfig(rank=4, target_modules=(r".*q_proj",)), "adapts other layers"),
    ],
)
def test_peft_import_refuses_a_misfit_with_the_fix(tmp_path, config, message):
    folder = peft_lora(tmp_path)
    model, guide = make(config)
    with pytest.raises(ValueError, match=message) as caught:
        import_peft(folder, model, guide)
    assert "blora_config_from_peft" in str(caught.value)


def test_peft_import_refuses_dora(tmp_path):
    folder = peft_lora(tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora=True"):
        read_peft_adapter(folder)


# ---------------------------------------------------------------- plain posterior tensors
def test_posterior_tensors_are_readable_without_pyro_or_torch(trained, tmp_path):
    model, guide = trained
    path = export_posterior_tensors(model, guide, tmp_path, metadata={"base_model": "tiny"})
    reader = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["pyro"] = None; sys.modules["torch"] = None  # importing either now fails
        from safetensors import safe_open
        from safetensors.numpy import load_file
        tensors = load_file({str(path)!r})
        with safe_open({str(path)!r}, framework="numpy") as f:
            header = f.metadata()
        print(json.dumps({{"header": header, "keys": sorted(tensors),
                           "min_std": float(min(t.min() for k, t in tensors.items() if k.endswith(".std")))}}))
        """
    )
    out = json.loads(subprocess.run([sys.executable, "-c", reader], check=True, capture_output=True, text=True).stdout)
    modules = json.loads(out["header"]["modules"])
    assert len(modules) == len(model.adapters()) and out["header"]["rank"] == "4"
    assert out["keys"] == sorted(f"{m}.lora_{x}.{s}" for m in modules for x in "AB" for s in ("mean", "std"))
    assert out["min_std"] > 0
    tensors, header = read_posterior_tensors(tmp_path)
    assert header["metadata"] == {"base_model": "tiny"} and header["scaling"] == 2.0
    means, stds = guide.means(), guide.stddevs()
    site = "whisper.model.encoder.layers.0.self_attn.q_proj.lora_B"
    key = "model.encoder.layers.0.self_attn.q_proj.lora_B"
    assert (tensors[f"{key}.mean"] == means[site].numpy()).all()
    assert (tensors[f"{key}.std"] == stds[site].numpy()).all()


def test_posterior_tensors_reader_refuses_other_files(trained, tmp_path):
    model, guide = trained
    save_posterior(tmp_path, model, guide)
    with pytest.raises(ValueError, match="load_posterior"):
        read_posterior_tensors(tmp_path / "posterior.safetensors")


# ---------------------------------------------------------------- experiment tracking
RUN_CONFIG = {"blora": BLoRAConfig(rank=4), "train": {"steps": 4, "lr": 3e-2}}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One short run logged to TensorBoard and MLflow at once: (model, result, run_dir)."""
    pyro.clear_param_store()
    run_dir = tmp_path_factory.mktemp("tracked")
    model, guide = make()
    trackers = [make_tracker(kind, run_dir, RUN_CONFIG, every=2) for kind in ("tensorboard", "mlflow")]
    config = TrainConfig(steps=4, eval_every=2, **FAST)
    result = train(model, guide, TinyTask(4), collate, config, callbacks=trackers)
    for tracker in trackers:
        with tracker:
            tracker.log_metrics({"eval/wer": 0.25, "eval/cer": 0.125}, step=4)
    return model, result, run_dir


@pytest.mark.slow  # the shared run and a fresh MLflow SQLite store take ~10-25 s
def test_tensorboard_events_hold_the_logged_scalars(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, result, run_dir = tracked
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    layers = {f"kl_layer/{path.removeprefix('whisper.')}" for path in model.adapters()}
    assert {"train/loss", "train/nll", "train/kl", "train/lr", "eval/nll", "kl/total", "eval/wer"} <= tags
    assert layers <= tags and "sparsity/B/hoyer_index" in tags
    assert [e.step for e in events.Scalars("train/loss")] == [r["step"] for r in result.history]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in result.history], rel=1e-6)
    assert [e.step for e in events.Scalars("kl/total")] == [1, 2, 4]
    assert [e.step for e in events.Scalars("eval/nll")] == [2, 4]
    per_layer = sum(events.Scalars(tag)[-1].value for tag in layers)
    assert per_layer == pytest.approx(events.Scalars("kl/total")[-1].value, rel=1e-4)
    assert events.Scalars("eval/wer")[0].value == 0.25
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"blora.rank": 4' in config_text


@pytest.mark.slow  # the shared run and a fresh MLflow SQLite store take ~10-25 s
def test_mlflow_run_holds_params_and_metrics(tracked):
    from mlflow.tracking import MlflowClient

    _, result, run_dir = tracked
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("pyro-blora").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["blora.rank"] == "4" and run.data.params["train.lr"] == "0.03"
    assert run.data.params["blora.target_modules"] == json.dumps(list(BLoRAConfig().target_modules))
    history = client.get_metric_history(run.info.run_id, "train/nll")
    assert [m.step for m in history] == [r["step"] for r in result.history]
    assert [m.value for m in history] == pytest.approx([r["nll"] for r in result.history], rel=1e-6)
    assert run.data.metrics["eval/wer"] == 0.25
    assert 0 <= run.data.metrics["sparsity/all/thresh_fraction"] <= 1
    assert run.data.metrics["kl/total"] > 0


def test_unknown_tracker_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match="tensorboard, mlflow, none"):
        make_tracker("wandb", tmp_path)
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- publishing
class HubRecorder:
    """Stands in for the hub at HfApi's boundary: records what would be created and uploaded."""

    def __init__(self) -> None:
        self.repos: list[dict] = []
        self.uploads: list[dict] = []

    def create_repo(self, api, repo_id, **kwargs):
        self.repos.append({"repo_id": repo_id, **kwargs})
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, api, *, repo_id, folder_path, **kwargs):
        files = {str(p.relative_to(folder_path)): p.read_bytes() for p in sorted(Path(folder_path).rglob("*")) if p.is_file()}
        self.uploads.append({"repo_id": repo_id, "files": files, **kwargs})
        return f"https://huggingface.co/{repo_id}/commit/0"


@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import HfApi

    recorder = HubRecorder()
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: recorder.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(HfApi, "upload_folder", lambda api, **kw: recorder.upload_folder(api, **kw))
    return recorder


def card_header(card: str) -> dict:
    import yaml

    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_push_peft_uploads_adapter_with_a_model_card(trained, tmp_path, hub):
    model, guide = trained
    export_peft(model, guide, tmp_path / "adapter", base_model_name_or_path="openai/whisper-tiny")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"blora": model.config.to_dict(), "train": {"steps": 8}}))
    (run_dir / "result.json").write_text(json.dumps({"base_nll": 4.25, "final_nll": 1.5}))
    (run_dir / "eval.json").write_text(json.dumps({"es-en": {"wer": 0.3125}}))
    url = push_to_hub(tmp_path / "adapter", "someone/blora-tiny", kind="peft", run_dir=run_dir, private=True)
    assert url == "https://huggingface.co/someone/blora-tiny/commit/0"
    assert hub.repos == [{"repo_id": "someone/blora-tiny", "repo_type": "model", "private": True, "exist_ok": True}]
    (upload,) = hub.uploads
    assert set(upload["files"]) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert upload["files"]["adapter_model.safetensors"] == (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    card = upload["files"]["README.md"].decode()
    header = card_header(card)
    assert header["library_name"] == "peft" and header["base_model"] == "openai/whisper-tiny"
    assert '"rank": 4' in card and "| final_nll | 1.5 |" in card and "| es-en.wer | 0.3125 |" in card
    assert "PeftModel.from_pretrained(base, \"someone/blora-tiny\")" in card
    assert not (tmp_path / "adapter" / "README.md").exists()  # the user's folder is left as it was


def test_push_model_objects_exports_them_first(trained, hub):
    model, guide = trained
    push_to_hub((model, guide), "someone/blora-posterior", kind="posterior")
    push_to_hub(posterior_mean_model(model, guide), "someone/blora-merged", kind="merged")
    posterior, merged = (set(u["files"]) for u in hub.uploads)
    assert posterior == {"posterior.json", "posterior.safetensors", "posterior_tensors.safetensors", "README.md"}
    assert {"config.json", "model.safetensors", "README.md"} <= merged
    assert card_header(hub.uploads[1]["files"]["README.md"].decode())["library_name"] == "transformers"


def test_push_refuses_a_folder_of_another_kind_before_uploading(trained, tmp_path, hub):
    model, guide = trained
    export_peft(model, guide, tmp_path)
    with pytest.raises(ValueError, match="not a 'merged' folder: it needs config.json"):
        push_to_hub(tmp_path, "someone/x", kind="merged")
    assert hub.repos == [] and hub.uploads == []


def test_push_offline_fails_fast_and_clearly(trained, tmp_path, monkeypatch):
    from pyro_blora.base_models.loading import HubUnavailableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    model, guide = trained
    export_peft(model, guide, tmp_path)
    with pytest.raises(HubUnavailableError, match="offline mode is on"):
        push_to_hub(tmp_path, "someone/x", kind="peft")


# ---------------------------------------------------------------- command line
def test_commands_move_adapters_between_formats(trained, tmp_path, hub):
    from typer.testing import CliRunner

    from pyro_blora.cli import app

    model, guide = trained
    tiny_whisper().save_pretrained(tmp_path / "base")
    save_posterior(tmp_path / "posterior", model, guide, metadata={"base_model": str(tmp_path / "base")})
    runner = CliRunner()

    def invoke(*args):
        outcome = runner.invoke(app, [str(a) for a in args])
        assert outcome.exit_code == 0, outcome.output
        return outcome.output

    assert "pruned" in invoke("export-peft", tmp_path / "posterior", "--out", tmp_path / "peft", "--prune-threshold", 1e-3)
    invoke("import-peft", tmp_path / "peft", "--out", tmp_path / "imported", "--prior-scale", 0.02)
    invoke("export-posterior", tmp_path / "imported")
    tensors, header = read_posterior_tensors(tmp_path / "imported")
    exported = read_peft_adapter(tmp_path / "peft").weights
    key = "model.decoder.layers.1.fc1"
    assert (tensors[f"{key}.lora_B.mean"] == exported[key][1].numpy()).all()
    assert header["prior_scale"] == 0.02 and header["metadata"]["base_model"] == str(tmp_path / "base")
    assert "someone/cli" in invoke("push", tmp_path / "peft", "someone/cli", "--kind", "peft")
    assert "adapter_model.safetensors" in hub.uploads[0]["files"]


def test_peft_adapter_held_in_the_blora_model_reproduces_peft_logits(tmp_path):
    """A plain LoRA baseline can be evaluated inside the BLoRA model (e.g. its token log-probabilities)."""
    from pyro_blora.interop.peft import peft_site_values

    folder = peft_lora(tmp_path, r=4, alpha=8)
    model, _ = make(blora_config_from_peft(folder))
    peft_model = peft.PeftModel.from_pretrained(tiny_whisper(), str(folder)).eval()
    features = torch.randn(2, MELS, FRAMES)
    decoder_ids = torch.full((2, 3), SOT)
    with torch.no_grad(), model.hold_adapters(peft_site_values(folder, model)):
        ours = model.whisper(input_features=features, decoder_input_ids=decoder_ids).logits
    theirs = peft_model(input_features=features, decoder_input_ids=decoder_ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
