"""Read a CTranslate2 Whisper folder into transformers objects, exactly.

A CTranslate2 Whisper folder holds `model.bin` (the weights in CTranslate2's binary format,
possibly split into byte-concatenated parts), `config.json` (generation settings),
`tokenizer.json` and `vocabulary.txt`. This module reads the binary format, maps every tensor
to transformers' names, and rebuilds the config, tokenizer and generation config that a hub
checkpoint would carry. Writing goes the other way through CTranslate2's own converter (see
`pyro_blora.base_models.loading.export_ctranslate2`).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import torch
from tokenizers import AddedToken
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)

__all__ = [
    "CTranslate2Files",
    "read_variables",
    "read_variable_shapes",
    "restore_missing_merges",
    "whisper_tokenizer",
    "whisper_processor",
    "whisper_config",
    "whisper_generation_config",
    "transformers_state_dict",
    "whisper_model",
]

MODEL_BIN = "model.bin"
CONFIG_JSON = "config.json"
TOKENIZER_JSON = "tokenizer.json"
VOCABULARY_TXT = "vocabulary.txt"
FOLDER_FILES = (MODEL_BIN, CONFIG_JSON, TOKENIZER_JSON, VOCABULARY_TXT)

# Whisper's timestamp tokens: <|0.00|> ... <|30.00|> in steps of 0.02 s.
N_TIMESTAMP_TOKENS = 1501
TIMESTAMP_STEP = 0.02
MAX_TARGET_POSITIONS = 448
MULTILINGUAL_VOCAB_SIZE = 51865

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


# --------------------------------------------------------------------------------------------
# The binary format
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Tokenizer and processor
# --------------------------------------------------------------------------------------------


def _bpe_split(token: str, ranks: dict[tuple[str, str], int], max_rank: int) -> list[str]:
    """Apply the merges ranked below `max_rank` to the characters of `token`."""
    pieces = list(token)
    while len(pieces) > 1:
        candidates = [
            (ranks[pair], i)
            for i, pair in enumerate(zip(pieces, pieces[1:]))
            if pair in ranks and ranks[pair] < max_rank
        ]
        if not candidates:
            break
        _, i = min(candidates)
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def restore_missing_merges(vocab: dict[str, int], merges: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Add back every merge that produces a vocabulary token no listed merge produces.

    Whisper's BPE has one merge per multi-character token, ordered by the id of the token it
    makes. Some exported tokenizer.json files drop merges (the multilingual one lacks "Ġ t"),
    which makes " the" two tokens. Each lost merge is recovered by running BPE on its token
    with the merges that come before it; what is left is the pair that was merged last.
    """
    produced = {a + b for a, b in merges}
    special = {token for token in vocab if token.startswith("<|") and token.endswith("|>")}
    missing = sorted(
        (vocab[token], token)
        for token in vocab
        if len(token) > 1 and token not in produced and token not in special
    )
    if not missing:
        return list(merges)
    by_result = {vocab[a + b]: (a, b) for a, b in merges}
    for token_id, token in missing:
        ordered = [by_result[i] for i in sorted(by_result)]
        ranks = {pair: vocab[pair[0] + pair[1]] for pair in ordered}
        pieces = _bpe_split(token, ranks, max_rank=token_id)
        if len(pieces) != 2:
            raise ValueError(f"cannot recover the merge that makes {token!r}: BPE leaves {pieces}")
        by_result[token_id] = (pieces[0], pieces[1])
    return [by_result[i] for i in sorted(by_result)]


def whisper_tokenizer(tokenizer_json: str | Path) -> WhisperTokenizer:
    """A transformers WhisperTokenizer equal to the hub one, built from a CTranslate2 tokenizer.json.

    Lost merges are restored, special tokens are marked special, and the 1501 timestamp tokens
    are appended so the vocabulary size matches the hub checkpoint's.
    """
    spec = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{tokenizer_json} does not hold a BPE tokenizer; expected Whisper's byte-level BPE")
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    merges = restore_missing_merges(vocab, merges)
    tokenizer = WhisperTokenizer(vocab=dict(vocab), merges=merges, model_max_length=MAX_TARGET_POSITIONS)

    added = sorted(spec.get("added_tokens", []), key=lambda t: t["id"])
    specials = [t["content"] for t in added if t["content"] not in vocab]
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(s, special=True, normalized=False) for s in specials]}
    )
    for entry in added:
        actual = tokenizer.convert_tokens_to_ids(entry["content"])
        if actual != entry["id"]:
            raise ValueError(
                f"special token {entry['content']!r} got id {actual}, expected {entry['id']}: {tokenizer_json} "
                "has gaps in its ids"
            )
    timestamps = [f"<|{i * TIMESTAMP_STEP:.2f}|>" for i in range(N_TIMESTAMP_TOKENS)]
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in timestamps])
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.set_prefix_tokens()
    return tokenizer


