"""Reward model: the transformer with a scalar head, trained on comparisons (Bradley–Terry).

    rm = reward_model_from_lm(model, pad_id=tok.pad_id)        # backbone from a causal LM
    scores = rm(input_ids)                                     # [B]: one number per sequence
    loss, metrics = bt_loss(rm, collate_pairs(rows, pad_id))   # -log sigmoid(r_chosen - r_rejected)
    save_reward_model(rm, tok, "out/")                         # an HF folder
    rm, tok = load_reward_model("out/")                        # ours; transformers'
    # AutoModelForSequenceClassification.from_pretrained("out/") gives the same scores

Layout as `transformers`' LlamaForSequenceClassification: the backbone's keys (`model.*`) and a
bias-free `score.weight` [1, d_model]; the score is the head applied to the final-norm hidden
state of the rightmost token that is not `pad_token_id` (as transformers picks it, so right or
left padding both work and the scores are equal). The LM head is dropped.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.model import Config, Transformer, rope_inv_freq


class RewardModel(Transformer):
    """A Transformer whose output is one score per sequence instead of next-token logits."""

    def __init__(self, cfg: Config, pad_id: int | None = None):
        super().__init__(cfg)
        del self.lm_head  # HF's sequence classifier has no LM head; tied weights stay in embed_tokens
        self.score = nn.Linear(cfg.d_model, 1, bias=False)
        self.pad_id = pad_id if pad_id is not None else cfg.pad_token_id

    def new_cache(self, *a, **kw):  # pragma: no cover - a reward model never decodes
        raise LmforgeError("a reward model scores whole sequences; it has no generation cache")

    def last_token_index(self, idx: torch.Tensor) -> torch.Tensor:
        """Rightmost position that is not padding (transformers' rule); the last one without a pad id."""
        T = idx.shape[1]
        if self.pad_id is None:
            return torch.full((idx.shape[0],), T - 1, dtype=torch.long, device=idx.device)
        keep = (idx != self.pad_id).long()
        return (torch.arange(T, device=idx.device)[None] * keep).argmax(-1)

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None, positions=None, **_) -> torch.Tensor:
        """Scores [B] (fp32) for token ids [B, T]."""
        h = super().forward(idx, positions=positions, attention_mask=attention_mask, hidden_only=True)
        last = self.last_token_index(idx)
        pooled = h[torch.arange(idx.shape[0], device=idx.device), last]
        return self.score(pooled).squeeze(-1).float()


def reward_model_from_lm(model: Transformer, pad_id: int | None = None, seed: int = 0) -> RewardModel:
    """A RewardModel sharing nothing with `model`: its backbone weights copied, a fresh score head."""
    cfg = model.cfg
    with torch.device("meta"):
        rm = RewardModel(cfg, pad_id)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("lm_head")}
    g = torch.Generator().manual_seed(seed)
    # small init (std 1/sqrt(d)/10): scores start near 0 so the first comparisons are not confident
    state["score.weight"] = torch.randn(1, cfg.d_model, generator=g) / (cfg.d_model ** 0.5) / 10
    state = {k: v.to(model.model.embed_tokens.weight.dtype) for k, v in state.items()}
    rm.load_state_dict(state, assign=True, strict=True)
    rm.inv_freq = rope_inv_freq(cfg).to(model.model.embed_tokens.weight.device)
    return rm.to(model.model.embed_tokens.weight.device)


def pair_scores(rm: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen scores [B], rejected scores [B]) for a `collate_pairs` batch."""
    from lmforge.train.trainer import unwrap

    dev = unwrap(rm).model.embed_tokens.weight.device
    s = rm(batch["input_ids"].to(dev))
    return s.chunk(2)


def bt_loss(rm: nn.Module, batch: dict, margin_reg: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Bradley–Terry: -log σ(r_c − r_r), mean over pairs; `margin_reg` adds λ·(r_c + r_r)² to
    keep scores centred (they are defined only up to a constant). Metrics: accuracy, margin."""
    rc, rr = pair_scores(rm, batch)
    loss = -F.logsigmoid(rc - rr).mean()
    if margin_reg:
        loss = loss + margin_reg * ((rc + rr) ** 2).mean()
    return loss, {"tokens": int(batch["lengths"].sum()), "accuracy": (rc > rr).float().mean().detach(),
                  "margin": (rc - rr).mean().detach(), "score_chosen": rc.mean().detach(), "score_rejected": rr.mean().detach()}


