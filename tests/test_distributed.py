"""Data-parallel training: two gloo processes on loopback reach the posterior of one process,
and a checkpoint resumes under another number of processes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_blora.checkpoint import CheckpointDir
from pyro_blora.training.distributed import DistributedContext

ROOT = Path(__file__).resolve().parent.parent
STEPS = 5
# 3 utterances per global batch: shards of 2 and 1, so the weighting by shard size is exercised.
BATCH = 3
TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(run_dir: Path, processes: int, *options: str) -> None:
    """tests/train_subprocess.py in one process, or under torchrun in ``processes`` gloo processes."""
    script = ["-m", "tests.train_subprocess", str(run_dir), "--steps", str(STEPS), "--batch-size", str(BATCH),
              "--float64", *options]
    if processes > 1:
        launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-addr", "127.0.0.1",
                    "--master-port", str(free_port())]
        command = [sys.executable, *launcher, *script]
    else:
        command = [sys.executable, *script]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"{processes}-process training failed:\n{done.stderr[-4000:]}"


def final_state(run_dir: Path) -> dict:
    return torch.load(CheckpointDir(run_dir / "checkpoints").path(STEPS), weights_only=False)


def assert_same_posterior(a: dict, b: dict) -> None:
    """Equal up to summation order: the losses to 1e-6 relative, the parameters to 1e-6 (on values of order
    1e-2), as Adam magnifies rounding differences in gradients near zero."""
    assert a["guide"].keys() == b["guide"].keys()
    for name in a["guide"]:
        torch.testing.assert_close(a["guide"][name], b["guide"][name], rtol=1e-6, atol=1e-6, msg=name)
    losses_a = torch.tensor([r["loss"] for r in a["history"]])
    losses_b = torch.tensor([r["loss"] for r in b["history"]])
    torch.testing.assert_close(losses_a, losses_b, rtol=1e-6, atol=1e-9)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    train(root / "one", 1)
    train(root / "two", 2)
    return root


def test_two_processes_give_the_posterior_of_one(runs):
    one, two = final_state(runs / "one"), final_state(runs / "two")
    assert_same_posterior(one, two)
    # rank 0 alone wrote the folder: one log line per step, no stray files of another rank
    assert len((runs / "two" / "log.jsonl").read_text().splitlines()) == STEPS
    assert sorted(p.name for p in (runs / "two").iterdir()) == sorted(p.name for p in (runs / "one").iterdir())


def test_a_two_process_checkpoint_resumes_in_one_process(runs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(runs / "two", run_dir)
    CheckpointDir(run_dir / "checkpoints").path(STEPS).unlink()  # the run stopped one step short
    train(run_dir, 1, "--resume")
    assert_same_posterior(final_state(run_dir), final_state(runs / "one"))


def test_shards_cover_the_global_batch_once():
    indices = torch.arange(7)
    shards = [DistributedContext(rank=r, world_size=3).shard(indices) for r in range(3)]
    assert torch.equal(torch.cat(shards), indices)
    with pytest.raises(ValueError, match="batch_size >= 3"):
        DistributedContext(rank=0, world_size=3).shard(torch.arange(2))
