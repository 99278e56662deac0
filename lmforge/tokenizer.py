"""Tokenizer: a thin wrapper over Hugging Face `tokenizers`, built from a `tokenizer.json`,
from a GGUF file's vocabulary and merges, or from a tiktoken file.

The wrapper adds what lmforge needs beside encode/decode: the special token ids, the chat
template text, and `save(dir)` writing files that `transformers.AutoTokenizer` loads.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from lmforge.errors import LmforgeError

# GPT-2's split; llama.cpp's "smollm"/"starcoder" pre-tokenizers add one digit per piece first.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Pre-tokenizer per GGUF `tokenizer.ggml.pre`, as llama.cpp defines them (llama-vocab.cpp).
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_GPT2_LIKE = ("gpt2", "gpt-2", "default", "mpt", "olmo", "jais")
_LLAMA3_LIKE = ("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe")
_QWEN2_LIKE = ("qwen2", "deepseek-r1-qwen")


def byte_level_pre_tokenizer(pre: str | None):
    pre = (pre or "default").lower()
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    if pre in _GPT2_LIKE:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    split = LLAMA3_SPLIT if pre in _LLAMA3_LIKE else QWEN2_SPLIT if pre in _QWEN2_LIKE else None
    if split is None:
        raise LmforgeError(f"unsupported GGUF pre-tokenizer '{pre}' (supported: {', '.join(_DIGITS_THEN_GPT2 + _GPT2_LIKE + _LLAMA3_LIKE + _QWEN2_LIKE)})")
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


def _gpt2_backend(meta: dict) -> HFTokenizer:
    """A byte-level BPE from a GGUF's tokens, merges and pre-tokenizer name."""
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    backend.decoder = decoders.ByteLevel()
    from lmforge.tokenizer_spm import add_typed_tokens

    add_typed_tokens(backend, tokens, types)
    return backend


