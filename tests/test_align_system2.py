"""System 2 at inference: majority vote and best-of-N with a reward model, on a tiny model."""
from __future__ import annotations

import pytest
import torch

from _align_tiny import tiny_lm_dir
from lmforge.align.system2 import majority, system2_generate
from lmforge.errors import LmforgeError


def test_majority_vote():
    assert majority(["3", None, "4", "3", "4"]) == ("3", 2)  # tie: the answer seen first
    assert majority([None, None]) == (None, 0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, default_model_path):
    from lmforge.loading import load_model

    return load_model(tiny_lm_dir(tmp_path_factory.mktemp("s2") / "tiny"))


def test_vote_and_best_of_n(tiny, monkeypatch):
    from lmforge.align.reward_model import reward_model_from_lm
    from lmforge.chat import render_prompt
    from lmforge.engine import SamplingParams

    model, tok = tiny
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    ids = render_prompt(tok, msgs)
    params = SamplingParams(max_new_tokens=4, temperature=1.0, seed=0)
    out = system2_generate(model, tok, ids, params, mode="vote", n=5)
    assert len(out["candidates"]) == 5 and out["text"] == out["candidates"][out["index"]]
    assert len(set(out["candidates"])) > 1  # the N samples differ

    # the votes decide: fake samples with known answers
    fake = ["I think 5", "6", "it is 5.", "no idea", "7"]
    monkeypatch.setattr("lmforge.align.system2.sample_n",
                        lambda *a, **k: [{"text": t, "completion_tokens": 2} for t in fake])
    v = system2_generate(model, tok, ids, params, mode="vote", n=5)
    assert v["answer"] == "5" and v["votes"] == 2 and v["text"] == "I think 5" and v["completion_tokens"] == 10

    # best-of-N: the reward model's favourite wins
    rm = reward_model_from_lm(model, pad_id=tok.pad_id)
    from lmforge.align.reward_model import score_conversations

    scores = score_conversations(rm, tok, [msgs + [{"role": "assistant", "content": t}] for t in fake])
    b = system2_generate(model, tok, ids, params, mode="best_of_n", n=5, reward_model=rm, messages=msgs)
    assert b["index"] == max(range(5), key=lambda i: scores[i]) and b["scores"] == pytest.approx(scores, abs=1e-5)
    with pytest.raises(LmforgeError, match="needs a reward model"):
        system2_generate(model, tok, ids, params, mode="best_of_n", n=2)
    with pytest.raises(LmforgeError, match="unknown system-2 mode"):
        system2_generate(model, tok, ids, params, mode="tree", n=2)
    torch.manual_seed(0)
