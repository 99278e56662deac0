"""Log-likelihood scoring, perplexity and the eval loop on tiny random models (fast, no download).

The default model and transformers' cross-check of real scores live in test_eval_crosscheck.py."""
from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.eval.generative import exact_match, extract_answer
from lmforge.eval.perplexity import score_token_ids, windows
from lmforge.eval.scoring import encode_pair, move_trailing_space, score_groups, score_groups_unshared
from lmforge.model import Transformer
from conftest import tiny_config


def byte_tokenizer():
    """A byte-level tokenizer with no merges (vocab 256 + <|endoftext|>): every byte is a token."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from lmforge.tokenizer import Tokenizer, _bytes_to_unicode

    b2u = _bytes_to_unicode()
    backend = HFTokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    return Tokenizer(backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_byte_model(seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(tiny_config(vocab_size=260, **kw)).init_weights(seed=seed).eval()


def brute_logprob(model, ctx, cont):
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ctx + cont]))[0].float(), -1)
    return sum(lp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont))


def test_shared_context_rows_equal_separate_sequences():
    model = tiny_byte_model()
    g = torch.Generator().manual_seed(0)
    groups = []
    for _ in range(25):
        ctx = torch.randint(0, 256, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
        conts = [torch.randint(0, 256, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(int(torch.randint(1, 6, (1,), generator=g)))]
        groups.append((ctx, conts))
    shared = score_groups(model, groups, batch_tokens=150)  # several batches, padding in each
    plain = score_groups_unshared(model, groups, batch_tokens=64)
    worst = 0.0
    for (ctx, conts), a, b in zip(groups, shared, plain):
        for c, x, y in zip(conts, a, b):
            ref = brute_logprob(model, ctx, c)
            worst = max(worst, abs(x.logprob - ref), abs(y.logprob - ref))
            assert x.n_tokens == len(c) and x.greedy == y.greedy
    assert worst < 1e-4, worst


def test_greedy_flag_and_progress():
    model = tiny_byte_model()
    ctx = [5, 6, 7]
    with torch.no_grad():
        best = int(model(torch.tensor([ctx]))[0, -1].argmax())
    seen = []
    (scores,) = score_groups(model, [(ctx, [[best], [(best + 1) % 256]])], progress=seen.extend)
    assert scores[0].greedy and not scores[1].greedy and seen == [0]


def test_long_rows_are_truncated_or_split():
    model = tiny_byte_model(max_seq_len=32)
    ctx = list(range(40))
    conts = [[1, 2, 3], [4, 5]]
    (a,) = score_groups(model, [(ctx, conts)])
    for c, s in zip(conts, a):  # the context keeps its last tokens
        assert abs(s.logprob - brute_logprob(model, ctx[-(32 - 5):], c)) < 1e-4
    long = [[7] * 20, [8] * 20]  # together longer than the context: one row each
    (b,) = score_groups(model, [(ctx, long)])
    for c, s in zip(long, b):
        assert abs(s.logprob - brute_logprob(model, ctx[-12:], c)) < 1e-4
    with pytest.raises(LmforgeError, match="does not fit"):
        score_groups(model, [(ctx, [[1] * 40])])


def test_tokenization_boundary(default_model_path):
    from lmforge.loading import load_tokenizer

    tok = load_tokenizer(default_model_path)
    assert move_trailing_space("Q: 2+2?\nA: ", "4") == ("Q: 2+2?\nA:", " 4")
    assert move_trailing_space("line\n", "x") == ("line\n", "x")  # only spaces/tabs move
    ctx, cont = encode_pair(tok, "Question: capital of France?\nAnswer: ", "Paris")
    assert tok.decode(cont) == " Paris" and tok.decode(ctx) == "Question: capital of France?\nAnswer:"
    assert ctx + cont == tok.encode("Question: capital of France?\nAnswer: Paris")
    # a continuation that merges with the context's end: the straddling token is scored
    ctx, cont = encode_pair(tok, "The word is hel", "lo")
    assert ctx + cont == tok.encode("The word is hello") and tok.decode(cont).endswith("lo")
    # empty context: one document-start token to condition on
    ctx, cont = encode_pair(tok, "", "Hello")
    assert ctx == [tok.token_to_id("<|endoftext|>")] and tok.decode(cont) == "Hello"


def test_perplexity_windows_cover_every_token_once():
    for n, w, s in [(10, 4, 2), (10, 4, 4), (3, 8, 4), (17, 5, 3), (2, 2, 1)]:
        scored = []
        for b, e, f in windows(n, w, s):
            assert e - b <= w and b <= f - 1  # the first scored token has context inside the window
            scored += list(range(f, e))
        assert scored == list(range(1, n))


def test_perplexity_matches_transformers_sliding_window_recipe():
    transformers = pytest.importorskip("transformers")
    from lmforge.loading.hf import config_to_hf

    model = tiny_byte_model(seed=3)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_to_hf(model.cfg))).eval()
    hf.load_state_dict(model.state_dict(), strict=False)
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (90, 33, 5)]
    W, S = 32, 12
    ours = score_token_ids(model, docs, window=W, stride=S, batch_tokens=100)
    for ids, losses in zip(docs, ours):
        # transformers' documented perplexity recipe: labels -100 on the already-scored prefix
        x = torch.tensor([ids])
        nll_sum, n_tok, prev_end = 0.0, 0, 0
        for begin in range(0, len(ids), S):
            end = min(begin + W, len(ids))
            trg = end - prev_end
            labels = x[:, begin:end].clone()
            labels[:, :-trg] = -100
            with torch.no_grad():
                out = hf(x[:, begin:end], labels=labels)
            k = (labels[:, 1:] != -100).sum().item()
            nll_sum += out.loss.item() * k
            n_tok += k
            prev_end = end
            if end == len(ids):
                break
        assert len(losses) == n_tok == len(ids) - 1
        assert abs(sum(losses) - nll_sum) < 1e-3 * max(1, n_tok)


def test_answer_extraction():
    assert extract_answer(" 42. Then 7", r"[-+]?\d+") == "42"
    assert extract_answer("Paris. It is", r"[^\.\?\!\;\n]+") == "Paris"
    assert extract_answer("no digits", r"\d+") == ""
    assert extract_answer("a STOP b", None, stop_string="STOP") == "a STOP"
    assert exact_match(" 4 ", ["4"]) and exact_match("four", ["4", "four"]) and not exact_match("44", ["4"])


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_evaluate_end_to_end_is_deterministic(tmp_path):
    from lmforge.eval.report import load_run
    from lmforge.eval.runner import EvalSettings, LocalBackend, evaluate

    model, tok = tiny_byte_model(seed=5), byte_tokenizer()
    mc = _write_jsonl(tmp_path / "mc.jsonl", [
        {"input": f"Q: {a}+{b}?\nA:", "choices": [f" {a + b}", f" {a + b + 1}", " x"], "answer": 0}
        for a in range(6) for b in range(3)])
    gen = _write_jsonl(tmp_path / "gen.jsonl", [{"input": f"{a}+1=", "target": str(a + 1)} for a in range(6)])
    txt = tmp_path / "doc.txt"
    txt.write_text("the quick brown fox jumps over the lazy dog. " * 8)
    backend = LocalBackend(model, tok, batch_tokens=256)
    spec = f"{mc},{gen},ppl:{txt}"
    s = EvalSettings(tasks=spec, limit=10, fewshot=2, seed=3, max_new_tokens=4, ppl_window=64)
    run1, samples1 = evaluate(settings=s, backend=backend, model_id="tiny", out=tmp_path / "run1", progress=False)
    run2, _ = evaluate(settings=s, backend=backend, model_id="tiny", out=tmp_path / "run2", progress=False)
    strip = lambda r: [(x["task"], x["metric"], x["value"], x["stderr"], x["n"]) for x in r["results"]]  # noqa: E731
    assert strip(run1) == strip(run2)
    assert {(x["task"], x["metric"]) for x in run1["results"]} >= {("mc", "acc"), ("mc", "acc_norm"), ("gen", "exact_match"),
                                                                   ("ppl:doc.txt", "bits_per_byte")}
    assert all(x["n"] == 10 for x in run1["results"] if x["task"] == "mc")
    # per-choice log-likelihoods in the samples equal the brute-force value of the same text
    rec = samples1["mc"][0]
    ctx_ids, cont_ids = encode_pair(tok, rec["context"], rec["choices"][1])
    assert abs(rec["logprobs"][1] - brute_logprob(model, ctx_ids, cont_ids)) < 1e-4
    assert rec["context"].count("Q:") == 3  # two shots and the query
    # bits per byte from the per-token losses
    ppl = next(t for t in run1["tasks"] if t["kind"] == "perplexity")
    total = sum(samples1["ppl:doc.txt"][0]["token_losses"])
    assert abs(ppl["metrics"]["bits_per_byte"]["value"] - total / math.log(2) / ppl["bytes"]) < 1e-3
    # the run folder
    out = tmp_path / "run1"
    assert (out / "results.md").read_text().count("| mc |") == 2
    assert (out / "plots" / "scores.png").stat().st_size > 5000
    assert len((out / "samples" / "mc.jsonl").read_text().splitlines()) == 10
    assert load_run(out)["model"] == "tiny"
    # another seed draws other items
    s2 = EvalSettings(tasks=str(mc), limit=10, seed=4)
    run3, samples3 = evaluate(settings=s2, backend=backend, model_id="tiny", progress=False)
    assert [r["id"] for r in samples3["mc"]] != [r["id"] for r in samples1["mc"]]


def test_compare_runs_cli(tmp_path, capsys):
    from lmforge.cli.main import main

    def run(model, acc, n=50):
        return {"model": model, "settings": {}, "tasks": [{"task": "t1", "primary": "acc"}],
                "results": [{"model": model, "task": "t1", "metric": "acc", "value": acc, "stderr": 0.05, "n": n},
                            {"model": model, "task": "t1", "metric": "acc_norm", "value": acc / 2, "stderr": 0.04, "n": n}]}

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps(run("A", 0.5)))
    (tmp_path / "b.json").write_text(json.dumps(run("B", 0.6)))
    assert main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "| t1 | acc | 0.500 | 0.600 | +0.1000 | 0.0707 | 50/50 |" in out
    assert main(["eval", "compare", str(tmp_path / "a")]) == 2
    assert main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "missing")]) == 2
    assert "no eval results" in capsys.readouterr().err
