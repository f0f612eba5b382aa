"""Crash safety: runs killed mid-training resume to the uninterrupted result; checkpoints are
atomic; signals checkpoint the step in progress; non-finite values stop with the step named."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyro
import pytest
import torch

from pyro_blora import BLoRAConfig, build_guide, train, wrap_whisper
from pyro_blora.checkpoint import CheckpointDir, UnsafeCheckpointError, atomic_write_bytes, capture_rng
from pyro_blora.training.loop import NonFiniteLossError, TrainingInterrupted
from tests.tiny import TinyTask, collate, tiny_whisper
from tests.train_subprocess import train_config

ROOT = Path(__file__).resolve().parent.parent
STEPS = 10
# The "random" step after which each run is killed, drawn from a recorded seed so a failure replays.
KILL_SEED = 9
KILL_STEP = {sig: random.Random(KILL_SEED + sig).randint(2, STEPS - 3) for sig in (signal.SIGKILL, signal.SIGTERM)}
STEP_DELAY = 0.3  # seconds of sleep per step in the interrupted runs, so the signal lands mid-run
TIMEOUT = 300


# ---------------------------------------------------------------- runs in their own processes
class Run:
    """One training process of tests/train_subprocess.py on a run folder."""

    def __init__(self, run_dir: Path, *options: str) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = run_dir.parent / f"{run_dir.name}-{len(list(run_dir.parent.glob(run_dir.name + '-*')))}.err"
        command = [sys.executable, "-m", "tests.train_subprocess", str(run_dir), "--steps", str(STEPS), *options]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        with self.stderr_path.open("w") as stderr:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def finish(self) -> int:
        try:
            return self.process.wait(TIMEOUT)
        finally:
            if self.process.poll() is None:
                self.process.kill()

    def wait_for_checkpoint(self, step: int) -> None:
        checkpoints = CheckpointDir(self.run_dir / "checkpoints")
        deadline = time.monotonic() + TIMEOUT
        while not any(s >= step for s in checkpoints.steps()):
            if self.process.poll() is not None:
                pytest.fail(f"the run ended before step {step} (exit {self.process.returncode}):\n{self.stderr}")
            if time.monotonic() > deadline:
                self.process.kill()
                pytest.fail(f"no checkpoint of step {step} after {TIMEOUT} s")
            time.sleep(0.005)

    def logged_steps(self) -> list[int]:
        lines = (self.run_dir / "log.jsonl").read_text().splitlines()
        return [json.loads(line)["step"] for line in lines]


def final_state(run_dir: Path) -> dict:
    state = torch.load(CheckpointDir(run_dir / "checkpoints").path(STEPS), weights_only=False)
    return {"guide": state["guide"], "losses": [record["loss"] for record in state["history"]]}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference run, started once and read when a test first needs it."""
    run = Run(tmp_path_factory.mktemp("reference") / "run")
    result: dict = {}

    def get() -> dict:
        if not result:
            assert run.finish() == 0, run.stderr
            result.update(final_state(run.run_dir))
        return result

    yield get
    run.finish()


def assert_same_posterior(run_dir: Path, reference: dict) -> None:
    resumed = final_state(run_dir)
    assert resumed["losses"] == reference["losses"]
    assert resumed["guide"].keys() == reference["guide"].keys()
    # Bit-for-bit: the same arithmetic in the same order on CPU, one thread in every run.
    assert all(torch.equal(resumed["guide"][k], reference["guide"][k]) for k in reference["guide"])


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_equals_uninterrupted_run(tmp_path, uninterrupted):
    run = Run(tmp_path / "run", "--step-delay", str(STEP_DELAY))
    run.wait_for_checkpoint(KILL_STEP[signal.SIGKILL])
    run.process.send_signal(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL
    killed_at = CheckpointDir(tmp_path / "run" / "checkpoints").steps()[-1]
    assert KILL_STEP[signal.SIGKILL] <= killed_at < STEPS

    resumed = Run(tmp_path / "run", "--resume")
    assert resumed.finish() == 0, resumed.stderr
    assert resumed.logged_steps() == list(range(1, STEPS + 1))  # lines a killed run logged past its checkpoint are gone
    assert_same_posterior(tmp_path / "run", uninterrupted())


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_in_progress_and_resume_loses_nothing(tmp_path, uninterrupted):
    run = Run(tmp_path / "run", "--step-delay", str(STEP_DELAY))
    run.wait_for_checkpoint(KILL_STEP[signal.SIGTERM])
    run.process.send_signal(signal.SIGTERM)
    assert run.finish() == 128 + signal.SIGTERM, run.stderr
    stopped_at = int(run.stderr.split("after step ")[1].split(";")[0])
    assert f"stopped by SIGTERM after step {stopped_at}; checkpoint saved" in run.stderr
    # The step in progress when the signal came was finished and saved (or none was in progress).
    assert KILL_STEP[signal.SIGTERM] <= stopped_at < STEPS
    assert CheckpointDir(tmp_path / "run" / "checkpoints").steps()[-1] == stopped_at
    assert run.logged_steps() == list(range(1, stopped_at + 1))

    resumed = Run(tmp_path / "run", "--resume")
    assert resumed.finish() == 0, resumed.stderr
    assert resumed.logged_steps() == list(range(1, STEPS + 1))
    assert_same_posterior(tmp_path / "run", uninterrupted())


# ---------------------------------------------------------------- signals and NaN in process
def make():
    model = wrap_whisper(tiny_whisper(0), BLoRAConfig(rank=4))
    pyro.set_rng_seed(0)
    return model, build_guide(model)


def test_a_signal_finishes_the_step_checkpoints_it_and_a_second_stops_at_once(tmp_path):
    def signal_at(step: int, times: int):
        def callback(record, model, guide):  # noqa: ARG001
            if record["step"] == step:
                for _ in range(times):
                    os.kill(os.getpid(), signal.SIGINT)
        return callback

    model, guide = make()
    with pytest.raises(TrainingInterrupted, match="stopped by SIGINT after step 3; checkpoint saved") as stop:
        train(model, guide, TinyTask(8), collate, train_config(6), run_dir=tmp_path / "once", callbacks=[signal_at(3, 1)])
    assert (stop.value.step, stop.value.signal) == (3, signal.SIGINT)
    assert CheckpointDir(tmp_path / "once" / "checkpoints").steps()[-1] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is restored
    model, guide = make()
    with pytest.raises(ValueError, match="already holds checkpoints of this run; pass resume=True"):
        train(model, guide, TinyTask(8), collate, train_config(6), run_dir=tmp_path / "once")

    model, guide = make()
    with pytest.raises(KeyboardInterrupt, match="second SIGINT") as stop:
        train(model, guide, TinyTask(8), collate, train_config(6), run_dir=tmp_path / "twice", callbacks=[signal_at(3, 2)])
    assert not isinstance(stop.value, TrainingInterrupted)
    assert CheckpointDir(tmp_path / "twice" / "checkpoints").steps()[-1] == 2


def test_non_finite_gradient_stops_before_the_guide_is_poisoned(tmp_path):
    def poison_gradients(record, model, guide):  # noqa: ARG001
        if record["step"] == 2:
            next(guide.parameters()).register_hook(lambda grad: grad * float("nan"))

    model, guide = make()
    with pytest.raises(NonFiniteLossError, match=r"not finite at step 2: loss=.*nll=.*kl=.*gradient norm=nan.*init_scale_A"):
        train(model, guide, TinyTask(8), collate, train_config(6), run_dir=tmp_path, callbacks=[poison_gradients])
    state = CheckpointDir(tmp_path / "checkpoints").load_latest()
    assert state["step"] == 2
    assert all(torch.isfinite(value).all() for value in state["guide"].values())


# ---------------------------------------------------------------- checkpoint files
def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "state.bin"
    atomic_write_bytes(target, b"old")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]


