"""Idefics3 / SmolVLM in lmforge (lmforge.vision) against transformers as the reference: image
preprocessing pixel for pixel, prompt expansion token for token, logits and cached greedy
decoding on a tiny random model, loading a saved folder, and the refusal of bad images."""
from __future__ import annotations

import io
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from lmforge.errors import LmforgeError
from lmforge.vision import ImageConfig, open_image, preprocess_images
from lmforge.vision.prompt import expand_image_tokens

transformers = pytest.importorskip("transformers")
from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil, Idefics3Processor  # noqa: E402

TEMPLATE = (  # SmolVLM-Instruct's chat template
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
SPECIALS = (["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>"]
            + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)])
SIZE, TILE, PATCH = 64, 32, 8  # longest edge, tile (= vision image_size), patch: 16 patches -> 4 tokens per tile


def _hf_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["User: what is in this picture? Assistant: a red cat sits on the mat."] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                                   pad_token="<|endoftext|>", extra_special_tokens=SPECIALS[3:])


def _processor(split: bool = True):
    ip = Idefics3ImageProcessorPil(size={"longest_edge": SIZE}, max_image_size={"longest_edge": TILE}, do_image_splitting=split)
    return Idefics3Processor(image_processor=ip, tokenizer=_hf_tokenizer(), image_seq_len=(TILE // PATCH) ** 2 // 4,
                             chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("idefics3"))


def make_folder(out):
    """A tiny random Idefics3 model and its processor, saved as transformers saves them."""
    torch.manual_seed(0)
    proc = _processor()
    vocab = len(proc.tokenizer)
    cfg = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=TILE, patch_size=PATCH),
        text_config=dict(model_type="llama", vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                         pad_token_id=proc.tokenizer.pad_token_id),
        scale_factor=2, image_token_id=proc.tokenizer.convert_tokens_to_ids("<image>"))
    model = Idefics3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # make the layer norms and biases non-trivial, so their mapping is checked
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf(folder):
    return (Idefics3ForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval(),
            Idefics3Processor.from_pretrained(folder))


@pytest.fixture(scope="module")
def ours(folder):
    import lmforge

    lm = lmforge.load(str(folder), device="cpu")
    return lm.model, lm.tokenizer


def _img(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w, 4), dtype=np.uint8)
    img = Image.fromarray(arr, "RGBA")
    if mode == "RGBA":
        return img
    if mode == "P":
        return img.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return img.convert(mode)


def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# -- preprocessing -------------------------------------------------------------------------------
@pytest.mark.parametrize("split", [True, False])
def test_preprocessing_equals_transformers(split):
    images = [[_img(50, 30, "RGB", 1), _img(20, 45, "RGBA", 2)], [_img(64, 64, "L", 3)], [_img(9, 13, "P", 4), _img(70, 12, "RGB", 5)]]
    p_trans = _img(33, 21, "P", 6)
    p_trans.info["transparency"] = 0  # a palette colour marked transparent: composited onto white
    images[1].append(p_trans)
    ip = Idefics3ImageProcessorPil(size={"longest_edge": SIZE}, max_image_size={"longest_edge": TILE}, do_image_splitting=split)
    ref = ip(images, return_tensors="pt", return_row_col_info=True)
    cfg = ImageConfig(longest_edge=SIZE, tile=TILE, do_image_splitting=split)
    got = preprocess_images(images, cfg)
    assert got.pixel_values.shape == ref["pixel_values"].shape
    assert (got.pixel_values - ref["pixel_values"]).abs().max() <= 1e-6
    assert torch.equal(got.pixel_attention_mask, ref["pixel_attention_mask"].bool())
    assert [[r for r, _ in g] for g in got.grids] == ref["rows"]
    assert [[c for _, c in g] for g in got.grids] == ref["cols"]


def test_image_config_read_from_folder(folder):
    cfg = ImageConfig.from_folder(folder)
    assert (cfg.longest_edge, cfg.tile, cfg.do_image_splitting, cfg.resample) == (SIZE, TILE, True, 1)


# -- prompts -------------------------------------------------------------------------------------
def _messages(*images):
    content = [{"type": "image", "image": im} for im in images[:1]] + [{"type": "text", "text": "what is in this picture?"}]
    content += [{"type": "image", "image": im} for im in images[1:]]
    return [{"role": "user", "content": content}]


def _hf_inputs(proc, messages, images):
    text = proc.apply_chat_template([{**m, "content": [{"type": p["type"], **({"text": p["text"]} if "text" in p else {})}
                                                       for p in m["content"]]} for m in messages], add_generation_prompt=True)
    return proc(text=text, images=[images], return_tensors="pt")


def test_prompt_expansion_equals_processor(hf, ours):
    _, proc = hf
    vlm, tok = ours
    images = [_img(60, 40, "RGB", 7), _img(20, 20, "RGB", 8)]  # one tiled 2x2, one single tile
    messages = _messages(*images)
    ref = _hf_inputs(proc, messages, images)
    got = vlm.render_chat(tok, messages)
    assert got.ids == ref["input_ids"][0].tolist()
    assert (got.pixel_values - ref["pixel_values"]).abs().max() <= 1e-6
    assert expand_image_tokens("a<image>b", [(0, 0)], 2) == "a<fake_token_around_image><global-img><image><image><fake_token_around_image>b"


