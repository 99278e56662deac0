"""SentencePiece vocabularies as GGUF holds them (`tokenizer.ggml.model = llama`: Llama 2,
Mistral, Gemma, Phi-3), in and out.

llama.cpp tokenizes such a vocabulary by turning spaces into "▁", putting one "▁" before the
text and after each special token (unless `add_space_prefix` is false, as in Gemma), and then
merging the adjacent pair whose joined text is the highest-scoring token, until none is left;
characters outside the vocabulary become their UTF-8 bytes (`<0x41>` tokens). A `tokenizers` BPE
whose merges are every split of every token, ranked by the joined token's score, does the same;
`transformers` reads these files the same way.

Out: a `tokenizers` BPE with byte fallback and "▁" for spaces (what `transformers` saves for
Llama-family tokenizers) is written with each token's score the negative rank of the merge that
makes it, so llama.cpp's highest score is the BPE's first merge.
"""
from __future__ import annotations

import json

from tokenizers import AddedToken, decoders, models, normalizers
from tokenizers import Tokenizer as HFTokenizer

SPACE = "\u2581"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def first_ids(tokens: list[str]) -> dict[str, int]:
    """Each token's id (its first, when a vocabulary lists a text twice)."""
    ids: dict[str, int] = {}
    for i, t in enumerate(tokens):
        ids.setdefault(t, i)
    return ids


def spm_merges(tokens: list[str], scores: list[float], ids: dict[str, int]) -> list[tuple[str, str]]:
    """Every split (a, b) of every token into two tokens (`ids`: `first_ids(tokens)`), best
    joined score first (ties: by the pieces' ids, so the order is fixed)."""
    found = []
    for t, score in zip(tokens, scores):
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            if a in ids and b in ids:
                found.append((-score, ids[a], ids[b], a, b))
    found.sort()
    return [(a, b) for *_, a, b in found]


def spm_backend(meta: dict) -> HFTokenizer:
    """A `tokenizers` backend for a GGUF's SentencePiece vocabulary (`tokenizer.ggml.*`)."""
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    vocab = first_ids(tokens)
    bpe = models.BPE(vocab=vocab, merges=spm_merges(tokens, scores, vocab), unk_token=tokens[int(unk)] if unk is not None else None,
                     fuse_unk=True, byte_fallback=True)
    backend = HFTokenizer(bpe)
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    backend.normalizer = normalizers.Sequence(([normalizers.Prepend(SPACE)] if prefix else []) + [normalizers.Replace(" ", SPACE)])
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    add_typed_tokens(backend, tokens, types, special=(UNKNOWN, CONTROL))
    return backend


def add_typed_tokens(backend: HFTokenizer, tokens: list[str], types: list[int], special=(CONTROL,)) -> None:
    """A GGUF vocabulary's token types on a backend: those of `special` types become special
    tokens; USER_DEFINED ones are matched whole but are not special (both vocabulary kinds)."""
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in special])
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    if user:
        backend.add_tokens(user)


def is_spm(tj: dict) -> bool:
    """Whether a tokenizer.json is a SentencePiece-style BPE: byte fallback and "▁" for spaces."""
    model = tj.get("model") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and SPACE in _text_steps(tj)


def _text_steps(tj: dict) -> str:
    return json.dumps([tj.get("normalizer"), tj.get("pre_tokenizer")], ensure_ascii=False)


def adds_space_prefix(tj: dict) -> bool:
    """Whether the tokenizer puts "▁" before the text (Llama, Mistral), or not (Gemma)."""
    text = _text_steps(tj)
    return '"Prepend"' in text or '"prepend_scheme": "always"' in text or '"prepend_scheme": "first"' in text


def spm_scores(tokens: list[str], merges: list, types: list[int]) -> list[float]:
    """Scores that make llama.cpp merge as the BPE does: minus the rank of the merge that makes
    a token; tokens no merge makes score below all of them."""
    rank: dict[str, int] = {}
    for r, m in enumerate(merges):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, r)
    floor = -float(len(merges))
    return [0.0 if ty in (CONTROL, BYTE, UNKNOWN) else -float(rank[t]) if t in rank else floor - i
            for i, (t, ty) in enumerate(zip(tokens, types))]
