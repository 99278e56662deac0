"""GRPO: advantages, the clipped surrogate and the k3 KL move the right way; rewards (built-in,
sandbox, reward model, dotted path); `lmforge rl` end to end on a tiny model, with tool rollouts."""
from __future__ import annotations

import json

import pytest
import torch

from _align_tiny import tiny_lm_dir
from lmforge.align.grpo import GRPOSettings, RolloutBatches, group_advantages, grpo_loss, token_logps
from lmforge.align.rewards import compute_rewards, get_reward
from lmforge.errors import LmforgeError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_model_path):
    return tiny_lm_dir(tmp_path_factory.mktemp("rl") / "tiny")


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    a = group_advantages(r, 4)
    assert a[0] > 0 and (a[1:4] < 0).all() and torch.allclose(a[4:], torch.zeros(4))
    assert abs(float(a[:4].sum())) < 1e-5
    assert torch.allclose(group_advantages(r, 4, scale=False)[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]))


def _batch(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (4, 10), generator=g)
    mask = torch.zeros(4, 10, dtype=torch.long)
    mask[:, 6:] = 1
    with torch.no_grad():
        old = token_logps(model, ids, mask)
    return {"input_ids": ids, "mask": mask, "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5]), "old_logps": old,
            "ref_logps": old.clone(), "lengths": torch.full((4,), 10)}


def test_surrogate_raises_good_completions_and_kl_is_k3(tiny_model):
    model = tiny_model.train()
    b = _batch(model)
    loss, m = grpo_loss(model, b, beta=0.0)
    assert abs(float(m["kl"])) < 1e-7 and float(m["clip_frac"]) == 0.0
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss.backward()
    opt.step()
    with torch.no_grad():
        new = token_logps(model, b["input_ids"], b["mask"])
    seq = ((new - b["old_logps"]) * b["mask"][:, 1:]).sum(1)
    assert seq[0] > 0 and seq[1] < 0  # the positive-advantage completion became likelier, the negative one less
    # KL (k3) against a reference the policy has moved away from: positive, and it pulls back
    loss2, m2 = grpo_loss(model, {**b, "advantages": torch.zeros(4)}, beta=1.0, clip_eps=0.2)
    assert float(m2["kl"]) > 0 and float(loss2) > 0
    d = b["ref_logps"] - new
    k3 = ((torch.exp(d) - d - 1) * b["mask"][:, 1:]).sum(1) / b["mask"][:, 1:].sum(1)
    assert abs(float(m2["kl"]) - float(k3.mean())) < 1e-5
    assert float(m2["clip_frac"]) > 0  # the step moved some ratios beyond 1 ± 0.2


def test_clipping_stops_the_gradient_beyond_the_trust_region(tiny_model):
    model = tiny_model.train()
    b = _batch(model, seed=1)
    b["old_logps"] = b["old_logps"] - 1.0 * b["mask"][:, 1:]  # ratio e > 1 + eps everywhere
    b["advantages"] = torch.ones(4)
    loss, m = grpo_loss(model, b, beta=0.0, clip_eps=0.2)
    loss.backward()
    assert float(m["clip_frac"]) == 1.0
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.parameters())