def whisper_processor(files: CTranslate2Files) -> WhisperProcessor:
    """WhisperProcessor (feature extractor + tokenizer) for a CTranslate2 Whisper model."""
    shapes = read_variable_shapes(files.model_parts)
    n_mels = shapes["encoder/conv1/weight"][1]
    feature_extractor = WhisperFeatureExtractor(feature_size=n_mels)
    return WhisperProcessor(feature_extractor=feature_extractor, tokenizer=whisper_tokenizer(files.tokenizer))


# --------------------------------------------------------------------------------------------
# Model: config, generation config, tensors
# --------------------------------------------------------------------------------------------


def _count_layers(names, stack: str) -> int:
    pattern = re.compile(rf"^{stack}/layer_(\d+)/")
    return len({match.group(1) for match in map(pattern.match, names) if match})


def whisper_config(shapes: dict[str, tuple[int, ...]], variables: dict[str, torch.Tensor] | None,
                   tokenizer: WhisperTokenizer) -> WhisperConfig:
    """WhisperConfig from tensor shapes, head counts and the tokenizer's special token ids."""
    if variables is None or "encoder/num_heads" not in variables:
        raise ValueError("model.bin lacks encoder/num_heads; it is not a CTranslate2 Whisper model")
    d_model, n_mels, _ = shapes["encoder/conv1/weight"]
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return WhisperConfig(
        vocab_size=shapes["decoder/embeddings/weight"][0],
        num_mel_bins=n_mels,
        d_model=d_model,
        encoder_layers=_count_layers(shapes, "encoder"),
        decoder_layers=_count_layers(shapes, "decoder"),
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=shapes["encoder/layer_0/ffn/linear_0/weight"][0],
        decoder_ffn_dim=shapes["decoder/layer_0/ffn/linear_0/weight"][0],
        max_source_positions=shapes["encoder/position_encodings/encodings"][0],
        max_target_positions=shapes["decoder/position_encodings/encodings"][0],
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        decoder_start_token_id=tokenizer.convert_tokens_to_ids("<|startoftranscript|>"),
        tie_word_embeddings=True,
    )


def whisper_generation_config(settings: dict, tokenizer: WhisperTokenizer) -> GenerationConfig:
    """The generation config a hub checkpoint carries, from CTranslate2's config.json and the tokenizer.

    Multilingual models get `lang_to_id` (token -> id for every language the model knows),
    `task_to_id` and `task="transcribe"`, so `generate(language=..., task=...)` and language
    detection work; English-only models get `is_multilingual=False`, so they start with
    <|startoftranscript|><|notimestamps|>. No `forced_decoder_ids`: transformers deprecates them.
    """
    ids = tokenizer.convert_tokens_to_ids
    eot = ids("<|endoftext|>")
    sot = ids("<|startoftranscript|>")
    # openai-whisper's own rule: multilingual vocabularies have 51865 tokens or more, English-only ones 51864.
    is_multilingual = len(tokenizer) >= MULTILINGUAL_VOCAB_SIZE
    fields = dict(
        alignment_heads=[list(pair) for pair in settings.get("alignment_heads", [])],
        begin_suppress_tokens=list(settings.get("suppress_ids_begin") or [220, eot]),
        suppress_tokens=list(settings.get("suppress_ids") or []),
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        decoder_start_token_id=sot,
        no_timestamps_token_id=ids("<|notimestamps|>"),
        prev_sot_token_id=ids("<|startofprev|>"),
        max_initial_timestamp_index=50,
        max_length=MAX_TARGET_POSITIONS,
        return_timestamps=False,
        is_multilingual=is_multilingual,
    )
    if is_multilingual:
        # Language tokens sit between <|startoftranscript|> and <|translate|>; some exports list none.
        lang_ids = settings.get("lang_ids") or list(range(sot + 1, ids("<|translate|>")))
        fields["lang_to_id"] = {tokenizer.convert_ids_to_tokens(i): i for i in lang_ids}
        fields["task_to_id"] = {"translate": ids("<|translate|>"), "transcribe": ids("<|transcribe|>")}
        # Without a language argument, detect the language and transcribe. Written as the `task` field:
        # the hub's older `forced_decoder_ids` make transformers warn that they are deprecated.
        fields["task"] = "transcribe"
    # English-only models need nothing forced: generate starts them with <|startoftranscript|><|notimestamps|>.
    return GenerationConfig(**fields)


