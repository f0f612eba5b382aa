"""The tests' tiny random Whisper and memorisation task: the package's :mod:`pyro_blora.base_models.tiny`."""

from pyro_blora.base_models.tiny import EOT, FRAMES, MELS, PAD, SOT, VOCAB, TinyTask, collate, tiny_config, tiny_whisper

__all__ = ["EOT", "FRAMES", "MELS", "PAD", "SOT", "VOCAB", "TinyTask", "collate", "tiny_config", "tiny_whisper"]
