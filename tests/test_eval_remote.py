"""Scoring a model behind an OpenAI-compatible server: a stub on 127.0.0.1 with known prompt
logprobs (one token per character), and lmforge's own server for generation."""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from lmforge.errors import LmforgeError
from lmforge.eval.remote import RemoteModel, cut_at_stop, normalize_base_url

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")


def char_logprob(c: str) -> float:
    return -0.25 - (ord(c) % 7) * 0.5


def stub_app(with_logprobs: bool = True):
    """One token per character; log p(c) = char_logprob(c); the top token is always the actual
    one except after 'x', where 'y' is preferred. Generation answers '42' then a second line."""
    app = fastapi.FastAPI()
    seen: list[dict] = []
    app.state.seen = seen

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "stub-model", "object": "model"}]}

    @app.post("/v1/completions")
    def completions(body: dict):
        seen.append(body)
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        choices = []
        for i, p in enumerate(prompts):
            if body.get("echo") and body.get("logprobs") is not None and with_logprobs:
                text = p + "Z"
                toks = list(text)
                lps = [None] + [char_logprob(c) for c in toks[1:]]
                tops = [None] + [({"y": -0.01} if toks[k - 1] == "x" else {c: char_logprob(c)}) for k, c in enumerate(toks) if k]
                choices.append({"index": i, "text": text, "finish_reason": "length",
                                "logprobs": {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops,
                                             "text_offset": list(range(len(text)))}})
            else:
                choices.append({"index": i, "text": "42\nQ: next question", "finish_reason": "stop", "logprobs": None})
        return {"id": "c", "object": "text_completion", "model": body["model"], "choices": choices}

    @app.post("/v1/chat/completions")
    def chat(body: dict):
        seen.append(body)
        return {"id": "c", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "The answer is 7."}, "finish_reason": "stop"}]}

    return app


class Served:
    """A uvicorn server on a free loopback port, in a thread, for the length of a `with`."""

    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def stub():
    app = stub_app()
    with Served(app) as url:
        yield url, app.state.seen


def test_base_url_and_stop_helpers():
    assert normalize_base_url("http://h:1") == "http://h:1/v1"
    assert normalize_base_url("http://h:1/v1/") == "http://h:1/v1"
    assert normalize_base_url("http://h:1/v1/completions") == "http://h:1/v1"
    assert cut_at_stop("42\nQ: x", ["\n"]) == "42" and cut_at_stop("abc", []) == "abc"


def test_remote_loglikelihood_uses_the_prompt_logprobs(stub):
    url, seen = stub
    rm = RemoteModel(url)
    assert rm.model == "stub-model"
    (scores,) = rm.loglikelihoods([("Q: hi\nA: ", ["ab", "xb"])])
    # the trailing space of the context is scored with the continuation: " ab"
    assert scores[0].logprob == pytest.approx(sum(char_logprob(c) for c in " ab"))
    assert scores[0].n_tokens == 3 and scores[0].greedy
    assert scores[1].logprob == pytest.approx(sum(char_logprob(c) for c in " xb")) and not scores[1].greedy
    body = seen[-1]
    assert body["echo"] is True and body["logprobs"] == 1 and body["prompt"] == ["Q: hi\nA: ab", "Q: hi\nA: xb"]


def test_remote_generation_completions_and_chat(stub):
    url, seen = stub
    rm = RemoteModel(url + "/v1", model="stub-model")
    assert rm.generate(["1+1=", "2+2="], max_tokens=8, stop=["\n"]) == ["42", "42"]
    assert seen[-1]["stop"] == ["\n"] and seen[-1]["temperature"] == 0.0
    assert rm.generate(["hi"], max_tokens=8, chat=True) == ["The answer is 7."]
    assert seen[-1]["messages"] == [{"role": "user", "content": "hi"}]


def test_server_without_prompt_logprobs_is_a_clear_error():
    with Served(stub_app(with_logprobs=False)) as url:
        rm = RemoteModel(url)
        with pytest.raises(LmforgeError, match="does not return prompt log-probabilities"):
            rm.loglikelihoods([("Q:", [" a", " b"])])
        assert rm.generate(["x"], max_tokens=4, stop=["\n"]) == ["42"]  # generation still works


def test_unreachable_server_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(LmforgeError, match="cannot list models"):
        RemoteModel(f"http://127.0.0.1:{port}")


def test_evaluate_a_served_model(stub, tmp_path):
    from lmforge.eval.runner import EvalSettings, evaluate

    url, _ = stub
    gen = tmp_path / "gen.jsonl"
    gen.write_text("\n".join(json.dumps({"input": f"{a}*6=", "target": str(a * 6)}) for a in range(1, 9)) + "\n")
    mc = tmp_path / "mc.jsonl"
    # log p is highest for the choice whose characters are cheapest under char_logprob
    mc.write_text("\n".join(json.dumps({"input": "Pick:", "choices": [" #", " $"], "answer": 0}) for _ in range(4)) + "\n")
    run, samples = evaluate(url, EvalSettings(tasks=f"{gen},{mc}"), out=tmp_path / "run", progress=False)
    res = {(r["task"], r["metric"]): r["value"] for r in run["results"]}
    assert res[("gen", "exact_match")] == pytest.approx(1 / 8)  # only 7*6=42
    expect = float(char_logprob("#") > char_logprob("$"))
    assert res[("mc", "acc")] == expect
    assert run["model"] == "stub-model" and run["backend"] == "remote"
    assert (tmp_path / "run" / "results.json").exists()


def test_generation_and_loglikelihoods_against_lmforges_own_server():
    """lmforge's server (a tiny random model): generation works through the client, and the
    prompt log-probs it returns (echo + logprobs) give the same scores as scoring locally."""
    serve = pytest.importorskip("lmforge.serve")
    from fastapi.testclient import TestClient
    from test_eval_scoring import byte_tokenizer, tiny_byte_model

    from lmforge.eval.scoring import loglikelihoods

    model, tok = tiny_byte_model(seed=1), byte_tokenizer()
    app = serve.create_app(model, tok, serve.ServeConfig(slots=2, ctx=96, model_id="tiny"))
    with TestClient(app) as client:
        rm = RemoteModel("http://testserver/v1", client=client)
        assert rm.model == "tiny"
        outs = rm.generate(["abc", "hello"], max_tokens=5)
        assert len(outs) == 2 and all(isinstance(o, str) for o in outs)
        requests = [("abc", [" d", " e"]), ("hello wor", ["ld", "m"])]
        remote = rm.loglikelihoods(requests)
    local = loglikelihoods(model, tok, requests)
    for r_row, l_row in zip(remote, local):
        for r, l in zip(r_row, l_row):
            assert r.logprob == pytest.approx(l.logprob, abs=1e-4) and r.greedy == l.greedy
