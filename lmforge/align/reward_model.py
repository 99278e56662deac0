"""Reward model: the transformer with a scalar head, trained on comparisons (Bradley–Terry).

    rm = reward_model_from_lm(model, pad_id=tok.pad_id)        # backbone from a causal LM
    scores = rm(input_ids)                                     # [B]: one number per sequence
    loss, metrics = bt_loss(rm, collate_pairs(rows, pad_id))   # -log sigmoid(r_chosen - r_rejected)
    save_reward_model(rm, tok, "out/")                         # an HF folder
    rm, tok = load_reward_model("out/")                        # ours; transformers'
    # AutoModelForSequenceClassification.from_pretrained("out/") gives the same scores

Layout as `transformers`' LlamaForSequenceClassification: the backbone's keys (`model.*`) and a
bias-free `score.weight` [1, d_model]; the score is the head applied to the final-norm hidden
state of the last real token. With an `attention_mask` (1 = real token; lmforge's own batches
always pass one) that is the rightmost position the mask marks, and left padding is hidden from
attention, so a sequence scores the same padded on either side. Without a mask it is transformers'
rule, the rightmost token that is not `pad_token_id`; beware that for chat models pad is often
the end-of-turn token, which also stands inside every conversation. The LM head is dropped.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.train.batches import to_device
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

    def last_token_index(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Index of the last real token per row: the rightmost 1 of `attention_mask`, else the
        rightmost token that is not the pad id (transformers' rule), else the last position."""
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)[None]
        if attention_mask is not None:
            return (pos * attention_mask.to(idx.device).long()).argmax(-1)
        if self.pad_id is None:
            return torch.full((idx.shape[0],), T - 1, dtype=torch.long, device=idx.device)
        return (pos * (idx != self.pad_id).long()).argmax(-1)

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None, positions=None, **_) -> torch.Tensor:
        """Scores [B] (fp32) for token ids [B, T]; `attention_mask` [B, T] marks real tokens."""
        mask = None
        if attention_mask is not None:
            am = attention_mask.to(idx.device).long()
            # right padding needs no mask (causal attention never looks ahead); padding before a real
            # token (left padding) is hidden, and positions count real tokens only
            if bool((am[:, 1:] > am[:, :-1]).any()):
                mask = am
                if positions is None:
                    positions = (am.cumsum(-1) - 1).clamp(min=0)
        h = super().forward(idx, positions=positions, attention_mask=mask, hidden_only=True)
        last = self.last_token_index(idx, attention_mask)
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


def length_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """[B, T] attention mask (1 = real token) for right-padded rows of these lengths."""
    return (torch.arange(T, device=lengths.device)[None] < lengths[:, None]).long()


def pair_scores(rm: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen scores [B], rejected scores [B]) for a `collate_pairs` batch, each read at its
    row's last real token (from `lengths`, never from the pad id)."""
    from lmforge.train.trainer import unwrap

    idx = batch["input_ids"]
    s = rm(idx, attention_mask=length_mask(batch["lengths"], idx.shape[1]))
    return s.chunk(2)


