"""A small Whisper with the real multilingual tokenizer, and a fake testbed, for experiment tests.

The model has base's vocabulary, mel bins, positions and generation config (so language forcing and
language detection work) but one layer of width 32, so training and decoding take milliseconds.
The testbed has the real layout (one saved DatasetDict per domain) with short noise clips."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import soundfile
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from pyro_blora.base_models.ctranslate2 import whisper_generation_config
from pyro_blora.testbed.manifest import save_domain
from pyro_blora.base_models.loading import bundled_files, load_processor

TEXTS = {"zh": ["我们 meeting", "很好 project"], "en": ["the cat", "open it"], "es": ["hola", "la casa"]}


def small_whisper_folder(folder: Path, seed: int = 0) -> Path:
    """save_pretrained of a random one-layer Whisper with base's tokenizer and generation config."""
    processor = load_processor("base")
    files = bundled_files("base")
    config = WhisperConfig(
        vocab_size=len(processor.tokenizer), num_mel_bins=80, encoder_layers=1, decoder_layers=1, d_model=32,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=1500, max_target_positions=448, decoder_start_token_id=50258, pad_token_id=50257,
        eos_token_id=50257, bos_token_id=50257,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = whisper_generation_config(json.loads(Path(files.config).read_text()), processor.tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _wav(seconds: float, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    soundfile.write(buffer, (0.05 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000, format="WAV")
    return buffer.getvalue()


def _rows(domain: str, language: str, count: int, seed: int) -> list[dict]:
    texts = TEXTS[language]
    return [
        {
            "id": f"{domain}-{seed}-{i}", "audio": {"bytes": _wav(0.5 + 0.1 * i, seed + i), "path": None},
            "text": texts[i % len(texts)], "language": language, "languages": language, "domain": domain,
            "voice": "noise", "rate": 1.0, "pitch": 50.0, "noise_snr_db": None, "n_switches": 0,
            "embedded_fraction": 0.0, "template_id": f"t{i}", "duration_s": 0.5 + 0.1 * i,
        }
        for i in range(count)
    ]


def fake_testbed(folder: Path) -> Path:
    """Domains zh-en (train/dev/test), en (dev/test) and backward-es (test) of noise clips."""
    save_domain(folder / "zh-en", {"train": _rows("zh-en", "zh", 4, 0), "dev": _rows("zh-en", "zh", 2, 10),
                                   "test": _rows("zh-en", "zh", 2, 20)})
    save_domain(folder / "en", {"dev": _rows("en", "en", 2, 30), "test": _rows("en", "en", 2, 40)})
    save_domain(folder / "backward-es", {"test": _rows("backward-es", "es", 2, 50)})
    return folder


def sequence_testbed(folder: Path) -> Path:
    """Two code-switched domains to adapt to in turn, zh-en and es-en (train/dev/test), and en (test)."""
    for seed, (domain, language) in enumerate((("zh-en", "zh"), ("es-en", "es"))):
        save_domain(folder / domain, {"train": _rows(domain, language, 4, 100 * seed),
                                      "dev": _rows(domain, language, 2, 100 * seed + 10),
                                      "test": _rows(domain, language, 2, 100 * seed + 20)})
    save_domain(folder / "en", {"test": _rows("en", "en", 2, 40)})
    return folder
