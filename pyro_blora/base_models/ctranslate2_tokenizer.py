"""Rebuild the hub's WhisperTokenizer from the `tokenizer.json` of a CTranslate2 Whisper folder.

Exported tokenizer files can lose BPE merges and lack the timestamp tokens; both are put back, so token ids
and the vocabulary size match the hub checkpoint's.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken
from transformers import WhisperTokenizer

__all__ = ["MAX_TARGET_POSITIONS", "restore_missing_merges", "whisper_tokenizer"]

# Whisper's timestamp tokens: <|0.00|> ... <|30.00|> in steps of 0.02 s.
N_TIMESTAMP_TOKENS = 1501
TIMESTAMP_STEP = 0.02
MAX_TARGET_POSITIONS = 448

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