def bt_loss(rm: nn.Module, batch: dict, margin_reg: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Bradley–Terry: -log σ(r_c − r_r), mean over pairs; `margin_reg` adds λ·(r_c + r_r)² to
    keep scores centred (they are defined only up to a constant). Metrics: accuracy, margin."""
    rc, rr = pair_scores(rm, batch)
    loss = -F.logsigmoid(rc - rr).mean()
    if margin_reg:
        loss = loss + margin_reg * ((rc + rr) ** 2).mean()
    return loss, {"tokens": batch["lengths"].sum(), "accuracy": (rc > rr).float().mean().detach(),
                  "margin": (rc - rr).mean().detach(), "score_chosen": rc.mean().detach(), "score_rejected": rr.mean().detach()}


@torch.no_grad()
def pairwise_accuracy(rm: nn.Module, rows: list[dict], pad_id: int, batch_size: int = 16,
                      groups: list[str] | None = None) -> dict:
    """Share of pairs whose chosen reply scores higher; mean margin; mean loss. With `groups` (a
    label per row, e.g. the kind of wrong answer) also `by_group`: {label: {accuracy, pairs}}."""
    from lmforge.align.preference import collate_pairs

    was = rm.training
    rm.eval()
    wins: list[bool] = []
    margin, loss = 0.0, 0.0
    for i in range(0, len(rows), batch_size):
        rc, rr = pair_scores(rm, to_device(collate_pairs(rows[i:i + batch_size], pad_id), rm.model.embed_tokens.weight.device))
        wins += (rc > rr).tolist()
        margin += float((rc - rr).sum())
        loss += float(-F.logsigmoid(rc - rr).sum())
    rm.train(was)
    n = max(len(wins), 1)
    out = {"accuracy": sum(wins) / n, "margin": margin / n, "loss": loss / n, "pairs": len(wins)}
    if groups is not None:
        by: dict[str, list[bool]] = {}
        for g, w in zip(groups, wins):
            by.setdefault(g, []).append(w)
        out["by_group"] = {g: {"accuracy": sum(v) / len(v), "pairs": len(v)} for g, v in sorted(by.items())}
    return out


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
def score_ids(rm: RewardModel, seqs: list[list[int]], pad: int | None = None, device=None,
              padding_side: str = "right") -> list[float]:
    """Scores of token-id sequences, batched with padding on `padding_side` and a mask, so each is
    read at its own last token (the same score either side, and alone)."""
    pad = (rm.pad_id if rm.pad_id is not None else 0) if pad is None else pad
    device = device or rm.model.embed_tokens.weight.device
    T = max(len(s) for s in seqs)
    x = torch.full((len(seqs), T), pad, dtype=torch.long, device=device)
    m = torch.zeros((len(seqs), T), dtype=torch.long, device=device)
    for j, s in enumerate(seqs):
        at = slice(T - len(s), T) if padding_side == "left" else slice(0, len(s))
        x[j, at] = torch.tensor(s, device=device)
        m[j, at] = 1
    return [float(v) for v in rm(x, attention_mask=m)]


# -- the command --------------------------------------------------------------------------------
from dataclasses import dataclass, field  # noqa: E402
from typing import Literal  # noqa: E402

from lmforge.align.common import AlignTrainConfig, LoraArgs, TaskArgs  # noqa: E402
from lmforge.align.pairs import load_preference_rows  # noqa: E402,F401  (moved; old imports keep working)


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
    perturb: str = ""  # generated task: kinds of wrong answer, comma-separated (ones,tens,swap,carry; default all)
    pairs_per_problem: int = 1  # generated task: pairs per problem, each with another kind of wrong answer
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


def run_rm(cfg: RMConfig, progress: bool = True) -> dict:
    """Train a reward model on comparisons with the one trainer; save it as an HF folder."""
    import dataclasses

    from lmforge.align.common import prepare
    from lmforge.align.pairs import open_pair_run, pair_batches, row_groups
    from lmforge.train import train

    out = Path(cfg.out)
    lm, tok, data = open_pair_run(cfg)
    pad_id, val = data.pad_id, data.val
    rm = reward_model_from_lm(lm, pad_id=pad_id, seed=cfg.seed)
    del lm
    params, _ = prepare(rm, cfg.method, cfg.lora, extra_trainable=[rm.score.weight])
    n_train = sum(p.numel() for p in params)
    print(f"reward model ({cfg.method}): {n_train:,} trainable of {rm.num_parameters():,} parameters")

    tcfg = dataclasses.replace(cfg.train, seed=cfg.seed)

    def loss_fn(model, batch):
        return bt_loss(model, batch, cfg.margin_reg)

    eval_fn = None
    if val and tcfg.eval_every > 0:  # with eval_every 0 the held-out pairs are scored once, below
        def eval_fn(m):
            r = pairwise_accuracy(m, val, pad_id, cfg.batch_size * 2)
            return {"val_accuracy": r["accuracy"], "val_loss": r["loss"], "val_margin": r["margin"]}

    def save_fn(m, d):
        save_reward_model(_merged_copy(m), tok, d)

    result = train(rm, loss_fn, pair_batches(data.rows, cfg.batch_size, pad_id, cfg.seed), tcfg, out, params=params,
                   eval_fn=eval_fn, save_fn=save_fn, tokenizer=tok, config=dataclasses.replace(cfg, train=tcfg),
                   progress=progress)
    final = {}
    if val:
        # the final numbers at the model's own precision (no autocast), per kind of wrong answer when known
        final = pairwise_accuracy(rm, val, pad_id, cfg.batch_size * 2, groups=row_groups(val))
        (out / "rm_eval.json").write_text(json.dumps({"heldout": final, "steps": result["step"]}, indent=1) + "\n")
        per = "; ".join(f"{g} {v['accuracy']:.3f}" for g, v in final.get("by_group", {}).items() if g)
        print(f"held-out pairwise accuracy {final['accuracy']:.3f} on {final['pairs']} pairs (margin {final['margin']:.3f})"
              + (f"; by kind: {per}" if per else ""))
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
