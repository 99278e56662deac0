"""Prompts with images: chat messages with image parts -> token ids + pixels, as transformers'
`Idefics3Processor` (and SmolVLM's) builds them.

The chat template writes one `<image>` per image part. Each is then expanded by the image's
tile grid: for every tile `<fake_token_around_image><row_R_col_C>` + `image_seq_len` x `<image>`
(a newline after each row of tiles), then `\\n<fake_token_around_image><global-img>` +
`image_seq_len` x `<image>` + `<fake_token_around_image>` for the global view; an image that fits
one tile gets only the global part, without the leading newline. The model puts one feature
vector on each `<image>` token.

Special tokens come only from the template (`lmforge.chat`'s rule): when a message's text holds
a special token's string, that text is encoded as plain text. Otherwise the whole prompt is
encoded in one piece, exactly as transformers' processor tokenizes it.
"""
from __future__ import annotations

import base64
import re
from dataclasses import dataclass

import torch

from lmforge.errors import LmforgeError
from lmforge.vision.preprocess import ImageBatch, ImageConfig, preprocess_images

IMAGE_TOKEN = "<image>"
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"


def image_prompt(rows: int, cols: int, seq_len: int) -> str:
    """The text that stands for one image of `rows` x `cols` tiles (0, 0: a single tile)."""
    image = IMAGE_TOKEN * seq_len
    whole = f"{FAKE_TOKEN}{GLOBAL_TOKEN}{image}{FAKE_TOKEN}"
    if rows == 0 and cols == 0:
        return whole
    grid = "".join("".join(f"{FAKE_TOKEN}<row_{r + 1}_col_{c + 1}>{image}" for c in range(cols)) + "\n" for r in range(rows))
    return f"{grid}\n{whole}"


def expand_image_tokens(text: str, grids: list[tuple[int, int]], seq_len: int) -> str:
    """`text` with its i-th `<image>` replaced by `image_prompt(*grids[i], seq_len)`."""
    pieces = text.split(IMAGE_TOKEN)
    if len(pieces) - 1 != len(grids):
        raise LmforgeError(f"the prompt has {len(pieces) - 1} {IMAGE_TOKEN} tokens but {len(grids)} images were given")
    out = [pieces[0]]
    for (rows, cols), piece in zip(grids, pieces[1:]):
        out += [image_prompt(rows, cols, seq_len), piece]
    return "".join(out)


@dataclass
class VisionPrompt:
    """A rendered prompt: token ids, and the images' pixels (None without images)."""

    ids: list[int]
    images: ImageBatch | None

    @property
    def pixel_values(self) -> torch.Tensor | None:
        return None if self.images is None else self.images.pixel_values

    @property
    def pixel_attention_mask(self) -> torch.Tensor | None:
        return None if self.images is None else self.images.pixel_attention_mask


def has_images(messages: list[dict]) -> bool:
    """Whether any message holds an image part."""
    return any(isinstance(m.get("content"), list) and any(isinstance(p, dict) and p.get("type") in ("image", "image_url")
                                                          for p in m["content"]) for m in messages)


def split_images(messages: list[dict]) -> tuple[list[dict], list]:
    """(messages whose image parts are bare `{"type": "image"}` for the template, the images in
    order). An image part is `{"type": "image", "image": PIL image | path | bytes}` or OpenAI's
    `{"type": "image_url", "image_url": {"url": "data:image/...;base64,..."}}` (no downloads)."""
    out, images = [], []
    for i, m in enumerate(messages):
        content = m.get("content")
        if not isinstance(content, list):
            out.append({**m, "content": [{"type": "text", "text": "" if content is None else str(content)}]})
            continue
        parts = []
        for p in content:
            kind = p.get("type") if isinstance(p, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": str(p.get("text", ""))})
            elif kind in ("image", "image_url"):
                images.append(_image_of(p, i))
                parts.append({"type": "image"})
            else:
                raise LmforgeError(f"message {i}: unsupported content part {kind!r} (expected text, image or image_url)")
        out.append({**m, "content": parts})
    return out, images


def _image_of(part: dict, i: int):
    if part.get("type") == "image":
        if isinstance(part.get("data"), str):  # base64 text, as JSON carries bytes
            try:
                return base64.b64decode(part["data"].split(",", 1)[-1], validate=True)
            except ValueError:
                raise LmforgeError(f"message {i}: an image part's 'data' is not valid base64") from None
        for key in ("image", "path", "data", "url"):
            if part.get(key) is not None:
                return part[key]
        raise LmforgeError(f"message {i}: an image part needs 'path', 'data' (bytes or base64) or 'image' (a PIL image)")
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str) or not url.startswith("data:"):
        raise LmforgeError(f"message {i}: image_url must be a data: URL (lmforge does not download images)")
    try:
        return base64.b64decode(url.split(",", 1)[1], validate=True)
    except (IndexError, ValueError):
        raise LmforgeError(f"message {i}: image_url is not valid base64 data") from None


