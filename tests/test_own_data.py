"""Your own data from the command line: README's "Your own data" commands run as written on an audiofolder
and a CSV manifest (tiny model, fast options appended), the column flags, and ``evaluate --data``."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import soundfile
from typer.testing import CliRunner

from pyro_blora.cli import app
from pyro_blora.report.summaries import monte_carlo_examples
from tests.experiment_fixtures import small_whisper_folder

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()

# Appended to README's commands so that they finish in seconds on the tiny model.
FAST = {
    "train": ("--steps", "2", "--batch-size", "2", "--rank", "2", "--warmup-steps", "1", "--no-progress",
              "--cache-dir", "cache"),
    "evaluate": ("--decode-limit", "1", "--batch-size", "2", "--no-progress", "--cache-dir", "cache"),
    "transcribe": ("--samples", "2"),
}


def readme_commands() -> list[list[str]]:
    """The ``pyro-blora`` lines of README's "Your own data" code block, as argument lists."""
    section = (ROOT / "README.md").read_text().split("\n## Your own data\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line)[1:] for line in block.splitlines() if line.startswith("pyro-blora ")]


def write_clip(path: Path, seed: int, seconds: float = 0.5) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = 0.05 * np.random.default_rng(seed).standard_normal(int(16000 * seconds))
    soundfile.write(path, noise.astype(np.float32), 16000)


def write_rows(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    """README's files: mydata/ (an audiofolder: file_name, sentence, lang), test.csv (a manifest: path, sentence,
    lang), two recordings, and a tiny Whisper folder."""
    root = tmp_path_factory.mktemp("own-data")
    for i in range(4):
        write_clip(root / "mydata" / f"clip{i}.wav", seed=i)
    write_rows(root / "mydata" / "metadata.csv", "file_name,sentence,lang",
               [f"clip{i}.wav,hello number {i},en" for i in range(4)])
    for i in range(2):
        write_clip(root / "testclips" / f"t{i}.wav", seed=10 + i)
    write_rows(root / "test.csv", "path,sentence,lang", [f"testclips/t{i}.wav,a test sentence,en" for i in range(2)])
    write_clip(root / "talk.wav", seed=20)
    write_clip(root / "interview.flac", seed=21, seconds=0.7)
    return root, small_whisper_folder(root / "model")


def run(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result.output


def test_readme_commands_train_on_an_audiofolder_evaluate_a_manifest_and_transcribe(own_data, monkeypatch):
    root, model = own_data
    monkeypatch.chdir(root)
    commands = readme_commands()
    assert [command[0] for command in commands] == ["train", "evaluate", "transcribe"]
    for command in commands:
        extra = ("--model", model) if command[0] == "train" else ()
        run(*command, *extra, *FAST[command[0]])
    config = json.loads((root / "runs" / "mine" / "config.json").read_text())
    assert config["run"]["train_utterances"] == 4  # every row of mydata/metadata.csv
    assert config["run"]["train_columns"] == {"text": "sentence", "language": "lang"}
    [example] = monte_carlo_examples(root / "runs" / "mine", count=1, num_samples=1, max_new_tokens=2)
    assert example["reference"] == "hello number 0"  # the run reads its own data again, by its column names
    report = json.loads((root / "runs" / "mine" / "eval.json").read_text())
    assert list(report["results"]) == ["test"]  # named after test.csv
    scored = report["results"]["test"]
    assert scored["per_utterance"]["ids"] == ["testclips/t0.wav", "testclips/t1.wav"] and scored["ce"] > 0
    lines = [json.loads(line) for line in (root / "talk.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == ["talk.wav", "interview.flac"]
    assert sorted(p.name for p in (root / "subtitles").iterdir()) == ["interview.srt", "talk.srt"]


def test_train_on_a_manifest_then_evaluate_an_audiofolder_by_its_folder(own_data, tmp_path, monkeypatch):
    root, model = own_data
    monkeypatch.chdir(root)
    out = tmp_path / "from-manifest"
    run("train", "--method", "lora", "--data", "test.csv", "--audio-column", "path", "--text-column", "sentence",
        "--out", out, "--model", model, *FAST["train"])
    assert json.loads((out / "config.json").read_text())["run"]["train_utterances"] == 2
    output = run("evaluate", out, "--data", "mydata", "--text-column", "sentence", "--language-column", "lang",
                 "--domain-name", "my-clips", "--out", tmp_path / "eval.json", *FAST["evaluate"])
    results = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert list(results) == ["my-clips"] and len(results["my-clips"]["per_utterance"]["ids"]) == 4
    assert "my-clips" in output


def test_column_flags_reach_the_data(own_data, tmp_path, monkeypatch):
    """Without the flags the same manifest is refused, naming the flag that fixes it."""
    root, model = own_data
    monkeypatch.chdir(root)
    result = runner.invoke(app, ["train", "--data", "test.csv", "--text-column", "sentence", "--out",
                                 str(tmp_path / "run"), "--model", str(model), *FAST["train"]])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "has no 'audio' column (found: path, sentence, lang). Map yours with --audio-column path" in \
        " ".join(result.output.split())


def test_language_id_on_own_data_is_asked_for_or_follows_the_name(own_data, monkeypatch):
    from pyro_blora.base_models.loading import load_processor
    from pyro_blora.evaluation.scoring import load_eval_source

    root, model = own_data
    monkeypatch.chdir(root)
    processor = load_processor(model)
    columns = {"text": "sentence", "language": "lang"}
    scored = lambda **kw: next(iter(load_eval_source("mydata", processor, columns=columns, **kw).values()))  # noqa: E731
    assert not scored(name="my-clips").language_id  # a set of one's own: not by default
    assert scored(name="my-clips", language_id=True).language_id  # unless asked for
    assert scored(name="backward-real-clips").language_id and not scored(name="en", language_id=False).language_id
    result = runner.invoke(app, ["evaluate", str(model), "--testbed", str(root), "--language-id"])
    assert result.exit_code == 2 and "describe --data" in " ".join(result.output.split())
