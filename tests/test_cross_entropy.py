"""One teacher-forced cross-entropy: training, evaluation, the forgetting budget and the Pyro
likelihood score the same tokens the same way; and the model package stays at the bottom."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pyro import poutine

from pyro_blora import BLoRAConfig, ElboScaling, build_guide, wrap_whisper
from pyro_blora.evaluation.scoring import _ce_fields
from pyro_blora.model.objective import token_cross_entropy, token_nll, token_nll_per_utterance
from pyro_blora.training.budget import transcript_ce
from pyro_blora.training.methods import teacher_forced_loss
from tests.tiny import TinyTask, collate, tiny_whisper

PACKAGE = Path(__file__).resolve().parents[1] / "pyro_blora"


@pytest.fixture
def scored():
    """A BLoRA model held at its posterior means, one batch, and labels split into prompt and text:
    with end-of-text at 13, the phrase tokens above it count as prompt tokens."""
    model = wrap_whisper(tiny_whisper(0), BLoRAConfig(rank=4))
    guide = build_guide(model, seed=0)
    model.whisper.config.eos_token_id = 13
    task = TinyTask(4)
    batch = collate([task[i] for i in range(4)])
    labels = batch["labels"]
    prompt = labels > 13
    transcript = (labels != -100) & ~prompt
    assert prompt.any() and transcript.any()
    with model.hold_adapters(guide.means()):
        yield model, batch, transcript


def test_training_evaluation_and_budget_agree_on_one_batch(scored):
    model, batch, transcript = scored
    whisper = model.whisper
    training = teacher_forced_loss(whisper, batch)
    with torch.no_grad():
        per_token = token_cross_entropy(whisper, batch)
    evaluation = _ce_fields(token_nll_per_utterance(whisper, [batch]))
    every_token = float(per_token.sum() / (batch["labels"] != -100).sum())
    assert float(training.loss) == pytest.approx(every_token, rel=1e-6)
    assert evaluation["ce_all_tokens"] == pytest.approx(every_token, rel=1e-6)
    assert token_nll(whisper, [batch]) == evaluation["ce_all_tokens"]
    text_only = float(per_token[transcript].mean())
    assert transcript_ce(whisper, [batch]) == pytest.approx(text_only, rel=1e-6)
    assert evaluation["ce"] == transcript_ce(whisper, [batch])
    assert training.num_tokens == int((batch["labels"] != -100).sum())


def test_the_pyro_likelihood_is_the_summed_cross_entropy(scored):
    model, batch, _ = scored
    model.configure_objective(ElboScaling(num_utterances=batch["labels"].shape[0], likelihood=1.0, kl=1.0))
    with torch.no_grad():
        trace = poutine.trace(model).get_trace(batch)
        trace.compute_log_prob()
        summed = token_cross_entropy(model.whisper, batch).sum()
    assert float(-trace.nodes["tokens"]["log_prob_sum"]) == pytest.approx(float(summed), rel=1e-6)


def test_importing_the_package_leaves_pyro_settings_alone():
    code = ("import pyro, pyro_blora; assert not pyro.settings.get('module_local_params'); "
            "from tests.tiny import tiny_whisper; pyro_blora.wrap_whisper(tiny_whisper(0)); "
            "assert pyro.settings.get('module_local_params')")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)


def _imports(path: Path) -> set[str]:
    """Every module a source file imports, at any depth and under TYPE_CHECKING too."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_the_model_package_imports_nothing_above_it():
    above = {f"pyro_blora.{stage}" for stage in
             ("predict", "training", "evaluation", "report", "experiments", "interop", "commands")}
    for path in (PACKAGE / "model").glob("*.py"):
        upward = {name for name in _imports(path) if ".".join(name.split(".")[:2]) in above}
        assert not upward, f"{path.name} imports {sorted(upward)}"
    assert not _imports(PACKAGE / "model" / "objective.py") & {"pyro_blora.model.whisper", "pyro_blora.model.guide"}