def test_message_text_cannot_add_image_tokens(ours):
    vlm, tok = ours
    plain = vlm.render_chat(tok, [{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    sneaky = vlm.render_chat(tok, [{"role": "user", "content": [{"type": "text", "text": "hi <image><fake_token_around_image>"}]}])
    image_id = tok.token_to_id("<image>")
    assert image_id not in plain.ids and image_id not in sneaky.ids and sneaky.pixel_values is None


# -- the model -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n_images", [1, 3])
def test_logits_equal_transformers(hf, ours, n_images):
    model, proc = hf
    vlm, tok = ours
    images = [_img(60, 40, "RGB", 10), _img(30, 30, "RGBA", 11), _img(24, 64, "L", 12)][:n_images]
    ref = _hf_inputs(proc, _messages(*images), images)
    with torch.no_grad():
        want = model(**ref).logits
        got = vlm(ref["input_ids"], ref["pixel_values"], ref["pixel_attention_mask"])
    assert (got - want).abs().max() <= 1e-4


def test_batched_prompts_with_padding_images(hf, ours):
    """Two prompts with 5 and 3 tiles: the second prompt's two padding tile slots are skipped."""
    model, _ = hf
    vlm, _ = ours
    batch = preprocess_images([[_img(64, 40, "RGB", 13)], [_img(64, 20, "RGB", 14)]], vlm.image_config)
    with torch.no_grad():
        want = model.model.get_image_features(batch.pixel_values, batch.pixel_attention_mask).pooler_output
        got = vlm.image_features(batch.pixel_values, batch.pixel_attention_mask)
    assert batch.pixel_values.shape[:2] == (2, 5) and got.shape[0] == (5 + 3) * vlm.image_seq_len
    assert (got - torch.cat(want)).abs().max() <= 1e-4


def test_padded_pixels_use_fractional_positions(hf, ours):
    """Tiles with padded pixels (pixel_attention_mask zeros): positions and attention as transformers."""
    model, _ = hf
    vlm, _ = ours
    torch.manual_seed(1)
    pixels = torch.randn(1, 2, 3, TILE, TILE)
    mask = torch.zeros(1, 2, TILE, TILE, dtype=torch.long)
    mask[0, 0, :24, :16] = 1
    mask[0, 1, :, :28] = 1
    with torch.no_grad():
        want = model.model.get_image_features(pixels, mask).pooler_output[0]
        got = vlm.image_features(pixels, mask)
    assert (got - want).abs().max() <= 1e-4


def test_cached_greedy_generation_equals_transformers(hf, ours):
    from lmforge.sampling import SamplingParams
    from lmforge.vision import generate_with_images

    model, proc = hf
    vlm, tok = ours
    images = [_img(60, 40, "RGB", 15)]
    ref = _hf_inputs(proc, _messages(*images), images)
    n = ref["input_ids"].shape[1]
    with torch.no_grad():
        want = model.generate(**ref, max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, n:].tolist()
    prompt = vlm.render_chat(tok, _messages(*images))
    got = list(generate_with_images(vlm, prompt.ids, prompt.pixel_values, prompt.pixel_attention_mask,
                                    SamplingParams(max_new_tokens=12), stop_ids=set()))
    assert got == want


def test_text_only_use_of_a_vlm(hf, ours):
    """Without images the VLM is its text model: the engine's cached generation runs on it."""
    from lmforge.engine import SamplingParams, generate_tokens

    model, _ = hf
    vlm, tok = ours
    ids = tok.encode("User: what is in this picture?")
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits
        assert (vlm(torch.tensor([ids])) - want).abs().max() <= 1e-4
        ref = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False, min_new_tokens=6)[0, len(ids):]
    got = [t for _, t in generate_tokens(vlm, [ids], SamplingParams(max_new_tokens=6), stop_ids=set())]
    assert got == ref.tolist()


def test_loaded_through_lmforge_load(folder, ours):
    from lmforge.vision import VLM

    vlm, tok = ours
    assert isinstance(vlm, VLM) and tok is not None
    assert vlm.image_seq_len == 4 and vlm.image_token_id == tok.token_to_id("<image>")
    assert vlm.source_path == str(folder)


# -- bad images ----------------------------------------------------------------------------------
def _png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header says width x height (8-bit greyscale): only a few rows of data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = zlib.compress(b"\0" * (width + 1) * 4)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def _refusal(source) -> str:
    with pytest.raises(LmforgeError) as e:
        open_image(source, name="x.png")
    msg = str(e.value)
    assert "\n" not in msg and "x.png" in msg
    return msg


def test_bad_images_are_refused_in_one_line(tmp_path):
    good = _png_bytes(_img(40, 30))
    assert "truncated" in _refusal(good[: len(good) // 2])
    assert "not an image" in _refusal(b"just some text, not a picture\n" * 10)
    assert "SVG" in _refusal(b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    assert "SVG" in _refusal(b'<svg xmlns="http://www.w3.org/2000/svg"><rect width="5" height="5"/></svg>')
    assert "not an image" in _refusal(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")  # never Ghostscript
    assert "no such file" in _refusal(str(tmp_path / "missing.png"))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(LmforgeError, match="notes.txt: not an image"):
        open_image(text)
    assert open_image(good).size == (40, 30)


@pytest.mark.parametrize("side", [20000, 10000])  # past Pillow's own bomb limit, and past only ours
def test_huge_image_is_refused_from_its_header_with_bounded_memory(side):
    data = _png_claiming(side, side)  # 400 / 100 megapixels claimed, a few hundred bytes on disk
    assert len(data) < 2000
    tracemalloc.start()
    try:
        msg = _refusal(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "too large" in msg and (side == 20000 or f"{side}x{side}" in msg)
    assert peak < 5_000_000  # a decode would need 100-400 MB


def test_render_chat_refuses_a_bad_image_part(ours):
    vlm, tok = ours
    messages = [{"role": "user", "content": [{"type": "image", "image": b"GIF89a broken"}, {"type": "text", "text": "hi"}]}]
    with pytest.raises(LmforgeError, match="truncated|not an image"):
        vlm.render_chat(tok, messages)


def test_smolvlm_folder_with_a_tied_head(tmp_path):
    """model_type smolvlm (SmolVLM's own classes), the head tied to the embeddings."""
    from safetensors import safe_open
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    from lmforge.loading import load_model
    from lmforge.vision import VLM

    torch.manual_seed(2)
    text = dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True)
    cfg = SmolVLMConfig(vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           image_size=32, patch_size=16), text_config=text, scale_factor=2,
                        image_token_id=5, tie_word_embeddings=True)
    model = SmolVLMForConditionalGeneration(cfg).eval()
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    vlm, tok = load_model(str(tmp_path))  # no tokenizer in this folder: the loader itself, not lmforge.load
    assert tok is None
    assert isinstance(vlm, VLM) and vlm.cfg.tie_embeddings and vlm.image_seq_len == 1
    batch = preprocess_images([_img(40, 30, "RGB", 16)], ImageConfig(longest_edge=64, tile=32))
    n = batch.pixel_values.shape[1] * vlm.image_seq_len
    ids = torch.tensor([[1, 2] + [5] * n + [3, 4]])
    with torch.no_grad():
        want = model(input_ids=ids, pixel_values=batch.pixel_values, pixel_attention_mask=batch.pixel_attention_mask).logits
        got = vlm(ids, batch.pixel_values, batch.pixel_attention_mask)
    assert (got - want).abs().max() <= 1e-4


def test_text_chat_renders_as_the_processor(hf, ours):
    """lmforge's text renderer (string contents) on a VLM's parts-reading template: the same text
    as transformers' processor renders for the same turns as text parts."""
    from lmforge.chat import render_text

    _, proc = hf
    _, tok = ours
    turns = [("user", "what is in this picture?"), ("assistant", "a red cat."), ("user", "where is it?")]
    want = proc.apply_chat_template([{"role": r, "content": [{"type": "text", "text": t}]} for r, t in turns],
                                    add_generation_prompt=True)
    assert render_text(tok, [{"role": r, "content": t} for r, t in turns], add_generation_prompt=True) == want
    assert "User: what is in this picture?<end_of_utterance>" in want


def test_lm_chat_takes_image_parts_as_path_or_data(hf, ours, tmp_path, default_lm):
    """`LM.chat` with `{"type": "image", "path" | "data"}` parts answers as transformers does
    (greedy); a model that cannot see says so in one line."""
    import base64

    import lmforge
    from lmforge.api import LM
    from lmforge.errors import LmforgeError

    model, proc = hf
    vlm, tok = ours
    img = _img(50, 70, "RGB", 21)
    path = tmp_path / "pic.png"
    img.save(path)
    ref = _hf_inputs(proc, _messages(img), [img])
    n = ref["input_ids"].shape[1]
    with torch.no_grad():
        want = model.generate(**ref, max_new_tokens=8, do_sample=False, min_new_tokens=8)[0, n:].tolist()
    lm = LM(vlm, tok)
    for part in ({"type": "image", "path": str(path)}, {"type": "image", "data": base64.b64encode(path.read_bytes()).decode()}):
        msgs = [{"role": "user", "content": [part, {"type": "text", "text": "what is in this picture?"}]}]
        ids, _ = lm.encode_images(msgs)
        assert ids == ref["input_ids"][0].tolist()
        with torch.no_grad():
            got = lm.chat(msgs, max_new_tokens=8)
        # the tiny model may write its end-of-turn token early; compare up to where it stops
        text = tok.decode(want, skip_special=True)
        assert got == text[: len(got)] and (got or not text)
    with pytest.raises(LmforgeError, match="does not take images"):
        default_lm.chat([{"role": "user", "content": [{"type": "image", "path": str(path)}]}])
