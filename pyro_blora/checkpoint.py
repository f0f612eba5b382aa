"""Crash-safe files: the one atomic writer (bytes, JSON, text, safetensors), checkpoints with the last K kept,
every RNG captured."""

from __future__ import annotations

import io
import json
import os
import random
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_safetensors",
    "atomic_write_text",
    "capture_rng",
    "restore_rng",
    "CheckpointDir",
    "UnsafeCheckpointError",
]

# Besides tensors and plain values, a checkpoint holds NumPy's random state: one uint32 array.
# Loading allows exactly the globals that rebuild it, so a file cannot make the load run code.
_NUMPY_STATE_GLOBALS = [np.ndarray.__reduce__(np.zeros(1, np.uint32))[0], np.ndarray, np.dtype,
                        type(np.dtype(np.uint32))]


class UnsafeCheckpointError(ValueError):
    """A checkpoint file names Python objects that loading it would run: it is refused, not skipped."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, rename over ``path``, fsync the folder.

    A crash at any point leaves either the old file or the new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); folders cannot be opened on Windows."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file written whole or not at all (``metadata`` is its header)."""
    from safetensors.torch import save

    atomic_write_bytes(path, save(tensors, metadata=metadata))


def capture_rng() -> dict[str, Any]:
    """Every random state a training step touches (Python, NumPy, torch CPU, and the CUDA state of
    the current GPU: under data parallelism each rank draws on its own GPU, so a checkpoint restores
    into whichever GPU the resuming process uses)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        if isinstance(state["cuda"], (list, tuple)):  # checkpoints that saved every GPU's state
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            torch.cuda.set_rng_state(state["cuda"])


class CheckpointDir:
    """A folder of ``step-XXXXXXXX.pt`` files of which the newest ``keep`` are kept.

    Temporary files that a killed writer left behind are never mistaken for checkpoints and are
    removed by the next save."""

    pattern = re.compile(r"step-(\d{8})\.pt$")

    def __init__(self, folder: str | os.PathLike, keep: int = 2) -> None:
        self.folder = Path(folder)
        self.keep = keep

    def steps(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        found = (self.pattern.match(p.name) for p in self.folder.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def path(self, step: int) -> Path:
        return self.folder / f"step-{step:08d}.pt"

    def save(self, step: int, state: dict[str, Any]) -> Path:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        target = self.path(step)
        atomic_write_bytes(target, buffer.getvalue())
        for old in self.steps()[: -self.keep]:
            self.path(old).unlink(missing_ok=True)
        for leftover in self.folder.glob(".step-*.tmp"):
            leftover.unlink(missing_ok=True)
        return target

    def latest(self) -> Path | None:
        steps = self.steps()
        return self.path(steps[-1]) if steps else None

    def load_latest(self) -> dict[str, Any] | None:
        """The newest checkpoint that loads; an unreadable one (e.g. a disk that filled up) is
        skipped with a warning rather than ending the resume. Only tensors and plain values are
        unpickled (``weights_only``), so a planted file cannot run code: one that tries is refused."""
        for step in reversed(self.steps()):
            try:
                return _load_checkpoint(self.path(step))
            except UnsafeCheckpointError:
                raise
            except Exception as error:  # noqa: BLE001 - any unreadable file: fall back to the previous one
                warnings.warn(f"checkpoint {self.path(step)} cannot be read ({error}); trying an earlier one")
        if self.steps():
            raise RuntimeError(
                f"no checkpoint in {self.folder} can be read; delete the folder to start over, or restore it from a backup"
            )
        return None


def _load_checkpoint(path: Path) -> dict[str, Any]:
    """One checkpoint, unpickled with ``weights_only=True`` and NumPy's random state allowed."""
    with torch.serialization.safe_globals(_NUMPY_STATE_GLOBALS):
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - not a readable zip checkpoint: torch.load below says why
            unsafe = []
        if unsafe:
            raise UnsafeCheckpointError(
                f"checkpoint {path} holds Python objects that loading would run ({', '.join(unsafe)}); pyro-blora "
                "writes only tensors and plain values, so it refuses this file. Delete it to resume from the "
                "checkpoint before it, or delete the folder to start over"
            )
        return torch.load(path, map_location="cpu", weights_only=True)
