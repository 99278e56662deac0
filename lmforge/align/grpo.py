"""RL with verifiable rewards: GRPO (group-relative policy optimization) on the one trainer.

For each of `prompts_per_step` task records the policy samples `group_size` completions with
the engine (one batched call); a reward function scores them; a completion's advantage is its
reward minus its group's mean (divided by the group's std unless `scale_rewards` is off), so no
value network is needed. The loss per completion token t is the clipped PPO surrogate with a
KL penalty to the reference model (the k3 estimator, always ≥ 0):

    ratio = π(t) / π_old(t);   surrogate = min(ratio·A, clip(ratio, 1−ε, 1+ε)·A)
    kl = π_ref(t)/π(t) − log(π_ref(t)/π(t)) − 1;   loss = −mean_seq mean_tok (surrogate − β·kl)

`π_old` is the policy that sampled the rollout (its log-probs are taken right after sampling).
With `updates_per_rollout` = 1 the ratio is 1 and clipping is idle; more updates per rollout
reuse it and the clip keeps them close. The reference is the model before RL: for LoRA the
same weights with the adapters switched off, for full finetuning a frozen copy.

`RolloutBatches` is the trainer's batch source: its `next_batch()` samples a fresh rollout when
its buffer is empty and hands it out in `micro_batches` pieces (the trainer's grad_accum), so
rollouts, rewards and advantages are computed in `__next__` and the one training loop does the
rest. With `tools`, each completion runs through the tool loop (`lmforge.tools.run_tool_loop`):
tool results are in the sequence but masked out of the loss.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from lmforge.model import softcap
from lmforge.errors import LmforgeError
from lmforge.train.trainer import BatchSource, to_device, unwrap


@dataclass
class GRPOSettings:
    group_size: int = 8  # completions sampled per prompt
    prompts_per_step: int = 4  # prompts per rollout
    micro_batches: int = 1  # the rollout is split in this many micro-batches (= train.grad_accum)
    updates_per_rollout: int = 1  # optimizer steps on one rollout (PPO-style reuse; clipping matters > 1)
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    beta: float = 0.04  # KL penalty to the reference (0 = none, no reference pass)
    clip_eps: float = 0.2
    scale_rewards: bool = True  # divide advantages by the group's std
    tools: list[str] = field(default_factory=list)  # rollouts through the tool loop (calculator, python, ...)
    max_tool_steps: int = 3


# -- log-probs ---------------------------------------------------------------------------------
def token_logps(model, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-prob of every target token [N, T-1] (fp32; 0 where mask[:, 1:] is 0)."""
    raw = unwrap(model)
    idx, m, dev = input_ids, mask, input_ids.device
    h = model(idx[:, :-1], hidden_only=True)
    sel = m[:, 1:].bool()
    logits = softcap(F.linear(h[sel], raw.lm_head.weight), raw.cfg.final_logit_softcap).float()
    lp = torch.gather(logits.log_softmax(-1), 1, idx[:, 1:][sel][:, None]).squeeze(1)
    out = torch.zeros(sel.shape, device=dev, dtype=torch.float32)
    return out.masked_scatter(sel, lp)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """(r − mean of its group) / (std of its group + eps) for rewards laid out group after group."""
    r = rewards.view(-1, group_size)
    adv = r - r.mean(1, keepdim=True)
    if scale:
        adv = adv / (r.std(1, keepdim=True, unbiased=False) + eps)
    return adv.reshape(-1)


