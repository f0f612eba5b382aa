"""Speech data for Whisper fine-tuning on top of Hugging Face `datasets`, without torchcodec.

load_speech_dataset -> prepare_dataset (checks, features, labels, on-disk cache) -> make_dataloader.
"""

from pyro_blora.data.audio import AudioDecodeError, load_audio
from pyro_blora.data.collate import IGNORE_INDEX, PreparedSpeechDataset, SpeechCollator, make_dataloader
from pyro_blora.data.columns import CANONICAL_COLUMNS, MissingColumnError
from pyro_blora.data.labels import TranscriptEncoder, UnknownLanguageError, decoder_start_token_id, is_english_only
from pyro_blora.data.manifest import ManifestError
from pyro_blora.data.prepare import PrepareOptions, prepare_dataset
from pyro_blora.data.report import DataReport, NoUsableRowsError
from pyro_blora.data.sources import load_speech_dataset

__all__ = [
    "AudioDecodeError",
    "CANONICAL_COLUMNS",
    "DataReport",
    "IGNORE_INDEX",
    "ManifestError",
    "MissingColumnError",
    "NoUsableRowsError",
    "PrepareOptions",
    "PreparedSpeechDataset",
    "SpeechCollator",
    "TranscriptEncoder",
    "UnknownLanguageError",
    "decoder_start_token_id",
    "is_english_only",
    "load_audio",
    "load_speech_dataset",
    "make_dataloader",
    "prepare_dataset",
]