@torch.no_grad()
def pairwise_accuracy(rm: nn.Module, rows: list[dict], pad_id: int, batch_size: int = 16) -> dict:
    """Share of pairs whose chosen reply scores higher; mean margin; mean loss."""
    from lmforge.align.preference import collate_pairs

    correct, margin, loss, n = 0, 0.0, 0.0, 0
    for i in range(0, len(rows), batch_size):
        b = collate_pairs(rows[i:i + batch_size], pad_id)
        rc, rr = pair_scores(rm, b)
        correct += int((rc > rr).sum())
        margin += float((rc - rr).sum())
        loss += float(-F.logsigmoid(rc - rr).sum())
        n += len(rc)
    return {"accuracy": correct / max(n, 1), "margin": margin / max(n, 1), "loss": loss / max(n, 1), "pairs": n}


# -- files -------------------------------------------------------------------------------------
def save_reward_model(rm: RewardModel, tokenizer, out_dir: str | Path) -> Path:
    """An HF folder: config.json (LlamaForSequenceClassification, num_labels 1), model.safetensors
    with `model.*` + `score.weight`, tokenizer files."""
    from safetensors.torch import save_file

    from lmforge.loading.hf import config_to_hf

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if rm.cfg.is_moe:
        raise LmforgeError("reward models on MoE backbones are not supported")
    state = {k: v.detach().contiguous().cpu() for k, v in rm.state_dict().items()}
    hf = config_to_hf(rm.cfg)
    hf.update(architectures=["LlamaForSequenceClassification"], num_labels=1, id2label={"0": "LABEL_0"},
              label2id={"LABEL_0": 0}, problem_type="regression", pad_token_id=rm.pad_id)
    hf["tie_word_embeddings"] = False  # there is no LM head to tie
    if tokenizer is not None:
        for key, tid in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id)):
            if tid is not None:
                hf[key] = tid
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    if tokenizer is not None:
        tokenizer.save(out)
    return out


def is_reward_model_dir(path: str | Path) -> bool:
    p = Path(path) / "config.json"
    if not p.exists():
        return False
    try:
        return "ForSequenceClassification" in " ".join(json.loads(p.read_text()).get("architectures") or [])
    except json.JSONDecodeError:
        return False


def load_reward_model(path: str | Path, dtype="fp32", device="cpu"):
    """(RewardModel, tokenizer or None) from a folder `save_reward_model` wrote (or a run folder /
    checkpoint of `lmforge rm`), or a transformers LlamaForSequenceClassification folder."""
    from lmforge.loading.hf import config_from_hf, iter_hf_tensors
    from lmforge.loading.load import parse_dtype, resolve_run_folder
    from lmforge.tokenizer import Tokenizer

    folder = resolve_run_folder(Path(path).expanduser())
    if not is_reward_model_dir(folder):
        raise LmforgeError(f"{folder} is not a reward model (config.json must name a ...ForSequenceClassification)")
    hf = json.loads((folder / "config.json").read_text())
    if int(hf.get("num_labels", len(hf.get("id2label") or {0: 0}))) != 1:
        raise LmforgeError(f"{folder}: a reward model has num_labels 1, this one has {hf.get('num_labels')}")
    cfg = config_from_hf(hf, str(folder / "config.json"))
    cfg.tie_embeddings = False
    dt = parse_dtype(dtype)
    state = {k: (v.to(dt) if v.is_floating_point() else v) for k, v in iter_hf_tensors(folder)}
    with torch.device("meta"):
        rm = RewardModel(cfg, hf.get("pad_token_id"))
    missing = set(rm.state_dict()) - set(state)
    if missing:
        raise LmforgeError(f"{folder}: missing weights {sorted(missing)[:3]}")
    rm.load_state_dict({k: v for k, v in state.items() if k in rm.state_dict()}, assign=True, strict=True)
    rm.inv_freq = rope_inv_freq(cfg)
    tok = Tokenizer.from_dir(folder) if (folder / "tokenizer.json").exists() else None
    rm.source_path = str(folder)
    return rm.to(device).eval(), tok


@torch.no_grad()
def score_conversations(rm: RewardModel, tokenizer, conversations: list[list[dict]], batch_size: int = 8,
                        tools=None) -> list[float]:
    """Scores for whole conversations (each ending with the assistant's reply)."""
    from lmforge.chat import render_conversation

    pad = rm.pad_id if rm.pad_id is not None else 0
    dev = rm.model.embed_tokens.weight.device
    out: list[float] = []
    for i in range(0, len(conversations), batch_size):
        seqs = [render_conversation(tokenizer, c, tools=tools)[0] for c in conversations[i:i + batch_size]]
        out += score_ids(rm, seqs, pad, dev)
    return out


