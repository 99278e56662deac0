"""`/v1/completions` with `echo` and `logprobs` returns prompt log-probs (as vLLM does), so
lm-evaluation-harness's `local-completions` can score multiple-choice tasks against lmforge:
its request shapes replayed, its parsing applied, the numbers equal `lmforge eval`'s own."""
from __future__ import annotations

from operator import itemgetter

import pytest

from _align_tiny import tiny_lm_dir


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from fastapi.testclient import TestClient

    from lmforge.loading import load_model
    from lmforge.serve.app import create_app

    model, tok = load_model(str(tiny_lm_dir(tmp_path_factory.mktemp("echo") / "m")))
    with TestClient(create_app(model, tok)) as client:
        yield client, model, tok


def _lm_eval_parse(out: dict, ctxlens: list[int]) -> list[tuple[float, bool]]:
    """What lm-eval's LocalCompletionsAPI.parse_logprobs computes from a response."""
    res = []
    for choice, ctxlen in zip(sorted(out["choices"], key=itemgetter("index")), ctxlens):
        lps = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        res.append((sum(lps), all(lp == max(top.values()) for lp, top in zip(lps, tops))))
    return res


def test_lm_eval_loglikelihood_requests_match_lmforge_eval(served):
    from lmforge.eval.scoring import score_groups

    client, model, tok = served
    pairs = [("The capital of France is", " Paris"), ("Two plus two equals", " four, of course"),
             ("Once upon a time", " there")]
    ctxs = [tok.encode(c) for c, _ in pairs]
    conts = [tok.encode(c + x)[len(tok.encode(c)):] for c, x in pairs]
    # lm-eval's loglikelihood payload, token-id prompts batched in one request
    body = {"model": "whatever", "prompt": [c + x for c, x in zip(ctxs, conts)], "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    got = _lm_eval_parse(r.json(), [len(c) for c in ctxs])
    want = [s[0] for s in score_groups(model, [(c, [x]) for c, x in zip(ctxs, conts)])]
    for (lp, greedy), ref in zip(got, want):
        assert lp == pytest.approx(ref.logprob, abs=1e-4) and greedy == ref.greedy
    choice = r.json()["choices"][0]
    n = len(ctxs[0]) + len(conts[0])
    assert len(choice["logprobs"]["tokens"]) == n + 1  # the prompt, then the generated token
    assert choice["logprobs"]["token_logprobs"][0] is None and choice["logprobs"]["top_logprobs"][0] is None
    assert choice["logprobs"]["text_offset"][:2] == [0, len(choice["logprobs"]["tokens"][0])]


def test_echo_logprobs_with_a_text_prompt_and_streaming(served):
    client, model, tok = served
    body = {"model": "x", "prompt": "Hello there, how", "max_tokens": 3, "temperature": 0, "logprobs": 2, "echo": True}
    plain = client.post("/v1/completions", json=body).json()["choices"][0]
    assert plain["text"].startswith("Hello there, how")
    n_prompt = len(tok.encode("Hello there, how"))
    lp = plain["logprobs"]
    assert len(lp["token_logprobs"]) == n_prompt + 3 and all(len(t) == 2 for t in lp["top_logprobs"][1:])
    s = client.post("/v1/completions", json={**body, "stream": True})
    import json

    events = [json.loads(b[6:]) for b in s.text.split("\n\n") if b.startswith("data: {")]
    streamed = [x for e in events for c in e["choices"] if c.get("logprobs") for x in c["logprobs"]["token_logprobs"]]
    assert streamed == lp["token_logprobs"]
