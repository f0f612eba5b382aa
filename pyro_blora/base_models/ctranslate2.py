"""Read a CTranslate2 Whisper folder into transformers objects, exactly.

A CTranslate2 Whisper folder holds `model.bin` (the weights in CTranslate2's binary format,
possibly split into byte-concatenated parts), `config.json` (generation settings),
`tokenizer.json` and `vocabulary.txt`. The binary reader (`ctranslate2_binary`) and the tokenizer
repair (`ctranslate2_tokenizer`) have their own modules; this one maps every tensor to transformers'
names and rebuilds the config, processor and generation config that a hub checkpoint would carry.
Writing goes the other way through CTranslate2's own converter (see
`pyro_blora.base_models.loading.export_ctranslate2`).
"""

from __future__ import annotations

import re

import torch
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)

from pyro_blora.base_models.ctranslate2_binary import CTranslate2Files, read_variable_shapes, read_variables
from pyro_blora.base_models.ctranslate2_tokenizer import MAX_TARGET_POSITIONS, restore_missing_merges, whisper_tokenizer

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

MULTILINGUAL_VOCAB_SIZE = 51865


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
