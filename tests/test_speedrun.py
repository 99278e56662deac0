"""`lmforge speedrun`: the budget, the chat data it teaches (held-out questions never trained on),
and, in the slow stage, the whole 10-minute life of a model with its report card and a resume."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.errors import LmforgeError
from lmforge.speedrun import chat_data
from lmforge.speedrun.plan import fill_steps, make_plan, parse_budget, shape_for


@pytest.mark.parametrize("text,seconds", [("10m", 600), ("1h", 3600), ("1h30m", 5400), ("4h", 14400), ("300", 300),
                                          ("2m30s", 150)])
def test_budget_parses(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text,says", [("ten minutes", "not a duration"), ("1x", "not a duration"),
                                       ("1h 30m", "not a duration"), ("30s", "too short")])
def test_bad_budget_is_a_one_line_error(text, says):
    with pytest.raises(LmforgeError, match=says):
        parse_budget(text)


def test_bigger_budgets_and_gpus_get_bigger_models():
    cpu = [shape_for(b, "cpu") for b in (600, 3600, 4 * 3600)]
    assert [s[1] for s in cpu] == sorted(s[1] for s in cpu) and cpu[0][1] < cpu[-1][1]
    assert shape_for(3600, "cuda")[1] > shape_for(3600, "cpu")[1]
    plan = fill_steps(make_plan(3600, "cpu", "fp32"), step_s=1.0)
    # steps fill the stage's share of the budget at the measured speed, with room for evals
    assert 0.7 * plan.pretrain_s <= plan.pretrain_steps <= plan.pretrain_s
    assert plan.pretrain_steps > plan.sft_steps > 0


def test_sft_records_never_hold_a_heldout_question():
    held = chat_data.heldout_sums(40)
    assert all(len(str(p.a)) == 3 and len(str(p.b)) == 3 and p.op == "+" for p in held)
    recs = chat_data.sft_records(800, seed=0, heldout=held)
    assert len(recs) == 800
    users = [r["messages"][0]["content"] for r in recs]
    exprs = {json.loads(r["messages"][1]["tool_calls"][0]["function"]["arguments"])["expression"]
             for r in recs if r["messages"][1].get("tool_calls")}
    assert not exprs & {f"{p.a}+{p.b}" for p in held}
    assert not set(users) & set(chat_data.IDENTITY_HELDOUT)
    identity = [r for r in recs if len(r["messages"]) == 2]
    assert 0.1 * len(recs) <= len(identity) <= 0.2 * len(recs)
    assert all(chat_data.NAME in r["messages"][1]["content"] for r in identity)
    # the tool results are the calculator's own, and 3-digit sums are well represented
    tools = [r for r in recs if len(r["messages"]) == 4]
    assert all(r["messages"][2]["content"] == str(eval(json.loads(  # noqa: S307 (digits and + - * only)
        r["messages"][1]["tool_calls"][0]["function"]["arguments"])["expression"])) for r in tools)
    assert sum(re.fullmatch(r"\d{3}\+\d{3}", e) is not None for e in exprs) > len(exprs) // 8


@pytest.mark.slow
def test_speedrun_10m_end_to_end_and_resume(tmp_path):
    """The whole life of a model in 10 minutes: every stage runs, the losses fall, the report card
    holds its tables and plots; a second run resumes (does nothing) and reprints the result."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lmforge.cli.main", "speedrun", "--budget", "10m", "--out", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert first.returncode == 0, first.stderr[-3000:]
    state = json.loads((out / "speedrun.json").read_text())
    assert list(state["stages"]) == ["fetch", "tokenizer", "prepare", "plan", "pretrain", "sft", "eval", "report"]
    from lmforge.train.plots import read_metrics

    for stage in ("pretrain", "sft"):
        losses = [r["loss"] for r in read_metrics(out / stage / "metrics.jsonl") if "loss" in r]
        assert losses[-1] < losses[0] - 0.5, (stage, losses[0], losses[-1])
    # every conversation fits the model's context: SFT truncated nothing
    assert json.loads((out / "sft" / "data_report.json").read_text())["truncated"] == []
    report = (out / "report.md").read_text()
    for png in ("pretrain_loss.png", "pretrain_bpb.png", "sft_loss.png", "stages.png"):
        assert (out / png).stat().st_size > 5000 and f"({png})" in report
    assert "| held-out 3-digit sums answered correctly through the calculator |" in report
    assert f"lmforge chat --model {out / 'sft'} --tools calculator" in report
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done in an earlier run") == 8
    other = subprocess.run(cmd[:-3] + ["1h", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert other.returncode != 0 and "--budget 10m" in other.stderr and len(other.stderr.strip().splitlines()) == 1