def grpo_loss(model, batch: dict, beta: float = 0.04, clip_eps: float = 0.2) -> tuple[torch.Tensor, dict]:
    """The trainer's loss_fn for a rollout micro-batch (see the module docstring)."""
    logp = token_logps(model, batch["input_ids"], batch["mask"])
    m = batch["mask"][:, 1:].float()
    adv = batch["advantages"][:, None]
    old = batch["old_logps"]
    ratio = torch.exp((logp - old) * m)
    surr = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    per_tok = surr
    kl = torch.zeros_like(logp)
    if beta and batch.get("ref_logps") is not None:
        d = (batch["ref_logps"] - logp) * m
        kl = torch.exp(d) - d - 1
        per_tok = surr - beta * kl
    n = m.sum(1).clamp(min=1)
    loss = -((per_tok * m).sum(1) / n).mean()
    clipped = ((ratio - 1).abs() > clip_eps).float() * m
    metrics = {"tokens": batch["lengths"].sum(), "kl": ((kl * m).sum(1) / n).mean().detach(),
               "clip_frac": (clipped.sum() / m.sum().clamp(min=1)).detach()}
    for k in ("reward", "accuracy", "completion_len", "solved_groups", "flat_groups"):
        if k in batch:
            metrics[k] = batch[k]
    return loss, metrics


def make_grpo_loss(settings: GRPOSettings):
    def loss_fn(model, batch):
        return grpo_loss(model, batch, settings.beta, settings.clip_eps)

    return loss_fn


