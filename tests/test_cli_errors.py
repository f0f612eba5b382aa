"""Every command's expected failures, through Typer's runner: one ``Error:`` line that says what is wrong
and how to fix it, exit code 2, no traceback; ``--debug`` brings the traceback back, and bugs keep theirs."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from pyro_blora.cli import EXIT_USAGE, app
from tests.test_transcribe import real_sized_tiny  # noqa: F401 - a fixture

os.environ.setdefault("HF_HUB_OFFLINE", "1")
runner = CliRunner()


def error_line(result) -> str:
    """The failure's one line (progress bars of libraries may come before it); asserts the contract."""
    assert result.exit_code == EXIT_USAGE, f"{result.exit_code}: {result.output}\n{result.exception!r}"
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and result.output.rstrip("\n").endswith(lines[0]), result.output
    return lines[0]


def fail(*args) -> str:
    return error_line(runner.invoke(app, [str(a) for a in args]))


@pytest.fixture
def missing(tmp_path):
    return tmp_path / "nothere"


def test_testbed(missing):
    assert "'--text-file'" in fail("testbed", "--text-file", missing, "--out", missing.parent / "tb")
    assert "does not exist" in fail("testbed", "--text-file", missing, "--out", missing.parent / "tb")


def test_train(missing, tmp_path):
    assert "Invalid value for '--data'" in fail("train", "--data", missing, "--out", tmp_path / "run")
    line = fail("train", "--method", "adapterx", "--data", tmp_path, "--out", tmp_path / "run")
    assert "--method" in line and "blora" in line


def test_evaluate(missing):
    line = fail("evaluate", "base", "--testbed", missing)
    assert "'--testbed'" in line and "does not exist" in line and "pyro-blora evaluate --help" in line


def test_evaluate_data(missing, tmp_path):
    assert "--testbed <folder> (its --domains) or --data <your test set>, one of the two" in fail("evaluate", "base")
    assert "one of the two" in fail("evaluate", "base", "--testbed", tmp_path, "--data", missing)
    assert "describe --data" in fail("evaluate", "base", "--testbed", tmp_path, "--text-column", "sentence")
    assert "does not exist" in fail("evaluate", "base", "--data", missing.with_suffix(".csv"))
    for split in ("train", "dev"):
        (tmp_path / "corpus" / split).mkdir(parents=True)
        (tmp_path / "corpus" / split / "metadata.csv").write_text("file_name,text\na.wav,hi\n")
    line = fail("evaluate", "base", "--data", tmp_path / "corpus")
    assert "has the splits dev, train and none is called test; choose one with split= (--split)" in line


def test_main():
    assert fail("main", "--steps", "0") == "Error: steps must be > 0, got 0"


def test_sequence(missing, tmp_path):
    assert "'--testbed'" in fail("sequence", "--testbed", missing)
    assert "unknown strategies ['bogus']" in fail("sequence", "--testbed", tmp_path, "--strategy", "bogus")


@pytest.mark.parametrize("command", ["export-peft", "import-peft", "export-posterior"])
def test_interop_commands(command, missing):
    assert "does not exist" in fail(command, missing, "--out", missing.parent / "out")


def test_push(missing):
    assert "does not exist" in fail("push", missing, "me/name")


@pytest.mark.parametrize("command", ["inspect", "report", "table"])
def test_analysis_commands(command, missing):
    assert "does not exist" in fail(command, missing)


def test_sweep(tmp_path):
    assert "--betas takes comma-separated values" in fail("sweep", "--data", tmp_path, "--testbed", tmp_path,
                                                         "--betas", "a,b")


def test_missing_option_is_one_line(tmp_path):
    assert "Missing option '--posterior'" in fail("transcribe", tmp_path)


# ------------------------------------------------------------------ transcribe
@pytest.fixture
def tiny_posterior(real_sized_tiny):
    """A posterior on a tiny random model with tiny.en's vocabulary, and short clips (from test_transcribe)."""
    return real_sized_tiny


def transcribe(tiny_posterior, *extra):
    _, _, _, folder = tiny_posterior
    return fail("transcribe", folder / "audio" / "a.wav", "--posterior", folder / "posterior", "--samples", "1", *extra)


