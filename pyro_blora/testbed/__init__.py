"""Offline code-switching testbed: synthetic code-switched and backward speech for Whisper adaptation."""

from pyro_blora.testbed.build import SPLITS, TestbedConfig, build_from_text, build_testbed
from pyro_blora.testbed.grammar import CodeSwitchSpec, GeneratedSentence, generate_sentences, split_templates
from pyro_blora.testbed.languages import LanguagePair, Segment, parse_marked_text, switch_stats, tokens
from pyro_blora.testbed.manifest import testbed_domains
from pyro_blora.testbed.tts import EspeakEngine, EspeakVoice, PiperEngine, espeak_engine
from pyro_blora.testbed.wordlists import BUILTIN_PAIRS, builtin_spec, english_spec

__all__ = [
    "SPLITS", "TestbedConfig", "build_testbed", "build_from_text", "testbed_domains",
    "CodeSwitchSpec", "GeneratedSentence", "generate_sentences", "split_templates",
    "LanguagePair", "Segment", "parse_marked_text", "switch_stats", "tokens",
    "EspeakEngine", "EspeakVoice", "PiperEngine", "espeak_engine",
    "BUILTIN_PAIRS", "builtin_spec", "english_spec",
]