def unicode_problem(text: str) -> str | None:
    """What makes `text` not valid Unicode (a lone surrogate, U+D800..U+DFFF: JSON's "\\ud800",
    or undecodable bytes in argv kept by Python as U+DC80..U+DCFF), or None when it is valid.
    The description holds no character of `text` that cannot be printed or sent as UTF-8."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"lone surrogate U+{ord(text[e.start]):04X} at character {e.start}"
    return None


def check_unicode(text) -> None:
    """LmforgeError('text is not valid Unicode: ...') when `text` is a str holding a lone surrogate."""
    problem = unicode_problem(text) if isinstance(text, str) else None
    if problem is not None:
        raise LmforgeError(f"text is not valid Unicode: {problem}") from None


@dataclass
class Tokenizer:
    backend: HFTokenizer
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    chat_template: str | None = None
    add_bos: bool = False
    extra_config: dict = field(default_factory=dict)
    # trusted input only (--allow-special-in-content): special-token strings in message text act as
    # special tokens; never saved with the tokenizer
    allow_special_in_content: bool = False
    # extra variables every render of the chat template gets (--template-kwargs: Qwen3's
    # enable_thinking); a request's own template_kwargs go over them; never saved
    template_kwargs: dict = field(default_factory=dict)

    # -- ids ------------------------------------------------------------------------------
    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        pid = self.token_to_id(self.pad_token)
        return pid if pid is not None else self.eos_id

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> list[str]:
        return [t.content for t in self.backend.get_added_tokens_decoder().values() if t.special]

    def stop_ids(self) -> set[int]:
        """Token ids that end a reply: EOS plus ChatML's end-of-turn and end-of-text tokens."""
        ids = {self.eos_id}
        for tok in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>"):
            ids.add(self.token_to_id(tok))
        return {i for i in ids if i is not None}

    # -- text -----------------------------------------------------------------------------
    # The backend refuses text with a lone surrogate with a bare TypeError ("TextInputSequence must
    # be str"); every encode turns that into a one-line LmforgeError saying what and where. The
    # check runs only when the backend refuses, so valid text costs nothing extra.
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        try:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        except TypeError:
            check_unicode(text)
            raise
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def encode_text(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, offsets) of untrusted text (a user's, a tool result's, a document's): a special
        token's string in it becomes ordinary tokens, so text can never open a turn or a role of
        its own. Special tokens come only from the chat template (`lmforge.chat`), unless the
        caller opted in with `allow_special_in_content` for input it trusts."""
        if self.allow_special_in_content:
            return self.encode_with_offsets(text)
        plain = self.__dict__.get("_plain")
        if plain is None:  # a second backend, never toggled: safe while other threads encode
            plain = HFTokenizer.from_str(self.backend.to_str())
            plain.encode_special_tokens = True
            self.__dict__["_plain"] = plain
        try:
            enc = plain.encode(text, add_special_tokens=False)
        except TypeError:
            check_unicode(text)
            raise
        return enc.ids, enc.offsets

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        try:
            enc = self.backend.encode(text, add_special_tokens=False)
        except TypeError:
            check_unicode(text)
            raise
        return enc.ids, enc.offsets

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        try:
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        except TypeError:
            for i, t in enumerate(texts):
                problem = unicode_problem(t) if isinstance(t, str) else None
                if problem is not None:
                    raise LmforgeError(f"text {i} of the batch is not valid Unicode: {problem}") from None
            raise

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    # -- files ----------------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (HF layout)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out / "tokenizer.json"))
        specials = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token), ("pad_token", self.pad_token)) if v}
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": self.extra_config.get("model_max_length", 8192),
            "add_bos_token": self.add_bos,
            "clean_up_tokenization_spaces": False,
            **specials,
        }
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
        (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False))

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """An HF-style folder: tokenizer.json plus optional tokenizer_config.json / chat_template.jinja."""
        path = Path(path)
        tj = path / "tokenizer.json" if path.is_dir() else path
        if not tj.exists():
            raise LmforgeError(f"no tokenizer.json in {path}")
        try:
            backend = HFTokenizer.from_file(str(tj))
        except Exception as e:
            raise LmforgeError(f"cannot read tokenizer {tj}: {e}") from None
        folder = tj.parent
        cfg = {}
        if (folder / "tokenizer_config.json").exists():
            cfg = json.loads((folder / "tokenizer_config.json").read_text())

        def tok(name):
            v = cfg.get(name)
            return v.get("content") if isinstance(v, dict) else v

        template = cfg.get("chat_template")
        if isinstance(template, list):  # HF allows named templates; take the default one
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        if (folder / "chat_template.jinja").exists():
            template = (folder / "chat_template.jinja").read_text()
        elif (folder / "chat_template.json").exists():
            template = json.loads((folder / "chat_template.json").read_text()).get("chat_template", template)
        return cls(
            backend,
            bos_token=tok("bos_token"),
            eos_token=tok("eos_token"),
            pad_token=tok("pad_token"),
            chat_template=template,
            add_bos=bool(cfg.get("add_bos_token", False)),
        )

    @classmethod
    def from_gguf_fields(cls, meta: dict) -> "Tokenizer":
        """Build from GGUF tokenizer metadata (`tokenizer.ggml.*`): byte-level BPE ("gpt2") or
        SentencePiece ("llama": Llama 2, Mistral, Gemma, Phi-3)."""
        model = meta.get("tokenizer.ggml.model")
        if model == "llama":
            from lmforge.tokenizer_spm import spm_backend

            backend = spm_backend(meta)
        elif model == "gpt2":
            backend = _gpt2_backend(meta)
        else:
            raise LmforgeError(f"unsupported GGUF tokenizer model '{model}' (supported: gpt2 byte-level BPE, llama SentencePiece)")
        tokens: list[str] = meta["tokenizer.ggml.tokens"]

        def name(key):
            i = meta.get(key)
            return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

        return cls(
            backend,
            bos_token=name("tokenizer.ggml.bos_token_id"),
            eos_token=name("tokenizer.ggml.eos_token_id"),
            pad_token=name("tokenizer.ggml.padding_token_id"),
            chat_template=meta.get("tokenizer.chat_template"),
            # llama.cpp starts SentencePiece text with BOS unless the file says otherwise
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama")),
        )

    @classmethod
    def from_tiktoken(cls, path: str | Path, pattern: str | None = None, special_tokens: dict[str, int] | None = None) -> "Tokenizer":
        """A `.tiktoken` file (base64 token, rank per line) as a byte-level BPE.

        Merges are recovered the usual way: each multi-byte token splits into the pair of
        lower-ranked tokens whose BPE merge produces it.
        """
        path = Path(path)
        ranks: dict[bytes, int] = {}
        for line in path.read_text().splitlines():
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
        byte_enc = _bytes_to_unicode()

        def spell(b: bytes) -> str:
            return "".join(byte_enc[x] for x in b)

        merges = []
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            if len(tok) == 1:
                continue
            pair = _bpe_split(ranks, tok, rank)
            if pair is None:
                raise LmforgeError(f"cannot recover merges from {path}: token rank {rank} is not a merge")
            merges.append((spell(pair[0]), spell(pair[1])))
        vocab = {spell(t): r for t, r in ranks.items()}
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        split = pattern or (LLAMA3_SPLIT if "cl100k" in path.name or "o200k" in path.name else GPT2_SPLIT)
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        backend.decoder = decoders.ByteLevel()
        specials = special_tokens or {"<|endoftext|>": len(ranks)}
        for tok, i in sorted(specials.items(), key=lambda kv: kv[1]):
            backend.add_special_tokens([AddedToken(tok, special=True, normalized=False)])
        eos = next(iter(specials))
        return cls(backend, eos_token=eos, pad_token=eos)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int):
    """Run BPE on `token` using only merges ranked below it; the last two parts are its merge."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            return None
        i = best[1]
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2 :]
    return tuple(parts) if len(parts) == 2 else None
