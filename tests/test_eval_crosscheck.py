"""Trustworthy scores: every choice's log-likelihood on 100 multiple-choice items, from lmforge's
eval loop and from `transformers` (an independent reference on the same weights, with its own
tokenizer object and the usual context/continuation split), agree within 1e-3, and so do the
accuracies."""
from __future__ import annotations

import json
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")


def hf_reference(model):
    """transformers' LlamaForCausalLM holding `model`'s weights (fp32, eval)."""
    from lmforge.loading.hf import config_to_hf

    cfg = transformers.LlamaConfig(**config_to_hf(model.cfg))
    hf = transformers.LlamaForCausalLM(cfg).eval()
    state = {k: v for k, v in model.state_dict().items() if not (model.cfg.tie_embeddings and k == "lm_head.weight")}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if model.cfg.tie_embeddings:
        hf.tie_weights()
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    return hf


def arithmetic_items(n=100, seed=1234):
    """A deterministic 4-way multiple-choice task (two-digit addition)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 89), rng.randint(10, 89)
        s = a + b
        choices = [str(s), str(s + 1), str(s - 10), str(s + 10)]
        rng.shuffle(choices)
        rows.append({"input": f"Question: What is {a} plus {b}?\nAnswer: ", "choices": choices, "answer": str(s)})
    return rows


def reference_logprobs(hf, hf_tok, items: list[tuple[str, list[str]]], rows_per_batch: int = 64) -> list[list[float]]:
    """log p(choice | context) the plain way: trailing space joins the continuation, context and
    continuation encoded together, split after the context's own tokens; right-padded batches."""
    rows = []  # (item, token ids, number of context tokens)
    for k, (context, choices) in enumerate(items):
        ctx = context.rstrip(" ")
        ctx_ids = hf_tok(ctx, add_special_tokens=False)["input_ids"]
        for c in choices:
            whole = hf_tok(ctx + context[len(ctx):] + c, add_special_tokens=False)["input_ids"]
            assert whole[: len(ctx_ids)] == ctx_ids
            rows.append((k, whole, len(ctx_ids)))
    out: list[list[float]] = [[] for _ in items]
    for s in range(0, len(rows), rows_per_batch):
        chunk = rows[s : s + rows_per_batch]
        T = max(len(w) for _, w, _ in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        for i, (_, w, _) in enumerate(chunk):
            ids[i, : len(w)] = torch.tensor(w)
            mask[i, : len(w)] = 1
        at = [(i, t) for i, (_, w, n_ctx) in enumerate(chunk) for t in range(n_ctx, len(w))]
        with torch.no_grad():  # transformers' own body, norm and head; the head only where needed
            h = hf.model(input_ids=ids, attention_mask=mask).last_hidden_state
            h = h[torch.tensor([i for i, _ in at]), torch.tensor([t - 1 for _, t in at])]
            logp = torch.log_softmax(hf.lm_head(h).float(), -1)
        tgt = [chunk[i][1][t] for i, t in at]
        vals = logp[torch.arange(len(at)), torch.tensor(tgt)].tolist()
        sums: dict[int, float] = {}
        for (i, _), v in zip(at, vals):
            sums[i] = sums.get(i, 0.0) + v
        for i, (k, _, _) in enumerate(chunk):
            out[k].append(sums[i])
    return out


def test_multiple_choice_loglikelihoods_match_transformers(default_lm, tmp_path):
    from lmforge.eval.runner import EvalSettings, LocalBackend, evaluate

    rows = arithmetic_items(100)
    path = tmp_path / "add4.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    backend = LocalBackend(default_lm.model, default_lm.tokenizer, batch_tokens=2048)
    run, samples = evaluate(settings=EvalSettings(tasks=str(path), seed=0), backend=backend, model_id="default",
                            progress=False)
    recs = samples["add4"]
    assert len(recs) == 100

    hf = hf_reference(default_lm.model)
    default_lm.tokenizer.save(tmp_path / "tok")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    refs = reference_logprobs(hf, hf_tok, [(r["context"], r["choices"]) for r in recs])
    worst, correct = 0.0, 0
    for r, ref in zip(recs, refs):
        worst = max(worst, max(abs(a - b) for a, b in zip(ref, r["logprobs"])))
        correct += max(range(4), key=ref.__getitem__) in r["gold"]
    assert worst <= 1e-3, worst
    acc = next(x for x in run["results"] if x["metric"] == "acc")["value"]
    assert acc == correct / 100