def test_reward_functions(tmp_path, monkeypatch):
    rec = {"prompt": "What is 2 + 3?", "answer": "5"}
    assert compute_rewards(get_reward("exact"), [rec, rec], ["It is 5.", "6"]) == [1.0, 0.0]
    assert compute_rewards(get_reward("exact+format"), [rec], ["5"]) == [1.1]
    (tmp_path / "my_rewards.py").write_text("def longer(record, text):\n    return float(len(text))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert compute_rewards(get_reward("my_rewards:longer"), [rec], ["abc"]) == [3.0]
    assert compute_rewards(get_reward("my_rewards.longer"), [rec], ["ab"]) == [2.0]
    for bad, msg in (("nope", "unknown reward"), ("my_rewards:missing", "has no 'missing'"), ("no_such_mod:f", "cannot import")):
        with pytest.raises(LmforgeError, match=msg):
            get_reward(bad)
    with pytest.raises(LmforgeError, match="needs an 'answer'"):
        compute_rewards(get_reward("exact"), [{"prompt": "x"}], ["1"])


def test_unit_test_reward_runs_in_the_sandbox():
    from lmforge.tools.sandbox import sandbox_available

    ok, why = sandbox_available()
    if not ok:
        pytest.skip(f"sandbox unavailable: {why}")
    rec = {"prompt": "Write add(a, b).", "tests": "assert add(2, 3) == 5\nassert add(-1, 1) == 0"}
    good = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```"
    bad = "```python\ndef add(a, b):\n    return a - b\n```"
    assert compute_rewards(get_reward("unit_tests"), [rec] * 3, [good, bad, "def add(a, b): return a + b"]) == [1.0, 0.0, 1.0]


def test_reward_model_reward(tmp_path, tiny_dir):
    from lmforge.align.reward_model import reward_model_from_lm, save_reward_model
    from lmforge.loading import load_model

    lm, tok = load_model(tiny_dir)
    save_reward_model(reward_model_from_lm(lm, pad_id=tok.pad_id), tok, tmp_path / "rm")
    fn = get_reward(f"rm:{tmp_path / 'rm'}")
    s = compute_rewards(fn, [{"prompt": "hi"}] * 2, ["hello", "hello"])
    assert len(s) == 2 and abs(s[0] - s[1]) < 1e-5


def _rl(tiny_dir, out, *extra):
    from lmforge.cli.main import main

    return main(["rl", "--model", str(tiny_dir), "--task.name", "arithmetic", "--task.n", "64", "--task.n-eval", "8",
                 "--out", str(out), "--grpo.group-size", "4", "--grpo.prompts-per-step", "2", "--grpo.max-new-tokens", "4",
                 "--train.lr", "1e-3", "--train.eval-every", "2", "--lora.r", "4", *extra])


def test_rl_command_end_to_end(tiny_dir, tmp_path, capsys):
    out = tmp_path / "rl"
    assert _rl(tiny_dir, out, "--train.max-steps", "2", "--grpo.micro-batches", "2", "--grpo.updates-per-rollout", "2") == 0
    printed = capsys.readouterr().out
    assert "held-out before RL" in printed
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["step"] == 0 and "eval_accuracy" in recs[0]
    assert {"loss", "kl", "reward", "clip_frac", "completion_len"} <= set(recs[1])
    ev = json.loads((out / "rl_eval.json").read_text())
    assert ev["steps"] == 2 and "before" in ev and "after" in ev
    ckpt = out / (out / "latest").read_text().strip()
    assert (ckpt / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_rl_resume_and_full_method_with_user_reward(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "rl"
    assert _rl(tiny_dir, out, "--train.max-steps", "2") == 0
    assert _rl(tiny_dir, out, "--train.max-steps", "3") == 0  # resumes: rollout counter and prompt order restored
    assert json.loads((out / "rl_eval.json").read_text())["steps"] == 3
    (tmp_path / "rw.py").write_text("def short(record, text):\n    return 1.0 if len(text) < 6 else 0.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    full = tmp_path / "full"
    assert _rl(tiny_dir, full, "--method", "full", "--reward", "rw:short", "--train.max-steps", "2") == 0
    assert (full / (full / "latest").read_text().strip() / "model.safetensors").exists()


def test_tool_rollouts_mask_tool_results(tmp_path, monkeypatch, default_model_path):
    import lmforge.align.grpo as grpo
    from lmforge.loading import load_model

    # tool rollouts: the (random) model's text goes through the tool loop; tool results are masked out
    model, tok = load_model(tiny_lm_dir(tmp_path / "long", max_seq_len=1024))  # the tool list alone is ~300 tokens
    calls = {"n": 0}
    real = grpo.sample_completions

    def fake_generate(model, tok, prompts, params):  # the model "calls" the calculator on its first turn
        calls["n"] += 1
        text = '<tool_call>{"name": "calculator", "arguments": {"expression": "2+3"}}</tool_call>' if calls["n"] % 2 else "5"
        return [{"text": text, "ids": tok.encode(text), "completion_tokens": 3, "prompt_tokens": len(p), "finish_reason": "stop"}
                for p in prompts]

    monkeypatch.setattr("lmforge.engine.generate_text", fake_generate)
    src = RolloutBatches(model, tok, [{"prompt": "What is 2 + 3?", "answer": "5"}], get_reward("exact"),
                         GRPOSettings(group_size=2, prompts_per_step=1, max_new_tokens=8, tools=["calculator"], beta=0.0))
    b = next(src)
    assert b["reward"] == 1.0 and real is grpo.sample_completions
    ids, mask = b["input_ids"][0].tolist(), b["mask"][0].tolist()
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    assert "<tool_call>" in trained and "5" in trained and "tool_response" not in trained
    assert "<tool_response>" in tok.decode(ids)


def test_rl_config_errors(tiny_dir, tmp_path, capsys):
    assert _rl(tiny_dir, tmp_path / "x", "--grpo.group-size", "1") == 2
    assert "group_size must be at least 2" in capsys.readouterr().err
    with pytest.raises(LmforgeError, match="must divide"):
        RolloutBatches(None, None, [{"prompt": "x"}], None, GRPOSettings(group_size=3, prompts_per_step=1, micro_batches=2))
