"""System 2 from the user's side: `generate`/`chat --system2 vote|best-of-n` and the server's
`"system2"` request field, on a tiny random model and a tiny reward model, checked against the
library call (`system2_generate`) with the same seed and against independent reward scores."""
from __future__ import annotations

import io
import json

import pytest
import torch

from _align_tiny import tiny_lm_dir
from conftest import run_cli
from lmforge.align.system2 import choose, system2_generate
from lmforge.engine import SamplingParams

QUESTION = "What is 2 + 3?"
MSGS = [{"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, default_model_path):
    """(policy folder, reward model folder): a random 2-layer LM and a reward model on its backbone."""
    from lmforge.align.reward_model import reward_model_from_lm, save_reward_model
    from lmforge.loading import load_model

    root = tmp_path_factory.mktemp("s2cli")
    policy = tiny_lm_dir(root / "policy")
    model, tok = load_model(policy)
    rm = reward_model_from_lm(model, pad_id=tok.pad_id, seed=1)
    with torch.no_grad():
        rm.score.weight.normal_(0, 1.0)  # spread the scores so the winner is clear
    save_reward_model(rm, tok, root / "rm")
    return policy, root / "rm"


@pytest.fixture(scope="module")
def tiny(dirs):
    from lmforge.loading import load_model

    return load_model(dirs[0])


cli = run_cli


def base_args(policy):
    return ["--model", str(policy), "--dtype", "fp32", "--quant", "none", "--max-new-tokens", "6", "--threads", "1"]


def rm_scores(rm_dir, messages, texts):
    """The reward model's scores, computed here independently of the code under test."""
    from lmforge.align.reward_model import load_reward_model, score_conversations

    rm, tok = load_reward_model(rm_dir)
    return score_conversations(rm, tok, [list(messages) + [{"role": "assistant", "content": t}] for t in texts])


# -- the library pieces the commands share -----------------------------------------------------

def test_vote_keys_numbers_then_text():
    v = choose("vote", ["I think 5", "6", "it is 5.", "no idea"])
    assert (v["answer"], v["votes"], v["index"]) == ("5", 2, 0) and v["answers"][3] is None
    # free text (no sample has a number): whole replies vote, normalized
    v = choose("vote", ["Paris", "Rome.", "  paris!", "Berlin"])
    assert (v["answer"], v["votes"], v["index"], v["text"]) == ("paris", 2, 0, "Paris")
    assert choose("vote", ["", " "])["answer"] is None


def test_seeded_samples_are_seed_plus_i(tiny):
    """Sample i of a seeded call is what one plain sampled generation with seed + i gives (as the server's choices)."""
    from lmforge.chat import render_prompt
    from lmforge.engine import generate_text

    model, tok = tiny
    ids = render_prompt(tok, MSGS)
    p = SamplingParams(max_new_tokens=6, temperature=1.0, seed=11)
    out = system2_generate(model, tok, ids, p, mode="vote", n=3)
    alone = [generate_text(model, tok, [ids], SamplingParams(max_new_tokens=6, temperature=1.0, seed=11 + i))[0]["text"]
             for i in range(3)]
    assert out["candidates"] == alone and len(set(alone)) > 1


# -- lmforge generate / chat ------------------------------------------------------------------

def test_generate_vote_prints_the_majority(dirs, capsys, monkeypatch):
    policy, _ = dirs
    fake = ["It is 5.", "6", "5, I am sure", "no idea"]
    monkeypatch.setattr("lmforge.align.system2.sample_n",
                        lambda *a, **k: [{"text": t, "completion_tokens": 3, "finish_reason": "stop"} for t in fake])
    r = cli(capsys, "generate", *base_args(policy), "--prompt", QUESTION, "--system2", "vote", "--system2-n", "4", "--verbose")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "It is 5.\n"  # the first sample that gave the majority answer
    assert "temperature 0.8" in r.stderr  # temperature 0 was lifted, and the user is told
    assert "answer '5' won 2/4 votes (sample 1)" in r.stderr and "* sample 1" in r.stderr


def test_generate_vote_equals_the_library_call(dirs, tiny, capsys):
    from lmforge.chat import render_prompt
    from lmforge.engine import recommended_sampling

    policy, _ = dirs
    r = cli(capsys, "generate", *base_args(policy), "--prompt", QUESTION, "--system2", "vote", "--system2-n", "4",
            "--seed", "3", "--temperature", "0.9", "--json")
    assert r.returncode == 0, r.stderr
    assert "temperature" not in r.stderr  # given by the user: no note
    got = json.loads(r.stdout)
    model, tok = tiny
    ref = system2_generate(model, tok, render_prompt(tok, MSGS), SamplingParams(max_new_tokens=6, temperature=0.9, seed=3,
                                                                             **recommended_sampling(model)),
                           mode="vote", n=4)  # the CLI's sampling: the model's recommended top-k/top-p/min-p
    assert got["text"] == ref["text"] and got["system2"]["candidates"] == ref["candidates"]
    assert got["system2"]["index"] == ref["index"] and got["system2"]["votes"] == ref["votes"]
    assert got["completion_tokens"] == ref["completion_tokens"]


def test_generate_best_of_n_picks_the_top_reward(dirs, capsys):
    policy, rm_dir = dirs
    r = cli(capsys, "generate", *base_args(policy), "--prompt", QUESTION, "--system2", "best-of-n", "--system2-n", "4",
            "--reward-model", str(rm_dir), "--seed", "0", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    cands = got["system2"]["candidates"]
    assert len(cands) == 4 and len(set(cands)) > 1
    scores = rm_scores(rm_dir, MSGS, cands)
    best = max(range(4), key=lambda i: scores[i])
    assert got["system2"]["index"] == best and got["text"] == cands[best]
    assert got["system2"]["scores"] == pytest.approx(scores, abs=1e-5)


def test_generate_data_with_system2(dirs, tmp_path, capsys):
    policy, rm_dir = dirs
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"prompt": QUESTION}) + "\n" + json.dumps({"messages": MSGS}) + "\n")
    r = cli(capsys, "generate", *base_args(policy), "--data", str(data), "--out", str(tmp_path / "out.jsonl"),
            "--system2", "best-of-n", "--system2-n", "3", "--reward-model", str(rm_dir), "--seed", "1")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rows[0]["completion"] == rows[1]["completion"]  # the same conversation, the same seed
    s = rows[0]["system2"]
    assert s["mode"] == "best_of_n" and rows[0]["completion"] == s["candidates"][s["index"]]


