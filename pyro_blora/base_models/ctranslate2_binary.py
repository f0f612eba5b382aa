"""Read CTranslate2's Whisper folder: where its files are, and the variables of its binary `model.bin`.

`model.bin` may be split into byte-concatenated parts (the bundled `base` ships that way); they are read as one
stream, so no joined copy is written. Turning the variables into a transformers model is
`pyro_blora.base_models.ctranslate2`'s job.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import torch

__all__ = ["CTranslate2Files", "FOLDER_FILES", "read_variable_shapes", "read_variables"]

MODEL_BIN = "model.bin"
CONFIG_JSON = "config.json"
TOKENIZER_JSON = "tokenizer.json"
VOCABULARY_TXT = "vocabulary.txt"
FOLDER_FILES = (MODEL_BIN, CONFIG_JSON, TOKENIZER_JSON, VOCABULARY_TXT)

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}


@dataclass(frozen=True)
class CTranslate2Files:
    """Where the parts of one CTranslate2 Whisper model live (they need not share a folder)."""

    model_parts: tuple[Path, ...]
    config: Path
    tokenizer: Path

    def __post_init__(self) -> None:
        if not self.model_parts:
            raise ValueError("model_parts is empty; give the model.bin file (or its parts, in order)")
        for path in (*self.model_parts, self.config, self.tokenizer):
            if not Path(path).is_file():
                raise FileNotFoundError(
                    f"{path} does not exist; a CTranslate2 Whisper model needs {', '.join(FOLDER_FILES)}"
                )

    @classmethod
    def from_folder(cls, folder: str | Path) -> "CTranslate2Files":
        folder = Path(folder)
        return cls((folder / MODEL_BIN,), folder / CONFIG_JSON, folder / TOKENIZER_JSON)

    @staticmethod
    def is_folder(folder: str | Path) -> bool:
        folder = Path(folder)
        return (folder / MODEL_BIN).is_file() and (folder / CONFIG_JSON).is_file()

    def generation_settings(self) -> dict:
        return json.loads(Path(self.config).read_text(encoding="utf-8"))



class _ConcatenatedReader:
    """Reads byte-concatenated files as one stream, so split weights need no joined copy."""

    def __init__(self, paths: tuple[Path, ...]):
        self._paths = list(paths)
        self._handle: BinaryIO | None = None
        self._index = -1
        self._next_file()

    def _next_file(self) -> bool:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self._index += 1
        if self._index >= len(self._paths):
            return False
        self._handle = open(self._paths[self._index], "rb")
        return True

    def read(self, size: int) -> bytes:
        chunks = []
        while size > 0 and self._handle is not None:
            chunk = self._handle.read(size)
            if not chunk:
                if not self._next_file():
                    break
                continue
            chunks.append(chunk)
            size -= len(chunk)
        if size > 0:
            raise EOFError(
                f"model.bin ended early ({size} bytes missing); the file (or one of its parts) is truncated "
                "or the parts are given in the wrong order"
            )
        return b"".join(chunks)

    def skip(self, size: int) -> None:
        while size > 0 and self._handle is not None:
            here = self._handle.tell()
            end = self._handle.seek(0, 2)
            step = min(size, end - here)
            self._handle.seek(here + step)
            size -= step
            if size > 0 and not self._next_file():
                raise EOFError("model.bin ended early; the file (or one of its parts) is truncated")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _unpack(reader: _ConcatenatedReader, fmt: str):
    return struct.unpack("<" + fmt, reader.read(struct.calcsize("<" + fmt)))[0]


def _read_string(reader: _ConcatenatedReader) -> str:
    length = _unpack(reader, "H")
    return reader.read(length)[:-1].decode("utf-8")


def _walk(parts: tuple[Path, ...], with_data: bool) -> Iterator[tuple[str, tuple[int, ...], int, bytes | None]]:
    """Yield (name, shape, dtype code, raw bytes or None) per variable, then ("alias", ...) pairs."""
    reader = _ConcatenatedReader(tuple(Path(p) for p in parts))
    try:
        version = _unpack(reader, "I")
        if version < 5:
            raise ValueError(f"model.bin format version {version} is too old; convert it with CTranslate2 >= 3")
        _read_string(reader)  # spec name
        _unpack(reader, "I")  # spec revision
        for _ in range(_unpack(reader, "I")):
            name = _read_string(reader)
            rank = _unpack(reader, "B")
            shape = tuple(_unpack(reader, "I") for _ in range(rank))
            dtype = _unpack(reader, "B")
            n_bytes = _unpack(reader, "I")
            if with_data:
                yield name, shape, dtype, reader.read(n_bytes)
            else:
                reader.skip(n_bytes)
                yield name, shape, dtype, None
        for _ in range(_unpack(reader, "I")):
            alias = _read_string(reader)
            target = _read_string(reader)
            yield alias, (), -1, target.encode("utf-8")
    finally:
        reader.close()


def read_variable_shapes(parts: tuple[Path, ...]) -> dict[str, tuple[int, ...]]:
    """Shapes of all variables, read by skipping over the data (cheap)."""
    shapes = {}
    for name, shape, dtype, payload in _walk(parts, with_data=False):
        if dtype == -1:
            continue
        shapes[name] = shape
    return shapes


def _to_tensor(raw: bytes, shape: tuple[int, ...], dtype: int) -> torch.Tensor:
    if dtype not in _DTYPES:
        raise ValueError(f"unknown CTranslate2 dtype code {dtype}; expected one of {sorted(_DTYPES)}")
    if _DTYPES[dtype] == "bfloat16":
        bits = np.frombuffer(raw, dtype=np.int16).copy()
        return torch.from_numpy(bits).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(np.frombuffer(raw, dtype=_DTYPES[dtype]).copy()).reshape(shape)


def read_variables(parts: tuple[Path, ...]) -> dict[str, torch.Tensor]:
    """All variables of a model.bin, in float32, with int8 weights dequantised and aliases resolved."""
    raw: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, shape, dtype, payload in _walk(parts, with_data=True):
        if dtype == -1:
            aliases[name] = payload.decode("utf-8")
        else:
            raw[name] = _to_tensor(payload, shape, dtype)
    for alias, target in aliases.items():
        raw[alias] = raw[target]
        if target + "_scale" in raw:
            raw[alias + "_scale"] = raw[target + "_scale"]
    variables = {}
    for name, value in raw.items():
        if name.endswith("_scale") and name[: -len("_scale")] in raw:
            continue
        scale = raw.get(name + "_scale")
        if scale is not None and value.dtype == torch.int8:
            scale = scale.to(torch.float32)
            value = value.to(torch.float32) / (scale.reshape(-1, *([1] * (value.dim() - 1))))
        variables[name] = value if not value.is_floating_point() else value.to(torch.float32)
    return variables

