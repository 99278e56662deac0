"""The CPU learning demo's pieces (benchmarks/vlm_demo.py): the synthetic pictures and their
answers checked against the pixels, the train/held-out split, the token layout, and a VLM built
on a tiny random text model whose loss falls in a few steps of the one trainer loop."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.finetune.sft import IGNORE
from lmforge.model import Transformer
from lmforge.vision import synthetic as syn
from lmforge.vision.build import build_vlm, first_layers, pixels
from lmforge.vision.encoder import VisionConfig
from lmforge.vision.preprocess import preprocess_images
from lmforge.vision.vqa import VQABatches, accuracy, encode_row, vqa_loss
from conftest import tiny_config

SIZE = 64


def read_picture(img) -> list[tuple[str, str, str]]:
    """(slot, shape, colour) of what is drawn, read from the pixels alone: in each slot's
    window, the non-white pixels' mean colour names the colour (nearest reference), and how
    much of their bounding box they fill names the shape (square ~1, circle ~0.8, triangle ~0.5)."""
    a = np.asarray(img).astype(int)
    out = []
    for slot, (fx, fy) in syn.SLOTS.items():
        cx, cy, half = round(fx * SIZE), round(fy * SIZE), 9  # radius <= 7, moved <= 2
        win = a[cy - half:cy + half + 1, cx - half:cx + half + 1]
        ink = (win != 255).any(-1)
        if not ink.any():
            continue
        ys, xs = np.nonzero(ink)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        fill = ink.sum() / box
        shape = "square" if fill > 0.93 else "circle" if fill > 0.65 else "triangle"
        mean = win[ink].mean(0)
        colour = min(syn.COLOURS, key=lambda c: np.abs(mean - np.array(syn.COLOURS[c])).sum())
        out.append((slot, shape, colour))
    return out


def answer_from_pixels(seen: list[tuple[str, str, str]], qa: syn.QA) -> str:
    """The answer to `qa` worked out from what `read_picture` saw."""
    if qa.kind == "count":
        return str(len(seen))
    if qa.kind == "shape":
        return next(shape for slot, shape, _ in seen if qa.question.endswith(f"on the {slot}?"))
    kind = qa.question.rstrip("?").split()[-1]
    (hit,) = [s for s in seen if s[1] == kind]  # asked only about a shape that is there once
    return hit[2] if qa.kind == "colour" else hit[0]


def test_scenes_are_deterministic_and_seeds_differ():
    a, b = syn.scenes(30, seed=5), syn.scenes(30, seed=5)
    assert a == b
    assert [syn.image_key(s) for s in a] == [syn.image_key(s) for s in b]
    assert a != syn.scenes(30, seed=6)
    assert {len(s) for s in a} <= {1, 2, 3, 4}
    rng1, rng2 = random.Random(1), random.Random(1)
    assert [syn.pick_questions(s, rng1) for s in a] == [syn.pick_questions(s, rng2) for s in a]


def test_answers_match_the_pixels():
    kinds = set()
    for scene in syn.scenes(200, seed=11):
        seen = read_picture(syn.draw(scene, SIZE))
        assert sorted(seen) == sorted((s.slot, s.kind, s.colour) for s in scene)
        for qa in syn.questions(scene):
            assert qa.answer in syn.ANSWERS[qa.kind]
            assert answer_from_pixels(seen, qa) == qa.answer, (scene, qa)
            kinds.add(qa.kind)
    assert kinds == set(syn.KINDS)


def test_heldout_pictures_are_new_and_chance_is_computed():
    train = syn.scenes(300, seed=0)
    held, dropped = syn.heldout_scenes(50, seed=1, train=train + syn.scenes(5, seed=1))  # 5 planted copies
    assert len(held) == 50 and dropped == 5
    assert not {syn.image_key(s) for s in held} & {syn.image_key(s) for s in train}
    items = [qa for _, qa in syn.eval_questions(held, seed=2)]
    ch = syn.chance(items)
    assert ch["count"]["uniform"] == 0.25 and ch["shape"]["uniform"] == pytest.approx(1 / 3)
    counts = [qa.answer for qa in items if qa.kind == "count"]
    assert ch["count"]["majority"] == max(counts.count(a) for a in set(counts)) / len(counts)
    assert ch["overall"]["n"] == len(items)


def test_pixels_equal_the_preprocessing():
    vcfg = VisionConfig(hidden_size=32, intermediate_size=64, n_layers=1, n_heads=2, image_size=SIZE, patch_size=8)
    vlm = build_vlm(Transformer(tiny_config()), vcfg, image_token_id=1)
    img = syn.draw(syn.scenes(1, seed=3)[0], SIZE)
    ref = preprocess_images([[img]], vlm.image_config).pixel_values
    assert torch.equal(pixels([img], vlm.image_config), ref)
    assert vlm.image_seq_len == 16


def test_build_refuses_bad_settings_and_first_layers_copies():
    text = Transformer(tiny_config(n_layers=3)).init_weights(seed=0).eval()
    with pytest.raises(LmforgeError):
        build_vlm(text, VisionConfig(image_size=60, patch_size=8), image_token_id=1)
    with pytest.raises(LmforgeError):
        build_vlm(text, VisionConfig(hidden_size=32, n_heads=2, image_size=64, patch_size=8), image_token_id=10_000)
    with pytest.raises(LmforgeError):
        first_layers(text, 4)
    idx = torch.randint(0, 256, (2, 9))
    assert torch.equal(first_layers(text, 3)(idx), text(idx))
    one = first_layers(text, 1)
    assert one.cfg.n_layers == 1 and len(one.model.layers) == 1
    assert torch.equal(one.model.layers[0].mlp.down_proj.weight, text.model.layers[0].mlp.down_proj.weight)
    one.model.layers[0].mlp.down_proj.weight.data.zero_()  # a copy: the source keeps its weights
    assert text.model.layers[0].mlp.down_proj.weight.abs().sum() > 0


def _encode(s: str) -> list[int]:  # bytes as tokens: the tiny model's vocabulary is 256
    return list(s.encode())


def test_rows_train_only_the_answers():
    qas = [syn.QA("count", "How many shapes are there?", "3"), syn.QA("colour", "What colour is the circle?", "red")]
    ids, targets = encode_row(_encode, qas, image_token_id=1, n_image=4, end_id=10)
    trained = "".join(chr(ids[t + 1]) for t in range(len(ids) - 1) if targets[t] != IGNORE)
    assert trained == " 3\n red\n"
    assert all(targets[t] in (IGNORE, ids[t + 1]) for t in range(len(ids) - 1)) and targets[-1] == IGNORE
    assert ids[:4] == [1] * 4 and bytes(ids[4:]).decode().startswith("Question: How many")


def test_a_few_steps_reduce_the_loss(tmp_path):
    from lmforge.train import TrainConfig, train

    torch.manual_seed(0)
    text = Transformer(tiny_config(max_seq_len=512)).init_weights(seed=0)
    vcfg = VisionConfig(hidden_size=32, intermediate_size=64, n_layers=1, n_heads=2, image_size=SIZE, patch_size=8)
    vlm = build_vlm(text, vcfg, image_token_id=1, seed=0)
    batches = VQABatches(syn.scenes(64, seed=0), 8, _encode, 1, vlm.image_seq_len, end_id=10, pad_id=0,
                         image_cfg=vlm.image_config, size=SIZE, seed=0)
    first = batches.next_batch()
    with torch.no_grad():
        loss0 = float(vqa_loss(vlm, first)[0])
    batches.load_state_dict({"position": 0})
    tower = vlm.vision_model.embeddings.patch_embedding.weight.detach().clone()
    cfg = TrainConfig(lr=3e-3, warmup_steps=2, max_steps=30, weight_decay=0.0, log_every=5, device="cpu")
    result = train(vlm, vqa_loss, batches, cfg, tmp_path / "run", progress=False, save_fn=lambda m, d: None)
    assert result["step"] == 30
    assert (tmp_path / "run" / "metrics.jsonl").exists() and (tmp_path / "run" / "plots" / "loss.png").exists()
    with torch.no_grad():
        loss1 = float(vqa_loss(vlm, first)[0])
    assert loss1 < 0.5 * loss0, (loss0, loss1)
    assert not torch.equal(tower, vlm.vision_model.embeddings.patch_embedding.weight)  # gradients reach the tower
    items = [(s, qa) for s in syn.scenes(2, seed=9) for qa in syn.questions(s)[:2]]
    acc = accuracy(vlm, _encode, lambda ids: bytes(ids).decode(errors="replace"), items, end_id=10, size=SIZE)
    assert acc["by_kind"]["overall"]["n"] == len(items) and len(acc["replies"]) == len(items)