@torch.no_grad()
def score_ids(rm: RewardModel, seqs: list[list[int]], pad: int | None = None, device=None) -> list[float]:
    pad = (rm.pad_id if rm.pad_id is not None else 0) if pad is None else pad
    device = device or rm.model.embed_tokens.weight.device
    T = max(len(s) for s in seqs)
    x = torch.full((len(seqs), T), pad, dtype=torch.long, device=device)
    for j, s in enumerate(seqs):
        x[j, :len(s)] = torch.tensor(s, device=device)
    return [float(v) for v in rm(x)]


# -- the command --------------------------------------------------------------------------------
from dataclasses import dataclass, field  # noqa: E402
from typing import Literal  # noqa: E402

from lmforge.align.common import AlignTrainConfig, LoraArgs, TaskArgs  # noqa: E402


@dataclass
class RMTrainConfig(AlignTrainConfig):
    lr: float = 1e-4


@dataclass
class RMConfig:
    model: str | None = None  # backbone: GGUF, HF folder, run folder; default model when unset
    data: str = ""  # preference JSONL (prompt|messages, chosen, rejected); or --task.name arithmetic
    val_data: str = ""  # held-out pairs (default: --val-fraction of --data, or the task's held-out split)
    val_fraction: float = 0.1
    task: TaskArgs = field(default_factory=TaskArgs)
    out: str = "runs/rm"
    method: Literal["full", "lora"] = "lora"  # LoRA trains adapters + the score head
    on_error: Literal["fail", "skip"] = "fail"
    max_seq_len: int = 512
    batch_size: int = 8  # pairs per micro-batch
    margin_reg: float = 0.0  # λ·(r_c + r_r)²: keeps scores centred
    seed: int = 0
    threads: int = 0
    lora: LoraArgs = field(default_factory=LoraArgs)
    train: RMTrainConfig = field(default_factory=RMTrainConfig)


def _merged_copy(rm: RewardModel) -> RewardModel:
    import copy

    from lmforge.finetune.lora import lora_layers, merge_lora

    if not lora_layers(rm):
        return rm
    return merge_lora(copy.deepcopy(rm))


def load_preference_rows(cfg, tok, max_len: int) -> tuple[list[dict], list[dict], object]:
    """(train rows, held-out rows, report) from --data/--val-data or a generated task."""
    from lmforge.align.common import write_jsonl
    from lmforge.align.preference import load_pairs, tokenize_pairs
    from lmforge.finetune.datasets import split_holdout

    out = Path(cfg.out)
    data, val_data = cfg.data, cfg.val_data
    if cfg.task.name:
        from lmforge.align.tasks import arithmetic_preferences

        if data:
            raise LmforgeError("give --data or --task.name, not both")
        t = cfg.task
        data = str(write_jsonl(out / "data" / "train_pairs.jsonl", arithmetic_preferences(t.n, cfg.seed, t.digits, t.ops, "train", t.digits_b)))
        if not val_data:
            val_data = str(write_jsonl(out / "data" / "heldout_pairs.jsonl",
                                       arithmetic_preferences(t.n_eval, cfg.seed + 1, t.digits, t.ops, "heldout", t.digits_b)))
    if not data:
        raise LmforgeError("--data is required (preference JSONL), or --task.name arithmetic")
    pairs, report = load_pairs(data, cfg.on_error)
    rows, report = tokenize_pairs(tok, pairs, max_len, cfg.on_error, report)
    val: list[dict] = []
    if val_data:
        vpairs, vrep = load_pairs(val_data, cfg.on_error)
        val, _ = tokenize_pairs(tok, vpairs, max_len, cfg.on_error, vrep)
    elif cfg.val_fraction > 0:
        rows, val = split_holdout(rows, cfg.val_fraction, cfg.seed)
    return rows, val, report