_MARK = "\ue000{}\ue001"  # private-use characters stand in for message text (as lmforge.chat does)
_MARK_RE = re.compile("\ue000(\\d+)\ue001")


def render_chat(tokenizer, messages: list[dict], image_config: ImageConfig | None = None, image_seq_len: int = 169,
                add_generation_prompt: bool = True) -> VisionPrompt:
    """Token ids and pixels of a conversation with image parts, ready for the assistant's turn
    (`add_generation_prompt`). `VLM.render_chat` fills in the model's settings."""
    msgs, images = split_images(messages)
    batch = preprocess_images([images], image_config) if images else None
    grids = batch.grids[0] if batch is not None else []
    return VisionPrompt(prompt_ids(tokenizer, msgs, grids, image_seq_len, add_generation_prompt), batch)


def render_training(tokenizer, messages: list[dict], image_config: ImageConfig | None = None,
                    image_seq_len: int = 169) -> tuple[list[int], list[int], list]:
    """(ids, loss mask, images) of a whole conversation with image parts, for SFT: the mask is 1
    on each assistant turn (its end-of-turn token included), found as `lmforge.chat` finds it:
    the conversation up to the turn's generation prompt is a prefix of the one up to its end."""
    msgs, images = split_images(messages)
    grids = preprocess_images([images], image_config).grids[0] if images else []

    def ids_upto(k: int, gen: bool) -> list[int]:
        n = sum(p["type"] == "image" for m in msgs[:k] for p in m["content"])
        return prompt_ids(tokenizer, msgs[:k], grids[:n], image_seq_len, gen)

    full = ids_upto(len(msgs), False)
    mask = [0] * len(full)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before, upto = ids_upto(i, True), ids_upto(i + 1, False)
        if full[:len(upto)] != upto or upto[:len(before)] != before:
            raise LmforgeError("the chat template does not render conversations prefix by prefix; cannot mark assistant turns")
        end = len(upto)
        while end > len(before) + 1 and not tokenizer.decode([upto[end - 1]]).strip():
            end -= 1  # the newline after the end-of-turn token belongs to the template
        mask[len(before):end] = [1] * (end - len(before))
    return full, mask, images


def prompt_ids(tokenizer, msgs: list[dict], grids: list, image_seq_len: int, add_generation_prompt: bool) -> list[int]:
    """Token ids of `split_images` messages whose images have these tile grids."""
    from lmforge.chat import _render

    texts = [p["text"] for m in msgs for p in m["content"] if p["type"] == "text"]
    marked, n = [], 0
    for m in msgs:
        parts = []
        for p in m["content"]:
            if p["type"] == "text":
                p, n = {"type": "text", "text": _MARK.format(n)}, n + 1
            parts.append(p)
        marked.append({**m, "content": parts})
    template = _render(tokenizer, marked, add_generation_prompt)
    if template.count(IMAGE_TOKEN) != len(grids):
        raise LmforgeError(f"the chat template wrote {template.count(IMAGE_TOKEN)} {IMAGE_TOKEN} tokens for {len(grids)} images")
    pieces, pos = [], 0  # (text, from the template)
    for hit in _MARK_RE.finditer(template):
        pieces += [(template[pos:hit.start()], True), (texts[int(hit.group(1))], False)]
        pos = hit.end()
    pieces.append((template[pos:], True))
    if len(pieces) != 2 * len(texts) + 1:  # the template dropped or rewrote a text part
        raise LmforgeError("the chat template does not write message text as given; cannot keep it apart from special tokens")
    ids = _encode(tokenizer, pieces, grids, image_seq_len)
    if getattr(tokenizer, "add_bos", False) and tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
        ids = [tokenizer.bos_id] + ids
    return ids


def _encode(tokenizer, pieces: list[tuple[str, bool]], grids, seq_len: int) -> list[int]:
    """Template pieces get their images expanded; the whole is encoded at once unless a
    message's text holds an added token's string, which then stays plain text."""
    added = [t.content for t in tokenizer.backend.get_added_tokens_decoder().values() if t.content]
    out, k = [], 0
    for text, from_template in pieces:
        if from_template:
            n = text.count(IMAGE_TOKEN)
            text, k = expand_image_tokens(text, grids[k:k + n], seq_len), k + n
        out.append((text, from_template))
    if not any(t in text for text, trusted in out if not trusted for t in added):
        return tokenizer.encode_with_offsets("".join(t for t, _ in out))[0]
    ids = []
    for text, from_template in out:
        ids += (tokenizer.encode_with_offsets(text) if from_template else tokenizer.encode_text(text))[0]
    return ids