# -- rollouts ----------------------------------------------------------------------------------
def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    T = max(len(s) for s in seqs)
    x = torch.full((len(seqs), T), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return x


def sample_completions(model, tokenizer, records: list[dict], n: int, params, tools=None,
                       max_tool_steps: int = 3) -> list[dict]:
    """`n` completions per record, record after record: [{"text", "ids", "mask"}] where ids/mask
    are the whole sequence (prompt + completion) and mask marks the completion's own tokens."""
    from lmforge.align.rewards import prompt_messages
    from lmforge.chat import render_prompt
    from lmforge.engine import generate_text

    eos = tokenizer.eos_id
    if tools:
        return _sample_with_tools(model, tokenizer, records, n, params, tools, max_tool_steps)
    prompts = []
    for r in records:
        p = render_prompt(tokenizer, prompt_messages(r), tools=None)
        prompts += [p] * n
    out = []
    for p, res in zip(prompts, generate_text(model, tokenizer, prompts, params)):
        comp = list(res["ids"])
        if res["finish_reason"] == "stop" and eos is not None and not params.stop:
            comp.append(eos)  # the end-of-turn token is part of what the policy chose
        if not comp:
            comp = [eos if eos is not None else 0]
        out.append({"text": res["text"], "ids": p + comp, "mask": [0] * len(p) + [1] * len(comp)})
    return out


def _sample_with_tools(model, tokenizer, records, n, params, tool_names, max_steps):
    from lmforge.align.preference import render_reply
    from lmforge.align.rewards import prompt_messages
    from lmforge.chat import render_prompt
    from lmforge.engine import generate_text
    from lmforge.tools import get_tools, run_tool_loop
    from lmforge.tools.protocol import STOP_STRINGS

    tools = get_tools(tool_names)
    schemas = [t.schema() for t in tools]
    p = dataclasses.replace(params, stop=list(params.stop) + [s for s in STOP_STRINGS if s not in params.stop])
    out = []
    k = 0
    for r in records:
        prompt = prompt_messages(r)
        for _ in range(n):
            k += 1
            seed = None if params.seed is None else params.seed * 7919 + k

            def gen(msgs, _seed=[seed]):
                ids = render_prompt(tokenizer, msgs, tools=schemas)
                sp = dataclasses.replace(p, seed=_seed[0])
                if _seed[0] is not None:
                    _seed[0] += 1
                return generate_text(model, tokenizer, [ids], sp)[0]["text"]

            msgs = run_tool_loop(gen, list(prompt), tools, max_steps=max_steps)
            new = msgs[len(prompt):]
            if not new or new[-1].get("role") != "assistant":
                new = new + [{"role": "assistant", "content": ""}]
            if not (new[-1].get("content") or new[-1].get("tool_calls")):
                new[-1] = {"role": "assistant", "content": " "}
            ids, mask = render_reply(tokenizer, prompt, new, tools=schemas)
            ids, mask = ids[:model.cfg.max_seq_len], mask[:model.cfg.max_seq_len]
            out.append({"text": new[-1].get("content") or "", "ids": ids, "mask": mask, "messages": new})
    return out


class RolloutBatches(BatchSource):
    """The trainer's batch source for GRPO: sample, score, compute advantages, hand out pieces.

    Prompts are visited in a seeded shuffled order, epoch after epoch; the position, the rollout
    counter (which seeds sampling) and nothing else is the state, so resume continues exactly.
    """

    def __init__(self, model, tokenizer, records: list[dict], reward_fn: Callable, settings: GRPOSettings,
                 seed: int = 0, ref_model=None, use_adapters_as_reference: bool = False, log: Callable | None = None):
        if not records:
            raise LmforgeError("no RL prompts")
        if settings.group_size < 2:
            raise LmforgeError("group_size must be at least 2 (advantages compare completions of one prompt)")
        total = settings.prompts_per_step * settings.group_size
        if total % settings.micro_batches:
            raise LmforgeError(f"prompts_per_step x group_size ({total}) must divide into micro_batches ({settings.micro_batches})")
        self.model, self.tok, self.records, self.reward_fn, self.s = model, tokenizer, records, reward_fn, settings
        self.seed, self.ref_model, self.lora_ref = seed, ref_model, use_adapters_as_reference
        self.log = log
        self.epoch, self.index, self.rollouts = 0, 0, 0
        self._order = self._make_order()
        self._buffer: list[dict] = []
        self.last_rollout: dict = {}

    def _make_order(self) -> list[int]:
        order = list(range(len(self.records)))
        random.Random(self.seed * 1000003 + self.epoch).shuffle(order)
        return order

    def _pick(self) -> list[dict]:
        picked = []
        for _ in range(self.s.prompts_per_step):
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._make_order()
            picked.append(self.records[self._order[self.index]])
            self.index += 1
        return picked

    @torch.no_grad()
    def rollout(self) -> dict:
        from lmforge.align.rewards import compute_rewards
        from lmforge.engine import SamplingParams

        s = self.s
        raw = unwrap(self.model)
        was = raw.training
        raw.eval()
        records = self._pick()
        params = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                seed=self.seed * 100003 + self.rollouts)
        self.rollouts += 1
        samples = sample_completions(raw, self.tok, records, s.group_size, params, s.tools or None, s.max_tool_steps)
        recs = [r for r in records for _ in range(s.group_size)]
        rewards = torch.tensor(compute_rewards(self.reward_fn, recs, [x["text"] for x in samples]), dtype=torch.float32)
        adv = group_advantages(rewards, s.group_size, s.scale_rewards)
        pad = self.tok.pad_id if self.tok.pad_id is not None else 0
        ids, mask = to_device((_pad([x["ids"] for x in samples], pad), _pad([x["mask"] for x in samples], 0)),
                              raw.lm_head.weight.device)
        old = token_logps(raw, ids, mask)
        ref = None
        if s.beta:
            if self.lora_ref:
                from lmforge.finetune.lora import set_adapters_enabled

                set_adapters_enabled(raw, False)
                try:
                    ref = token_logps(raw, ids, mask)
                finally:
                    set_adapters_enabled(raw, True)
            elif self.ref_model is not None:
                ref = token_logps(self.ref_model, ids, mask)
            else:
                raise LmforgeError("GRPO with beta > 0 needs a reference model")
        raw.train(was)
        g = rewards.view(-1, s.group_size)
        stats = {"reward": float(rewards.mean()), "accuracy": float((rewards >= 1.0).float().mean()),
                 "completion_len": float(mask.sum(1).float().mean()),
                 "solved_groups": float((g.max(1).values >= 1.0).float().mean()),
                 "flat_groups": float((g.std(1, unbiased=False) == 0).float().mean())}
        self.last_rollout = {**stats, "sample": samples[0]["text"], "prompt": recs[0].get("prompt")}
        return {"input_ids": ids, "mask": mask, "advantages": adv, "old_logps": old, "ref_logps": ref,
                "lengths": torch.tensor([len(x["ids"]) for x in samples]), **stats}

    def next_batch(self) -> dict:
        if not self._buffer:
            full = self.rollout()
            n = full["input_ids"].shape[0]
            per = n // self.s.micro_batches
            pieces = []
            for i in range(self.s.micro_batches):
                sl = slice(i * per, (i + 1) * per)
                piece = {k: (v[sl] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v) for k, v in full.items()}
                # trim right padding the piece does not need
                T = int(piece["lengths"].max())
                for k in ("input_ids", "mask"):
                    piece[k] = piece[k][:, :T]
                for k in ("old_logps", "ref_logps"):
                    if piece.get(k) is not None:
                        piece[k] = piece[k][:, :T - 1]
                pieces.append(piece)
            self._buffer = pieces * self.s.updates_per_rollout
        return self._buffer.pop(0)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "rollouts": self.rollouts}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index, self.rollouts = int(state["epoch"]), int(state["index"]), int(state["rollouts"])
        self._order = self._make_order()
        self._buffer = []