def run_rm(cfg: RMConfig, progress: bool = True) -> dict:
    """Train a reward model on comparisons with the one trainer; save it as an HF folder."""
    import dataclasses

    from lmforge.align.common import load_policy, prepare
    from lmforge.align.preference import collate_pairs
    from lmforge.train import ListBatches, train

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    lm, tok = load_policy(cfg.model)
    max_len = min(cfg.max_seq_len, lm.cfg.max_seq_len)
    pad_id = tok.pad_id if tok.pad_id is not None else 0
    rows, val, report = load_preference_rows(cfg, tok, max_len)
    print(f"data: {report.summary()}; {len(val)} held-out pairs")
    for line in report.lines():
        print(f"data: {line}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_report.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n")

    rm = reward_model_from_lm(lm, pad_id=pad_id, seed=cfg.seed)
    del lm
    params, _ = prepare(rm, cfg.method, cfg.lora, extra_trainable=[rm.score.weight])
    n_train = sum(p.numel() for p in params)
    print(f"reward model ({cfg.method}): {n_train:,} trainable of {rm.num_parameters():,} parameters")

    batches = ListBatches(rows, cfg.batch_size, collate=lambda xs: collate_pairs(xs, pad_id), seed=cfg.seed)
    tcfg = dataclasses.replace(cfg.train, seed=cfg.seed)

    def loss_fn(model, batch):
        return bt_loss(model, batch, cfg.margin_reg)

    eval_fn = None
    if val:
        def eval_fn(m):
            r = pairwise_accuracy(m, val, pad_id, cfg.batch_size)
            return {"val_accuracy": r["accuracy"], "val_loss": r["loss"], "val_margin": r["margin"]}

    def save_fn(m, d):
        save_reward_model(_merged_copy(m), tok, d)

    result = train(rm, loss_fn, batches, tcfg, out, params=params, eval_fn=eval_fn, save_fn=save_fn, tokenizer=tok,
                   config=dataclasses.replace(cfg, train=tcfg), progress=progress)
    final = {}
    if val:
        rm.eval()
        with torch.no_grad():
            final = pairwise_accuracy(rm, val, pad_id, cfg.batch_size)
        (out / "rm_eval.json").write_text(json.dumps({"heldout": final, "steps": result["step"]}, indent=1) + "\n")
        print(f"held-out pairwise accuracy {final['accuracy']:.3f} on {final['pairs']} pairs (margin {final['margin']:.3f})")
    print(f"done: reward model in {result['checkpoint']} (score with: lmforge rm score --model {out} --data FILE)")
    result["heldout"] = final
    result["model"] = rm
    return result


@dataclass
class RMScoreConfig:
    model: str = ""  # a reward model folder or `lmforge rm train` run folder
    data: str = ""  # JSONL: {prompt|messages, chosen, rejected} or {prompt|messages, completion}
    out: str | None = None  # JSONL with scores added (default: stdout)
    prompt: str | None = None  # or score one reply: --prompt TEXT --completion TEXT
    completion: str | None = None
    batch_size: int = 8
    threads: int = 0


def run_score(cfg: RMScoreConfig) -> list:
    """Score replies with a trained reward model; pairs get both scores and which one wins."""
    import sys

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not cfg.model:
        raise LmforgeError("--model is required (a reward model folder)")
    rm, tok = load_reward_model(cfg.model)
    if tok is None:
        raise LmforgeError(f"{cfg.model} has no tokenizer files")
    if cfg.prompt is not None:
        if cfg.completion is None:
            raise LmforgeError("--prompt needs --completion")
        s = score_conversations(rm, tok, [[{"role": "user", "content": cfg.prompt}, {"role": "assistant", "content": cfg.completion}]])[0]
        print(f"{s:.6f}")
        return [s]
    from lmforge.align.common import read_jsonl
    from lmforge.align.rewards import prompt_messages

    if not cfg.data:
        raise LmforgeError("--data (JSONL) or --prompt/--completion is required")
    rows = read_jsonl(cfg.data)
    out_rows = []
    for r in rows:
        msgs = prompt_messages(r)
        if "chosen" in r and "rejected" in r:
            sc = score_conversations(rm, tok, [msgs + [{"role": "assistant", "content": r["chosen"]}],
                                               msgs + [{"role": "assistant", "content": r["rejected"]}]])
            out_rows.append({**r, "score_chosen": sc[0], "score_rejected": sc[1], "correct": sc[0] > sc[1]})
        elif "completion" in r:
            out_rows.append({**r, "score": score_conversations(rm, tok, [msgs + [{"role": "assistant", "content": r["completion"]}]])[0]})
        elif "messages" in r and r["messages"][-1].get("role") == "assistant":
            out_rows.append({**r, "score": score_conversations(rm, tok, [r["messages"]])[0]})
        else:
            raise LmforgeError("each record needs chosen/rejected, a completion, or messages ending with the assistant")
    f = open(cfg.out, "w", encoding="utf-8") if cfg.out else sys.stdout
    try:
        for r in out_rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    finally:
        if cfg.out:
            f.close()
    pairs = [r for r in out_rows if "correct" in r]
    if pairs:
        print(f"pairwise accuracy {sum(r['correct'] for r in pairs) / len(pairs):.3f} on {len(pairs)} pairs", file=sys.stderr)
    return out_rows
