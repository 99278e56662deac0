"""`lmforge eval` with items about pictures (`"image"` in a JSONL task), on a tiny random Idefics3
model: each choice's log-likelihood equals the one transformers' model gives the same prompt and
picture, generated answers are the model's greedy chat replies, and a text-only model or a
few-shot request is refused in one line."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch

from _vlm_tiny import png_bytes, vlm_folder

transformers = pytest.importorskip("transformers")

QUESTION = "What colour is this picture?"
CHOICES = [" red", " green", " blue"]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("img-tasks")
    (root / "pics").mkdir()
    colours = [(220, 30, 30), (30, 200, 40), (30, 40, 220)]
    for k, c in enumerate(colours):
        Image.new("RGB", (30 + 20 * k, 40), c).save(root / "pics" / f"{k}.png")
    mc = [{"input": QUESTION, "image": f"pics/{k}.png", "choices": CHOICES, "answer": k} for k in range(3)]
    mc.append({"input": QUESTION, "image": "data:image/png;base64," + base64.b64encode(png_bytes(seed=3)).decode(),
               "choices": CHOICES, "answer": 0})
    (root / "colours_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    gen = [{"input": QUESTION, "image": f"pics/{k}.png", "target": ["red", "green", "blue"][k]} for k in range(3)]
    (root / "colours_gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    return root


def test_choice_loglikelihoods_equal_transformers(tasks, tmp_path):
    from lmforge.eval.runner import EvalSettings, evaluate

    run, samples = evaluate(str(vlm_folder()), EvalSettings(tasks=[str(tasks / "colours_mc.jsonl")]), device="cpu",
                            progress=False, out=tmp_path / "run")
    recs = samples["colours_mc"]
    assert len(recs) == 4 and run["tasks"][0]["kind"] == "multiple_choice"
    assert (tmp_path / "run").exists()

    import lmforge

    lm = lmforge.load(str(vlm_folder()), device="cpu")
    ref = transformers.Idefics3ForConditionalGeneration.from_pretrained(vlm_folder(), attn_implementation="eager").eval()
    msgs = [{"role": "user", "content": [{"type": "image", "path": str(tasks / "pics" / "1.png")}, {"type": "text", "text": QUESTION}]}]
    p = lm.model.render_chat(lm.tokenizer, msgs)
    for choice, got in zip(CHOICES, recs[1]["logprobs"]):
        cont = lm.tokenizer.encode(choice, add_bos=False)
        with torch.no_grad():
            logits = ref(input_ids=torch.tensor([p.ids + cont]), pixel_values=p.pixel_values,
                         pixel_attention_mask=p.pixel_attention_mask).logits[0]
        lp = torch.log_softmax(logits.float(), -1)
        want = sum(lp[len(p.ids) - 1 + j, t].item() for j, t in enumerate(cont))
        assert abs(got - want) <= 1e-3, (choice, got, want)


def test_generated_answers_are_the_greedy_chat_replies(tasks):
    import lmforge
    from lmforge.eval.runner import EvalSettings, evaluate
    from lmforge.sampling import SamplingParams
    from lmforge.vision import chat_with_images

    run, samples = evaluate(str(vlm_folder()), EvalSettings(tasks=[str(tasks / "colours_gen.jsonl")], max_new_tokens=6),
                            device="cpu", progress=False)
    lm = lmforge.load(str(vlm_folder()), device="cpu")
    for k, rec in enumerate(samples["colours_gen"]):
        msgs = [{"role": "user", "content": [{"type": "image", "path": str(tasks / "pics" / f"{k}.png")},
                                             {"type": "text", "text": QUESTION}]}]
        want = chat_with_images(lm.model, lm.tokenizer, msgs, SamplingParams(max_new_tokens=6, temperature=0.0)).strip()
        assert rec["output"] == want
        assert rec["correct"] == (rec["answer"].strip().lower() == rec["targets"][0])
    assert run["results"][0]["metric"] == "exact_match"


def test_image_tasks_refuse_text_models_and_few_shot_in_one_line(tasks, tmp_path, capsys, default_model_path):
    from lmforge.cli.main import main

    assert main(["eval", "--model", str(default_model_path), "--tasks", str(tasks / "colours_mc.jsonl"), "--progress", "false",
                 "--out", str(tmp_path / "a")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "colours_mc asks about images" in err[0] and "text only" in err[0]
    assert main(["eval", "--model", str(vlm_folder()), "--tasks", str(tasks / "colours_mc.jsonl"), "--fewshot", "1",
                 "--progress", "false", "--out", str(tmp_path / "b")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "zero-shot" in err[0]
    (tmp_path / "missing.jsonl").write_text(json.dumps({"input": "?", "image": "nowhere.png", "target": "x"}) + "\n")
    assert main(["eval", "--model", str(vlm_folder()), "--tasks", str(tmp_path / "missing.jsonl"), "--progress", "false"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.jsonl item 1: image nowhere.png not found" in err[0]
