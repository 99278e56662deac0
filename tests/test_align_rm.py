"""Reward model: transformers' sequence classifier gives our scores; Bradley–Terry training moves the
right way; `lmforge rm train` / `rm score` end to end on a tiny model."""
from __future__ import annotations

import json

import pytest
import torch

from _align_tiny import losses, tiny_lm_dir
from conftest import tiny_config
from lmforge.align.reward_model import (RewardModel, bt_loss, load_reward_model, pairwise_accuracy, reward_model_from_lm,
                                        save_reward_model)
from lmforge.model import Transformer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_model_path):
    return tiny_lm_dir(tmp_path_factory.mktemp("rm") / "tiny")


def test_scores_equal_transformers_sequence_classifier(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    lm = Transformer(tiny_config(tie_embeddings=True)).init_weights(seed=1)
    rm = reward_model_from_lm(lm, pad_id=0, seed=3)
    with torch.no_grad():
        rm.score.weight.normal_(0, 0.5)
    assert set(rm.state_dict()) == {k for k in lm.state_dict() if k != "lm_head.weight"} | {"score.weight"}
    save_reward_model(rm, None, tmp_path / "rm")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm"), dtype=torch.float32).eval()
    x = torch.randint(1, 256, (3, 12))
    x[1, 7:] = 0  # right padding
    x[2, 4] = 0  # a pad id inside a sequence: transformers takes the rightmost non-pad token, as we do
    with torch.no_grad():
        ours = rm(x)
        theirs = hf(input_ids=x).logits.squeeze(-1)
    assert ours.shape == (3,) and (ours - theirs).abs().max() <= 1e-4
    loaded, _ = load_reward_model(tmp_path / "rm")
    with torch.no_grad():
        assert (loaded(x) - ours).abs().max() <= 1e-5


def test_bradley_terry_training_ranks_chosen_higher(tiny_dir, tmp_path):
    from lmforge.align.preference import collate_pairs, record_to_pair, tokenize_pairs
    from lmforge.align.tasks import arithmetic_preferences
    from lmforge.loading import load_model
    from lmforge.train import ListBatches, TrainConfig, train

    lm, tok = load_model(tiny_dir)
    rm = reward_model_from_lm(lm, pad_id=tok.pad_id)
    # a learnable signal for a random tiny model: the chosen reply is always the long form
    recs = [{"prompt": p["prompt"], "chosen": "The answer is " + p["chosen"] + ".", "rejected": p["rejected"]}
            for p in arithmetic_preferences(32, seed=0)]
    rows, _ = tokenize_pairs(tok, [record_to_pair(r, "x") for r in recs], 128)
    before = pairwise_accuracy(rm, rows, tok.pad_id)
    res = train(rm, bt_loss, ListBatches(rows, 8, collate=lambda xs: collate_pairs(xs, tok.pad_id)),
                TrainConfig(lr=3e-3, warmup_steps=0, max_steps=12, log_every=1, schedule="constant", weight_decay=0.0),
                tmp_path / "run", save_fn=lambda m, d: save_reward_model(m, tok, d), progress=False)
    after = pairwise_accuracy(rm, rows, tok.pad_id)
    ls = losses(tmp_path / "run")
    assert ls[-1] < ls[0] and after["loss"] < before["loss"] and after["accuracy"] >= 0.9
    assert res["checkpoint"] is not None and (res["checkpoint"] / "model.safetensors").exists()


def test_rm_command_trains_saves_and_scores(tiny_dir, tmp_path, capsys):
    from lmforge.cli.main import main

    out = tmp_path / "rm"
    assert main(["rm", "train", "--model", str(tiny_dir), "--task.name", "arithmetic", "--task.n", "48", "--task.n-eval", "16",
                 "--out", str(out), "--batch-size", "8", "--train.max-steps", "3", "--train.lr", "1e-3",
                 "--train.eval-every", "3", "--lora.r", "4"]) == 0
    printed = capsys.readouterr().out
    assert "held-out pairwise accuracy" in printed
    ev = json.loads((out / "rm_eval.json").read_text())
    assert ev["heldout"]["pairs"] == 16 and 0.0 <= ev["heldout"]["accuracy"] <= 1.0
    assert any("val_accuracy" in r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()))
    rm, tok = load_reward_model(out)  # the run folder -> its latest checkpoint, LoRA merged in
    assert isinstance(rm, RewardModel) and tok is not None
    scored = tmp_path / "scored.jsonl"
    assert main(["rm", "score", "--model", str(out), "--data", str(out / "data" / "heldout_pairs.jsonl"),
                 "--out", str(scored)]) == 0
    rows = [json.loads(x) for x in scored.read_text().splitlines()]
    assert len(rows) == 16 and all({"score_chosen", "score_rejected", "correct"} <= set(r) for r in rows)
    acc = sum(r["correct"] for r in rows) / 16
    assert abs(acc - ev["heldout"]["accuracy"]) < 1e-9  # the saved model scores as the trained one did
    assert main(["rm", "score", "--model", str(out), "--prompt", "What is 2 + 2?", "--completion", "4"]) == 0
    float(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["rm", "score", "--model", str(tiny_dir), "--prompt", "x", "--completion", "y"]) == 2
    assert "is not a reward model" in capsys.readouterr().err
