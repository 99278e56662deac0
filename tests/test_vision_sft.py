"""`lmforge sft` on conversations with images (a tiny random Idefics3 model): the loss covers the
assistant turns only, falls as LoRA on the text model (and the connector) learns a picture's
colour, the vision encoder stays as it was, PEFT puts the saved adapter on transformers' Idefics3
with equal logits on a prompt with an image, and `lmforge merge` writes a folder transformers
loads with those logits."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _vlm_tiny import vlm_folder

transformers = pytest.importorskip("transformers")

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Pictures of one colour each, in a folder beside the JSONL that names them by relative
    path, half of the records in TRL's layout (bare image parts, a record-level `images` list)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("vsft")
    (root / "pics").mkdir()
    lines = []
    for k in range(12):
        name = list(COLOURS)[k % 3]
        Image.new("RGB", (40 + 7 * k, 30 + 5 * k), COLOURS[name]).save(root / "pics" / f"{k}.png")
        image = {"type": "image"} if k % 2 else {"type": "image", "path": f"pics/{k}.png"}
        rec = {"messages": [{"role": "user", "content": [image, {"type": "text", "text": "What colour is this?"}]},
                            {"role": "assistant", "content": f"It is {name}."}]}
        if k % 2:
            rec["images"] = [f"pics/{k}.png"]
        lines.append(json.dumps(rec))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_the_loss_mask_covers_the_assistant_turn_and_its_end_token():
    import lmforge
    from lmforge.vision.prompt import render_training

    lm = lmforge.load(str(vlm_folder()), device="cpu")
    from _vlm_tiny import png_bytes

    msgs = [{"role": "user", "content": [{"type": "image", "data": png_bytes()}, {"type": "text", "text": "Hi?"}]},
            {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "And?"},
            {"role": "assistant", "content": "Bye."}]
    ids, mask, images = render_training(lm.tokenizer, msgs, lm.model.image_config, lm.model.image_seq_len)
    from conftest import trained_texts

    assert trained_texts(lm.tokenizer, ids, mask) == [" Hello there.<end_of_utterance>", " Bye.<end_of_utterance>"]
    assert ids.count(lm.model.image_token_id) > 0 and len(images) == 1
    assert ids == lm.model.render_chat(lm.tokenizer, msgs, add_generation_prompt=False).ids


def test_sft_with_images_learns_and_peft_loads_the_adapter(dataset, tmp_path):
    import lmforge
    from lmforge.cli.main import main
    from lmforge.vision.prompt import render_chat

    folder, out = vlm_folder(), tmp_path / "out"
    assert main(["sft", "--model", str(folder), "--data", str(dataset / "train.jsonl"), "--out", str(out),
                 "--batch-size", "4", "--train.max-steps", "12", "--train.lr", "5e-3", "--train.warmup-steps", "0", "--train.log-every", "1",
                 "--lora.r", "8", "--lora.connector", "true", "--val-fraction", "0.25", "--train.eval-every", "6"]) == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    assert any("val_loss" in r for r in recs)

    base = lmforge.load(str(folder), device="cpu").model
    tuned = lmforge.load(str(out), device="cpu").model
    for (n, a), (_, b) in zip(base.vision_model.state_dict().items(), tuned.vision_model.state_dict().items()):
        assert torch.equal(a, b), n  # the vision encoder stayed frozen

    ckpt = out / (out / "latest").read_text().strip()
    saved = json.loads((ckpt / "adapter_config.json").read_text())
    assert "text_model" in saved["target_modules"] and "vision_model" not in saved["target_modules"]
    peft = pytest.importorskip("peft")
    ref = transformers.Idefics3ForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    theirs = peft.PeftModel.from_pretrained(ref, str(ckpt)).eval()
    msgs = [{"role": "user", "content": [{"type": "image", "path": str(dataset / "pics" / "4.png")},
                                         {"type": "text", "text": "What colour is this?"}]}]
    tok = lmforge.load(str(folder), device="cpu").tokenizer
    p = render_chat(tok, msgs, tuned.image_config, tuned.image_seq_len)
    with torch.no_grad():
        want = theirs(input_ids=torch.tensor([p.ids]), pixel_values=p.pixel_values,
                      pixel_attention_mask=p.pixel_attention_mask).logits
        got = tuned(torch.tensor([p.ids]), p.pixel_values, p.pixel_attention_mask)
    assert (got - want).abs().max().item() <= 1e-4
    assert (got - base(torch.tensor([p.ids]), p.pixel_values, p.pixel_attention_mask)).abs().max().item() > 1e-3
    # merged into the base: an Idefics3 folder transformers loads, with the adapter's logits
    assert main(["merge", "--model", str(out), "--out", str(tmp_path / "merged")]) == 0
    merged = transformers.Idefics3ForConditionalGeneration.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    with torch.no_grad():
        again = merged(input_ids=torch.tensor([p.ids]), pixel_values=p.pixel_values,
                       pixel_attention_mask=p.pixel_attention_mask).logits
    assert (again - got).abs().max().item() <= 1e-4


def test_image_records_for_a_text_model_and_bad_images_are_one_line_errors(dataset, tmp_path, capsys, default_model_path):
    from lmforge.cli.main import main

    bad = tmp_path / "bad.jsonl"
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": [{"type": "image", "path": "broken.png"},
                                                                          {"type": "text", "text": "?"}]},
                                            {"role": "assistant", "content": "x"}]}) + "\n")
    assert main(["sft", "--model", str(vlm_folder()), "--data", str(bad), "--out", str(tmp_path / "o"), "--train.max-steps", "1"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl:1" in err[0]
    assert main(["sft", "--model", str(default_model_path), "--data", str(dataset / "train.jsonl"), "--out", str(tmp_path / "t"),
                 "--train.max-steps", "1"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.jsonl:1" in err[0] and "not a text part" in err[0]