@torch.no_grad()
def evaluate_policy(model, tokenizer, records: list[dict], reward_fn: Callable, max_new_tokens: int = 32,
                    batch_size: int = 32, success: float = 1.0) -> dict:
    """Greedy answers to `records`: mean reward and the share with reward ≥ `success`."""
    from lmforge.align.rewards import compute_rewards
    from lmforge.engine import SamplingParams

    raw = unwrap(model)
    was = raw.training
    raw.eval()
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    texts = []
    for i in range(0, len(records), batch_size):
        texts += [x["text"] for x in sample_completions(raw, tokenizer, records[i:i + batch_size], 1, params)]
    raw.train(was)
    rewards = compute_rewards(reward_fn, records, texts)
    return {"eval_reward": sum(rewards) / max(len(rewards), 1),
            "eval_accuracy": sum(r >= success for r in rewards) / max(len(rewards), 1), "_texts": texts}


# -- the command --------------------------------------------------------------------------------
from typing import Literal  # noqa: E402

from lmforge.align.common import AlignTrainConfig, LoraArgs, TaskArgs  # noqa: E402


@dataclass
class RLTrainConfig(AlignTrainConfig):
    lr: float = 1e-5
    warmup_steps: int = 0
    schedule: str = "constant"
    max_steps: int = 100
    log_every: int = 1
    eval_every: int = 10


@dataclass
class RLConfig:
    model: str | None = None  # the policy (ideally SFT'd): GGUF, HF folder, run folder; default model when unset
    data: str = ""  # task JSONL: {"prompt"|"messages", + what the reward reads, e.g. "answer" or "tests"}
    val_data: str = ""  # held-out task records (greedy accuracy every train.eval_every steps)
    task: TaskArgs = field(default_factory=TaskArgs)  # or a generated task (--task.name arithmetic)
    out: str = "runs/rl"
    method: Literal["full", "lora"] = "lora"
    reward: str = "exact"  # exact | unit_tests | format | rm:PATH | package.module:function, joined by +
    success: float = 1.0  # a held-out answer counts as solved when its reward is at least this
    eval_max_new_tokens: int = 0  # 0 = grpo.max_new_tokens
    eval_batch_size: int = 32
    seed: int = 0
    threads: int = 0
    grpo: GRPOSettings = field(default_factory=GRPOSettings)
    lora: LoraArgs = field(default_factory=LoraArgs)
    train: RLTrainConfig = field(default_factory=RLTrainConfig)