def test_checkpoint_folder_keeps_the_last_k_and_ignores_leftovers(tmp_path):
    folder = CheckpointDir(tmp_path, keep=3)
    (tmp_path / ".step-00000009.pt.abc.tmp").write_bytes(b"half a checkpoint from a killed writer")
    for step in range(1, 6):
        folder.save(step, {"step": step})
        assert folder.steps() == list(range(max(1, step - 2), step + 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"step-0000000{s}.pt" for s in (3, 4, 5)]


def test_unreadable_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    folder = CheckpointDir(tmp_path)
    folder.save(1, {"step": 1})
    folder.save(2, {"step": 2})
    folder.path(2).write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="cannot be read"):
        assert folder.load_latest()["step"] == 1
    folder.path(1).write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="no checkpoint .* can be read; delete the folder"):
        folder.load_latest()


class _RunsCodeWhenUnpickled:
    """What a planted checkpoint could hold: unpickling it calls a function of the file's choosing."""

    def __reduce__(self):
        return (os.system, ("echo this checkpoint ran code",))


def test_a_checkpoint_that_would_run_code_is_refused_with_the_fix(tmp_path):
    folder = CheckpointDir(tmp_path)
    folder.save(1, {"step": 1, "rng": capture_rng()})
    folder.save(2, {"step": 2, "payload": _RunsCodeWhenUnpickled()})
    with pytest.raises(UnsafeCheckpointError, match=r"step-00000002\.pt holds Python objects .*system.*Delete it"):
        folder.load_latest()
    folder.path(2).unlink()
    state = folder.load_latest()  # the random state (NumPy's included) still loads without pickles
    assert state["step"] == 1 and state["rng"]["numpy"][0] == "MT19937"


def test_an_empty_training_set_is_refused():
    model, guide = make()
    with pytest.raises(ValueError, match="the training set is empty; check the data report"):
        train(model, guide, TinyTask(0), collate, train_config(2))


def test_a_crash_while_saving_the_weights_leaves_no_result(tmp_path):
    """result.json is written last: a run killed while saving its weights is not taken as finished,
    and resuming it writes the weights and then the result."""
    from pyro_blora import BLoRAConfig, TrainConfig, build_guide, train, wrap_whisper
    from tests.tiny import TinyTask, collate, tiny_whisper

    config = TrainConfig(steps=2, batch_size=2, warmup_steps=0, progress=False, checkpoint_every=1)

    def fresh():
        model = wrap_whisper(tiny_whisper(0), BLoRAConfig(rank=2))
        return model, build_guide(model, seed=0)

    def crash():
        raise KeyboardInterrupt("killed while saving")

    model, guide = fresh()
    with pytest.raises(KeyboardInterrupt):
        train(model, guide, TinyTask(4), collate, config, run_dir=tmp_path, save=crash)
    assert not (tmp_path / "result.json").exists()
    saved = []
    model, guide = fresh()
    train(model, guide, TinyTask(4), collate, config, run_dir=tmp_path, resume=True,
          save=lambda: saved.append((tmp_path / "result.json").exists()))
    assert saved == [False] and (tmp_path / "result.json").is_file()