def test_transcribe_bad_audio_path(tiny_posterior, missing):
    _, _, _, folder = tiny_posterior
    line = fail("transcribe", missing, "--posterior", folder / "posterior")
    assert "Invalid value for 'inputs'" in line and "nothere" in line and "does not exist" in line


def test_transcribe_missing_posterior_folder(tiny_posterior, missing):
    _, _, _, folder = tiny_posterior
    line = fail("transcribe", folder / "audio" / "a.wav", "--posterior", missing)
    assert line.startswith(f"Error: posterior folder {missing} does not exist; give the posterior/ folder")


def test_transcribe_unknown_language(tiny_posterior):
    """The fixture's model is English-only (tiny.en's vocabulary), so any other language is refused as such;
    a multilingual model refuses 'klingon' with "has no token in this tokenizer" (test_bad_inputs.py)."""
    line = transcribe(tiny_posterior, "--language", "klingon")
    assert "language 'klingon' asked of an English-only model" in line and "use a multilingual checkpoint" in line


def test_transcribe_wrong_model(tiny_posterior, tmp_path):
    line = transcribe(tiny_posterior, "--model", "tiny.en")
    assert "trained on a different base model" in line and "Load the base model it was trained on" in line
    assert "cannot load 'no/such-model' from the Hugging Face hub" in transcribe(tiny_posterior, "--model", "no/such-model")


def test_transcribe_bad_posterior_temperature(tiny_posterior):
    line = transcribe(tiny_posterior, "--posterior-temperature", "0")
    assert "--posterior-temperature" in line and "must be > 0" in line


def test_transcribe_encoder_window_run_is_refused(tiny_posterior, tmp_path):
    import json
    import shutil

    _, _, _, folder = tiny_posterior
    run = tmp_path / "windowed-run"
    shutil.copytree(folder / "posterior", run / "posterior")
    (run / "config.json").write_text(json.dumps({"train": {"encoder_window_seconds": 10.0}}))
    line = fail("transcribe", folder / "audio" / "a.wav", "--posterior", run / "posterior")
    assert "was trained with a 10 s encoder window" in line and "pyro-blora evaluate" in line


def test_debug_shows_the_traceback(tiny_posterior, missing):
    _, _, _, folder = tiny_posterior
    result = runner.invoke(app, ["--debug", "transcribe", str(folder / "audio" / "a.wav"), "--posterior", str(missing)])
    assert result.exit_code == 1 and isinstance(result.exception, FileNotFoundError)


def test_bugs_keep_their_traceback(monkeypatch, tiny_posterior):
    """A failure inside a dependency is not an expected one: it is re-raised, not shortened."""
    def broken(*args, **kwargs):
        import json

        return json.loads("{")  # a ValueError raised outside this library

    _, _, _, folder = tiny_posterior
    monkeypatch.setattr("pyro_blora.commands.transcribe.transcribe", broken)
    result = runner.invoke(app, ["transcribe", str(folder / "audio" / "a.wav"), "--posterior", str(folder / "posterior")])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)


def test_frontier_and_budget_confidence(tmp_path):
    assert "is not a run folder" in fail("frontier", tmp_path, "--retain", tmp_path, "--out", tmp_path / "f")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    (tmp_path / "run" / "log.jsonl").write_text("")
    run = tmp_path / "run"
    for option, value, message in (("--scales", "0,1.5", "[0, 1]"), ("--scales", "a", "--scales"),
                                   ("--budgets", "-0.1", ">= 0"), ("--retain-confidence", "1.2", "confidence"),
                                   ("--retain-precision", "fp16", "precision must be one of")):
        assert message in fail("frontier", run, "--retain", tmp_path, "--out", tmp_path / "f", option, value)
    assert "confidence" in fail("export", run, "--out", tmp_path / "e", "--retain", tmp_path, "--retain-budget",
                                "0.03", "--retain-confidence", "0.2")
    assert "precision must be one of" in fail("evaluate", run, "--testbed", tmp_path, "--retain", tmp_path, "--retain-budget",
                                      "0.03", "--retain-precision", "half")
