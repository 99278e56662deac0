"""Direct Preference Optimization: learn from comparisons without a reward model.

    rows = tokenize_pairs(tok, pairs, max_len)[0]
    cache_reference_logps(model, rows, pad_id)              # once, before training; saved in the run
    loss, metrics = dpo_batch_loss(model, collate_pairs(rows[:8], pad_id), beta=0.1, loss_type="sigmoid")

With the policy's and the (frozen) reference model's summed log-probabilities of each reply,
the implicit rewards are r = β·(log π(y|x) − log π_ref(y|x)); the losses on Δ = r_c − r_r / β:
- `sigmoid` (DPO): −log σ(β·Δ)
- `ipo`: (Δ̄ − 1/(2β))², with Δ̄ from log-ratios averaged per reply token (as trl does, so β means
  the same across reply lengths)
- `robust` (rDPO, label noise ε = `label_smoothing`): (−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)) / (1−2ε)
- `hinge` (SLiC): max(0, 1 − β·Δ)
These equal trl 1.16's `DPOTrainer` losses on the same log-probs (tests/test_align_dpo.py).

The reference is the model before training: its log-probs of every pair are computed once and
kept with the rows (and written to the run folder), so no second model lives in memory while
training — for full finetuning as for LoRA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.model import softcap
from lmforge.errors import LmforgeError
from lmforge.train.batches import to_device

LOSS_TYPES = ("sigmoid", "ipo", "robust", "hinge")


def reply_logps(model, input_ids: torch.Tensor, reply_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log-probs of the reply tokens per row [N] in fp32, reply token counts [N]).

    Position t predicts token t+1; a token counts when `reply_mask` marks it. Right padding needs
    no attention mask (causal attention never looks ahead).
    """
    from lmforge.train.trainer import unwrap

    raw = unwrap(model)
    idx, mask, dev = input_ids, reply_mask, input_ids.device
    h = model(idx[:, :-1], hidden_only=True)
    tgt = idx[:, 1:]
    sel = mask[:, 1:].bool()
    # only reply positions go through the output head: prompts cost no vocab-sized logits
    logits = softcap(F.linear(h[sel], raw.lm_head.weight), raw.cfg.final_logit_softcap).float()
    tok_logp = torch.gather(logits.log_softmax(-1), 1, tgt[sel][:, None]).squeeze(1)
    rows = torch.arange(idx.shape[0], device=dev)[:, None].expand_as(sel)[sel]
    out = torch.zeros(idx.shape[0], device=dev, dtype=torch.float32).index_add(0, rows, tok_logp)
    return out, sel.sum(1)


def preference_loss(pol_c: torch.Tensor, pol_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
                    beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                    n_c: torch.Tensor | None = None, n_r: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards) from summed reply log-probs."""
    lc, lr = pol_c - ref_c, pol_r - ref_r
    delta = lc - lr
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "ipo":
        if n_c is None or n_r is None:
            raise LmforgeError("the ipo loss needs the reply token counts")
        d = lc / n_c.clamp(min=1) - lr / n_r.clamp(min=1)
        losses = (d - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        if not 0.0 <= label_smoothing < 0.5:
            raise LmforgeError(f"the robust loss needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
                  + label_smoothing * F.logsigmoid(-beta * delta)) / (1 - 2 * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:
        raise LmforgeError(f"unknown DPO loss '{loss_type}' (choose {', '.join(LOSS_TYPES)})")
    return losses, (beta * lc).detach(), (beta * lr).detach()


def dpo_batch_loss(model, batch: dict, beta: float = 0.1, loss_type: str = "sigmoid",
                   label_smoothing: float = 0.0, sft_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The trainer's loss_fn for a `collate_pairs` batch carrying cached `ref_logps`.

    `sft_weight` > 0 adds that much of the chosen replies' mean token NLL (keeps the chosen
    answers likely; RPO)."""
    if "ref_logps" not in batch:
        raise LmforgeError("DPO batches need cached reference log-probs (cache_reference_logps)")
    logps, counts = reply_logps(model, batch["input_ids"], batch["reply_mask"])
    ref = batch["ref_logps"].float()
    pc, pr = logps.chunk(2)
    rc, rr = ref.chunk(2)
    nc, nr = counts.chunk(2)
    losses, cr, rj = preference_loss(pc, pr, rc, rr, beta, loss_type, label_smoothing, nc, nr)
    loss = losses.mean()
    if sft_weight:
        loss = loss + sft_weight * (-(pc / nc.clamp(min=1))).mean()
    return loss, {"tokens": batch["lengths"].sum(), "rewards_chosen": cr.mean(), "rewards_rejected": rj.mean(),
                  "reward_margin": (cr - rj).mean(), "reward_accuracy": (cr > rj).float().mean(),
                  "logps_chosen": pc.detach().mean(), "logps_rejected": pr.detach().mean()}


@torch.no_grad()
def cache_reference_logps(model, rows: list[dict], pad_id: int, batch_size: int = 8, progress: bool = False) -> list[dict]:
    """Add `ref_logps` = (chosen, rejected) summed reply log-probs under `model` to every row, in place."""
    from lmforge.align.preference import collate_pairs

    was = model.training
    model.eval()
    todo = range(0, len(rows), batch_size)
    if progress:
        from tqdm.auto import tqdm

        todo = tqdm(todo, desc="reference log-probs", unit="batch")
    for i in todo:
        chunk = rows[i:i + batch_size]
        b = collate_pairs([{k: v for k, v in r.items() if k != "ref_logps"} for r in chunk], pad_id)
        b = to_device(b, model.lm_head.weight.device)
        lp, _ = reply_logps(model, b["input_ids"], b["reply_mask"])
        c, r = lp.double().cpu().chunk(2)
        for row, x, y in zip(chunk, c.tolist(), r.tolist()):
            row["ref_logps"] = (x, y)
    model.train(was)
    return rows


