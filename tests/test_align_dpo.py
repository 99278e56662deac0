"""DPO: the losses equal trl's DPOTrainer (pinned trl, test extra) on the same model and batch;
the loss moves the right way; `lmforge dpo` end to end (LoRA and full) with cached reference log-probs."""
from __future__ import annotations

import json

import pytest
import torch

from _align_tiny import losses, tiny_lm_dir
from lmforge.align.dpo import preference_loss, reply_logps

TOL = 2e-4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_model_path):
    return tiny_lm_dir(tmp_path_factory.mktemp("dpo") / "tiny")


def test_losses_equal_trl_dpo_trainer(tiny_dir, tmp_path):
    """trl computes log-probs and the loss with its own code on its own batch; we take the same
    token ids and completion mask through our model and our loss."""
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    import transformers
    from trl import DPOConfig, DPOTrainer

    from lmforge.loading import load_model
    from lmforge.loading.load import build_model

    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_dir))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    rows = [("What is 2+2?", "4", "It is 5, I think."), ("Capital of France?", "Paris.", "Rome"),
            ("Say hi", "Hi there!", "No.")]
    data = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
                                        "rejected": [{"role": "assistant", "content": r}]} for p, c, r in rows])
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.3, loss_type=["sigmoid"], report_to=[], use_cpu=True,
                     per_device_train_batch_size=3, max_length=128)
    trainer = DPOTrainer(model=hf_model, args=args, train_dataset=data, processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy away from the reference (trl keeps its own reference copy)
        for p in trainer.model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ref, _ = load_model(tiny_dir)
    pol_state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    policy = build_model(ref.cfg, pol_state)
    with torch.no_grad():
        lp, n = reply_logps(policy, batch["input_ids"], batch["completion_mask"])
        rlp, _ = reply_logps(ref, batch["input_ids"], batch["completion_mask"])
    pc, pr = lp.chunk(2)
    rc, rr = rlp.chunk(2)
    nc, nr = n.chunk(2)
    # record the per-token log-probs trl's own forward passes produce (policy and reference)
    seen = {}

    def recorder(name, module):
        inner = module.forward

        def forward(*a, **kw):
            out = inner(*a, **kw)
            seen[name] = out.log_probs.detach().clone()
            return out

        module.forward = forward

    recorder("policy", trainer.model)
    recorder("ref", trainer.ref_model)
    trainer.model.eval()
    for loss_type, smoothing in (("sigmoid", 0.0), ("ipo", 0.0), ("robust", 0.2), ("hinge", 0.0)):
        trainer.loss_types, trainer.label_smoothing = [loss_type], smoothing
        trainer._metrics["eval"].clear()
        with torch.no_grad():
            theirs = float(trainer._compute_loss(trainer.model, batch, False))
        # 1) the loss formula: trl's own log-probs through our loss -> the same number
        tc, tr_ = seen["policy"].sum(1).chunk(2)
        tref_c, tref_r = seen["ref"].sum(1).chunk(2)
        same_in, cr, rj = preference_loss(tc, tr_, tref_c, tref_r, beta=0.3, loss_type=loss_type, label_smoothing=smoothing,
                                          n_c=nc, n_r=nr)
        assert abs(float(same_in.mean()) - theirs) <= 1e-6, loss_type
        assert abs(float((cr - rj).mean()) - trainer._metrics["eval"]["rewards/margins"][0]) <= 1e-6
        # 2) end to end: our model's log-probs through our loss (fp32 sums over a 49152-token vocabulary)
        ours, _, _ = preference_loss(pc, pr, rc, rr, beta=0.3, loss_type=loss_type, label_smoothing=smoothing, n_c=nc, n_r=nr)
        assert abs(float(ours.mean()) - theirs) <= TOL * max(1.0, abs(theirs)), loss_type
    assert torch.allclose(lp, seen["policy"].sum(1), atol=0, rtol=1e-4)  # fp32 sums over a 49152-token vocabulary
    assert torch.allclose(rlp, seen["ref"].sum(1), atol=0, rtol=1e-4)  # fp32 sums over a 49152-token vocabulary


def test_loss_gradients_push_chosen_up_and_rejected_down():
    pc, pr = torch.tensor([-5.0, -7.0], requires_grad=True), torch.tensor([-6.0, -4.0], requires_grad=True)
    ref = torch.tensor([-5.5, -5.5])
    n = torch.tensor([3, 4])
    for lt, ls in (("sigmoid", 0.0), ("ipo", 0.0), ("robust", 0.1), ("hinge", 0.0)):
        loss, _, _ = preference_loss(pc, pr, ref, ref, beta=0.5, loss_type=lt, label_smoothing=ls, n_c=n, n_r=n)
        gc, gr = torch.autograd.grad(loss.mean(), (pc, pr))
        assert (gc <= 0).all() and (gr >= 0).all() and gc.abs().sum() > 0, lt  # descent raises chosen, lowers rejected
    at_ref, _, _ = preference_loss(ref, ref, ref, ref, beta=0.5)
    assert torch.allclose(at_ref, torch.log(torch.tensor(2.0)))


def _dpo(tiny_dir, data, out, *extra):
    from lmforge.cli.main import main

    return main(["dpo", "--model", str(tiny_dir), "--data", str(data), "--out", str(out), "--batch-size", "4",
                 "--train.lr", "5e-3", "--train.warmup-steps", "0", "--train.log-every", "1", "--train.schedule", "constant",
                 "--lora.r", "4", "--val-fraction", "0.25", "--train.eval-every", "6", *extra])


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    from lmforge.align.tasks import arithmetic_preferences

    p = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_preferences(16, seed=0)))
    return p


def test_dpo_command_lora_learns_and_caches_reference(tiny_dir, pairs_file, tmp_path, capsys):
    out = tmp_path / "dpo"
    assert _dpo(tiny_dir, pairs_file, out, "--train.max-steps", "6") == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    margins = [r["reward_margin"] for r in recs if "reward_margin" in r]
    ls = losses(out)
    assert len(ls) == 6 and ls[-1] < ls[0] and margins[-1] > margins[0]
    assert "val_reward_accuracy" in recs[-1] and "reward_accuracy" in recs[-1]
    assert (out / "ref_logps.pt").exists()
    ckpt = out / (out / "latest").read_text().strip()
    assert (ckpt / "adapter_model.safetensors").exists()
    import lmforge

    assert isinstance(lmforge.load(str(out)).chat("What is 12 + 30?", max_new_tokens=3), str)
    # a second run in the same folder with more steps resumes and reads the cached reference
    assert _dpo(tiny_dir, pairs_file, out, "--train.max-steps", "7") == 0
    assert "reference log-probs: read from" in capsys.readouterr().out


@pytest.mark.slow
def test_dpo_command_full_ipo(tiny_dir, pairs_file, tmp_path):
    out = tmp_path / "full"
    assert _dpo(tiny_dir, pairs_file, out, "--method", "full", "--loss", "ipo", "--beta", "0.5", "--train.max-steps", "4",
                "--train.lr", "1e-3") == 0
    ls = losses(out)
    assert ls[-1] < ls[0]
    ckpt = out / (out / "latest").read_text().strip()
    assert (ckpt / "model.safetensors").exists()


def test_dpo_bad_records_fail_with_line(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    assert _dpo(tiny_dir, bad, tmp_path / "x", "--train.max-steps", "1") == 2
    assert "bad.jsonl:2: missing 'rejected'" in capsys.readouterr().err