def load_task_records(cfg) -> tuple[list[dict], list[dict]]:
    from lmforge.align.common import read_jsonl

    if cfg.task.name:
        from lmforge.align.tasks import arithmetic_problems

        if cfg.data:
            raise LmforgeError("give --data or --task.name, not both")
        t = cfg.task
        train = arithmetic_problems(t.n, cfg.seed, t.digits, t.ops, "train", digits_b=t.digits_b)
        val = (read_jsonl(cfg.val_data) if cfg.val_data
               else arithmetic_problems(t.n_eval, cfg.seed + 1, t.digits, t.ops, "heldout", digits_b=t.digits_b))
        return train, val
    if not cfg.data:
        raise LmforgeError("--data is required (task JSONL), or --task.name arithmetic")
    return read_jsonl(cfg.data), (read_jsonl(cfg.val_data) if cfg.val_data else [])


def run_rl(cfg: RLConfig, progress: bool = True) -> dict:
    """GRPO with the one trainer; held-out accuracy before, during and after; rl_eval.json."""
    import copy
    import json
    import time
    from pathlib import Path

    from lmforge.align.common import lm_save_fn, load_policy, prepare
    from lmforge.align.rewards import get_reward
    from lmforge.finetune.sft import base_model_id
    from lmforge.train import train

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    s = cfg.grpo
    model, tok = load_policy(cfg.model)
    records, val = load_task_records(cfg)
    reward_fn = get_reward(cfg.reward)
    eval_tokens = cfg.eval_max_new_tokens or s.max_new_tokens
    params, settings = prepare(model, cfg.method, cfg.lora)
    ref_model = None
    if s.beta and settings is None:
        ref_model = copy.deepcopy(model).eval()
        for p in ref_model.parameters():
            p.requires_grad_(False)
    batches = RolloutBatches(model, tok, records, reward_fn, s, seed=cfg.seed, ref_model=ref_model,
                             use_adapters_as_reference=settings is not None)
    tcfg = dataclasses.replace(cfg.train, seed=cfg.seed, grad_accum=s.micro_batches)
    out.mkdir(parents=True, exist_ok=True)

    def run_eval(m) -> dict:
        r = evaluate_policy(m, tok, val, reward_fn, eval_tokens, cfg.eval_batch_size, cfg.success)
        r.pop("_texts")
        return r

    before = None
    fresh = not (out / "latest").exists()
    if val and fresh:
        t0 = time.time()
        before = run_eval(model)
        print(f"held-out before RL: accuracy {before['eval_accuracy']:.3f}, reward {before['eval_reward']:.3f} "
              f"({len(val)} items, {time.time() - t0:.0f}s)")
        (out / "metrics.jsonl").write_text(json.dumps({"step": 0, **before}) + "\n")
    n_train = sum(p.numel() for p in {id(p): p for p in params}.values())
    print(f"GRPO ({cfg.method}): {n_train:,} trainable parameters; {s.prompts_per_step} prompts x {s.group_size} samples "
          f"per rollout; reward {cfg.reward}")
    save_fn = lm_save_fn(tok, settings, base_model_id(getattr(model, "source_path", cfg.model or "")))
    result = train(model, make_grpo_loss(s), batches, tcfg, out, params=params,
                   eval_fn=run_eval if val else None, save_fn=save_fn, tokenizer=tok,
                   config=dataclasses.replace(cfg, train=tcfg), progress=progress)
    summary = {"steps": result["step"], "stopped": result["stopped"], "heldout_items": len(val)}
    if val:
        after = {k: v for k, v in (result["metrics"] or {}).items() if k.startswith("eval_")} or run_eval(model)
        if before is None:
            from lmforge.train import read_metrics

            first = [r for r in read_metrics(out / "metrics.jsonl") if r.get("step") == 0]
            before = first[0] if first else None
        summary.update(before=before, after=after)
        if before:
            print(f"held-out accuracy: {before['eval_accuracy']:.3f} -> {after['eval_accuracy']:.3f}")
    (out / "rl_eval.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"done: {result['step']} steps; policy in {result['checkpoint']}")
    result["summary"] = summary
    result["model"] = model
    return result