@torch.no_grad()
def eval_pairs(model, rows: list[dict], pad_id: int, beta: float, loss_type: str = "sigmoid",
               label_smoothing: float = 0.0, batch_size: int = 8) -> dict:
    """Held-out pairs: mean loss, reward accuracy and margin."""
    from lmforge.align.preference import collate_pairs

    tot = {"loss": 0.0, "reward_accuracy": 0.0, "reward_margin": 0.0}
    n = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        batch = to_device(collate_pairs(chunk, pad_id), model.lm_head.weight.device)
        loss, m = dpo_batch_loss(model, batch, beta, loss_type, label_smoothing)
        k = len(chunk)
        tot["loss"] += float(loss) * k
        tot["reward_accuracy"] += float(m["reward_accuracy"]) * k
        tot["reward_margin"] += float(m["reward_margin"]) * k
        n += k
    return {f"val_{k}": v / max(n, 1) for k, v in tot.items()}


# -- the command --------------------------------------------------------------------------------
from dataclasses import dataclass, field  # noqa: E402
from typing import Literal  # noqa: E402

from lmforge.align.common import AlignTrainConfig, LoraArgs, TaskArgs  # noqa: E402


@dataclass
class DPOTrainConfig(AlignTrainConfig):
    lr: float = 5e-5


@dataclass
class DPOConfig:
    model: str | None = None  # the policy to start from (and the reference): GGUF, HF folder, run folder
    data: str = ""  # preference JSONL (prompt|messages, chosen, rejected); or --task.name arithmetic
    val_data: str = ""
    val_fraction: float = 0.05
    task: TaskArgs = field(default_factory=TaskArgs)
    out: str = "runs/dpo"
    method: Literal["full", "lora"] = "lora"
    loss: Literal["sigmoid", "ipo", "robust", "hinge"] = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0  # the robust loss's label-noise rate ε
    sft_weight: float = 0.0  # + this × NLL of the chosen replies (RPO)
    on_error: Literal["fail", "skip"] = "fail"
    max_seq_len: int = 512
    batch_size: int = 4  # pairs per micro-batch
    seed: int = 0
    threads: int = 0
    lora: LoraArgs = field(default_factory=LoraArgs)
    train: DPOTrainConfig = field(default_factory=DPOTrainConfig)


def run_dpo(cfg: DPOConfig, progress: bool = True) -> dict:
    """DPO with the one trainer; reference log-probs computed once (saved as ref_logps.pt)."""
    import dataclasses
    from pathlib import Path

    from lmforge.align.common import lm_save_fn, prepare
    from lmforge.align.pairs import open_pair_run, pair_batches
    from lmforge.finetune.sft import base_model_id
    from lmforge.train import train

    if cfg.loss == "robust" and not 0.0 <= cfg.label_smoothing < 0.5:
        raise LmforgeError("--loss robust needs 0 <= --label-smoothing < 0.5")
    out = Path(cfg.out)
    model, tok, data = open_pair_run(cfg)
    rows, val, pad_id = data.rows, data.val, data.pad_id

    # the reference = the model as loaded; computed once, kept with the rows and on disk
    cache = out / "ref_logps.pt"
    keys = [(r["chosen"][0], r["rejected"][0]) for r in rows + val]
    cached = torch.load(cache, weights_only=False) if cache.exists() else None
    if cached is not None and cached.get("keys") == keys:
        for r, lp in zip(rows + val, cached["logps"]):
            r["ref_logps"] = lp
        print(f"reference log-probs: read from {cache}")
    else:
        cache_reference_logps(model, rows + val, pad_id, cfg.batch_size * 2, progress=progress)
        torch.save({"keys": keys, "logps": [r["ref_logps"] for r in rows + val]}, cache)

    params, settings = prepare(model, cfg.method, cfg.lora)
    n_train = sum(p.numel() for p in {id(p): p for p in params}.values())
    print(f"DPO ({cfg.loss}, beta {cfg.beta}, {cfg.method}): {n_train:,} trainable of {model.num_parameters():,} parameters")
    batches = pair_batches(rows, cfg.batch_size, pad_id, cfg.seed)
    tcfg = dataclasses.replace(cfg.train, seed=cfg.seed)

    def loss_fn(m, batch):
        return dpo_batch_loss(m, batch, cfg.beta, cfg.loss, cfg.label_smoothing, cfg.sft_weight)

    eval_fn = None
    if val:
        def eval_fn(m):
            return eval_pairs(m, val, pad_id, cfg.beta, cfg.loss, cfg.label_smoothing, cfg.batch_size)

    save_fn = lm_save_fn(tok, settings, base_model_id(getattr(model, "source_path", cfg.model or "")))
    result = train(model, loss_fn, batches, tcfg, out, params=params, eval_fn=eval_fn, save_fn=save_fn, tokenizer=tok,
                   config=dataclasses.replace(cfg, train=tcfg), progress=progress)
    print(f"done: {result['step']} steps, loss {result['loss']:.4f}; policy in {result['checkpoint']}")
    print(f"chat with it:  lmforge chat --model {out}")
    result["model"] = model
    return result