def _attention_names(stack: str, layer: int) -> dict[str, str]:
    """CTranslate2 prefix -> transformers prefix for one layer's unfused parts."""
    ct2 = f"{stack}/layer_{layer}"
    hf = f"model.{stack}.layers.{layer}"
    names = {
        f"{ct2}/self_attention/linear_1": f"{hf}.self_attn.out_proj",
        f"{ct2}/self_attention/layer_norm": f"{hf}.self_attn_layer_norm",
        f"{ct2}/ffn/linear_0": f"{hf}.fc1",
        f"{ct2}/ffn/linear_1": f"{hf}.fc2",
        f"{ct2}/ffn/layer_norm": f"{hf}.final_layer_norm",
    }
    if stack == "decoder":
        names.update(
            {
                f"{ct2}/attention/linear_0": f"{hf}.encoder_attn.q_proj",
                f"{ct2}/attention/linear_2": f"{hf}.encoder_attn.out_proj",
                f"{ct2}/attention/layer_norm": f"{hf}.encoder_attn_layer_norm",
            }
        )
    return names


_PARAMETER_NAMES = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}


def _split_fused(state: dict, variables: dict, fused: str, targets: list[str]) -> None:
    """Split a row-stacked CTranslate2 linear into equal parts; k_proj has no bias in transformers."""
    weights = variables.pop(f"{fused}/weight").chunk(len(targets), dim=0)
    biases = variables.pop(f"{fused}/bias").chunk(len(targets), dim=0)
    for target, weight, bias in zip(targets, weights, biases):
        state[f"{target}.weight"] = weight.contiguous()
        if not target.endswith("k_proj"):
            state[f"{target}.bias"] = bias.contiguous()


def transformers_state_dict(variables: dict[str, torch.Tensor], config: WhisperConfig) -> dict[str, torch.Tensor]:
    """Map every CTranslate2 Whisper tensor to its transformers name; refuse leftovers."""
    variables = {k: v for k, v in variables.items() if v.dim() > 0}
    state: dict[str, torch.Tensor] = {}
    renames: dict[str, str] = {}
    for stack in ("encoder", "decoder"):
        renames[f"{stack}/position_encodings/encodings"] = f"model.{stack}.embed_positions.weight"
        renames[f"{stack}/layer_norm"] = f"model.{stack}.layer_norm"
        n_layers = config.encoder_layers if stack == "encoder" else config.decoder_layers
        for layer in range(n_layers):
            renames.update(_attention_names(stack, layer))
            hf = f"model.{stack}.layers.{layer}"
            _split_fused(state, variables, f"{stack}/layer_{layer}/self_attention/linear_0",
                         [f"{hf}.self_attn.{p}_proj" for p in "qkv"])
            if stack == "decoder":
                _split_fused(state, variables, f"decoder/layer_{layer}/attention/linear_1",
                             [f"{hf}.encoder_attn.{p}_proj" for p in "kv"])
    for conv in ("conv1", "conv2"):
        renames[f"encoder/{conv}"] = f"model.encoder.{conv}"
    renames["decoder/embeddings/weight"] = "model.decoder.embed_tokens.weight"

    projection = variables.pop("decoder/projection/weight", None)
    for name, value in variables.items():
        prefix, _, leaf = name.rpartition("/")
        if name in renames:
            state[renames[name]] = value
        elif prefix in renames and leaf in _PARAMETER_NAMES:
            state[f"{renames[prefix]}.{_PARAMETER_NAMES[leaf]}"] = value
        else:
            raise ValueError(f"model.bin holds {name!r}, which has no transformers counterpart in Whisper")
    embeddings = state["model.decoder.embed_tokens.weight"]
    if projection is not None and not torch.equal(projection, embeddings):
        raise ValueError("decoder/projection differs from decoder/embeddings; untied output projections are not supported")
    state["proj_out.weight"] = embeddings
    return state


def whisper_model(files: CTranslate2Files, tokenizer: WhisperTokenizer) -> WhisperForConditionalGeneration:
    """A float32 transformers Whisper model holding exactly the CTranslate2 weights (strict load)."""
    variables = read_variables(files.model_parts)
    shapes = {name: tuple(value.shape) for name, value in variables.items()}
    config = whisper_config(shapes, variables, tokenizer)
    state = transformers_state_dict(variables, config)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.generation_config = whisper_generation_config(files.generation_settings(), tokenizer)
    return model.eval()