@pytest.mark.parametrize("extra, message", [
    (["--system2", "best-of-n"], "error: --system2 best-of-n needs --reward-model PATH"),
    (["--system2", "best-of-n", "--reward-model", "{policy}"], "is not a reward model"),
    (["--system2", "best-of-n", "--reward-model", "/nonexistent/rm"], "error: reward model not found: /nonexistent/rm"),
    (["--system2", "vote", "--reward-model", "{rm}"], "error: --reward-model is used only with --system2 best-of-n"),
    (["--system2", "vote", "--system2-n", "0"], "error: --system2-n must be at least 1"),
    (["--system2", "tree"], "error: config key 'system2' must be one of none, best-of-n, vote"),
    (["--system2", "vote", "--draft", "ngram"], "error: --draft ngram speeds up one greedy reply"),
])
def test_system2_flag_errors_are_one_line(dirs, capsys, extra, message):
    policy, rm_dir = dirs
    extra = [a.format(policy=policy, rm=rm_dir) for a in extra]
    r = cli(capsys, "generate", *base_args(policy), "--prompt", QUESTION, *extra)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr


def test_chat_with_vote(dirs, capsys, monkeypatch):
    policy, _ = dirs
    fake = ["7", "seven: 8", "8"]
    monkeypatch.setattr("lmforge.align.system2.sample_n",
                        lambda *a, **k: [{"text": t, "completion_tokens": 1, "finish_reason": "stop"} for t in fake])
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 4 + 4?\n"))
    r = cli(capsys, "chat", *base_args(policy), "--system2", "vote", "--system2-n", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "seven: 8\n"
    r = cli(capsys, "chat", *base_args(policy), "--system2", "vote", "--tools", "calculator")
    assert r.returncode == 2 and "cannot be combined with --tools" in r.stderr


# -- the server -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tiny, dirs):
    from fastapi.testclient import TestClient

    from lmforge.serve import ServeConfig, create_app

    app = create_app(*tiny, ServeConfig(slots=4, ctx=256, model_id="tiny", reward_model=str(dirs[1])))
    with TestClient(app) as c:
        yield c


def post_chat(client, **kw):
    body = {"model": "tiny", "messages": MSGS, "max_tokens": 6, "temperature": 0.9, "seed": 7, **kw}
    return client.post("/v1/chat/completions", json=body)


@pytest.mark.parametrize("mode", ["vote", "best_of_n"])
def test_server_system2_equals_the_library(server, tiny, dirs, mode):
    from lmforge.chat import render_prompt
    from lmforge.engine import recommended_sampling

    model, tok = tiny
    r = post_chat(server, system2={"mode": mode, "n": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    (choice,) = body["choices"]
    # the server fills what the request leaves out (top-k, top-p, min-p) from the model's recommendation
    params = SamplingParams(max_new_tokens=6, temperature=0.9, seed=7, **recommended_sampling(model))
    ref = system2_generate(model, tok, render_prompt(tok, MSGS), params,
                           mode=mode, n=4, reward_model=str(dirs[1]), messages=MSGS)
    assert choice["message"]["content"] == ref["text"]
    info = choice["system2"]
    assert info["mode"] == mode and info["n"] == 4 and info["index"] == ref["index"] and info["candidates"] == ref["candidates"]
    if mode == "best_of_n":
        assert info["scores"] == pytest.approx(rm_scores(dirs[1], MSGS, ref["candidates"]), abs=1e-5)
    assert body["usage"]["completion_tokens"] == ref["completion_tokens"]

    # streaming: the role at once, then the chosen reply as one chunk
    s = post_chat(server, system2={"mode": mode, "n": 4}, stream=True, stream_options={"include_usage": True})
    assert s.status_code == 200
    events = [json.loads(b[6:]) for b in s.text.split("\n\n") if b.startswith("data: {")]
    assert s.text.endswith("data: [DONE]\n\n")
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == ref["text"] and events[-1]["usage"]["completion_tokens"] == ref["completion_tokens"]
    assert events[-2]["choices"][0]["system2"]["index"] == ref["index"]


def test_server_completions_system2(server, tiny):
    from lmforge.engine import recommended_sampling

    model, tok = tiny
    prompt = "2 + 3 ="
    r = server.post("/v1/completions", json={"model": "tiny", "prompt": [prompt, prompt + " 5"], "max_tokens": 5,
                                             "temperature": 1.0, "seed": 2, "system2": {"mode": "vote", "n": 3}})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    for c, p in zip(choices, [prompt, prompt + " 5"]):
        params = SamplingParams(max_new_tokens=5, temperature=1.0, seed=2, **recommended_sampling(model))
        ref = system2_generate(model, tok, tok.encode(p), params, mode="vote", n=3)
        assert c["text"] == ref["text"] and c["system2"]["candidates"] == ref["candidates"]
    # streamed: one chunk per prompt, with the same text
    s = server.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 5, "temperature": 1.0, "seed": 2,
                                             "stream": True, "system2": {"mode": "vote", "n": 3}})
    events = [json.loads(b[6:]) for b in s.text.split("\n\n") if b.startswith("data: {")]
    assert s.status_code == 200 and len(events) == 1 and events[0]["choices"][0]["text"] == choices[0]["text"]
    r = server.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "logprobs": 0, "system2": {"mode": "vote", "n": 2}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"


def test_server_without_system2_is_unchanged(server):
    r = post_chat(server, n=2)
    assert r.status_code == 200 and len(r.json()["choices"]) == 2 and "system2" not in r.json()["choices"][0]


@pytest.mark.parametrize("fields, param", [
    ({"system2": {"mode": "tree", "n": 4}}, "system2.mode"),
    ({"system2": {"mode": "vote", "n": 0}}, "system2.n"),
    ({"system2": {"mode": "vote", "n": 17}}, "system2.n"),
    ({"system2": {"mode": "vote", "samples": 4}}, "system2.samples"),
    ({"system2": "vote"}, "system2"),
    ({"system2": {"mode": "vote", "n": 5}}, "system2.n"),  # more than the server's 4 slots
    ({"system2": {"mode": "vote", "n": 2}, "n": 2}, "n"),
    ({"system2": {"mode": "vote", "n": 2}, "temperature": 0}, "temperature"),
    ({"system2": {"mode": "vote", "n": 2}, "logprobs": True}, "logprobs"),
])
def test_server_bad_system2_is_400(server, fields, param):
    r = post_chat(server, **fields)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"]


def test_server_best_of_n_needs_a_reward_model(tiny):
    from fastapi.testclient import TestClient

    from lmforge.serve import ServeConfig, create_app

    with TestClient(create_app(*tiny, ServeConfig(slots=2, ctx=128, model_id="tiny"))) as c:
        r = post_chat(c, system2={"mode": "best_of_n", "n": 2})
        assert r.status_code == 400 and "--reward-model" in r.json()["error"]["message"]
        assert post_chat(c, system2={"mode": "vote", "n": 2}).status_code == 200
