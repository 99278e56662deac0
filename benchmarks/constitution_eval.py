"""Does one round of the constitutional loop make answers better by a fixed judge? Before/after.

1. Held-out prompts (English and Russian): the model answers, critiques its answer against a
   principle (shipped `en` / `ru` sets) and revises; the fixed rule-based judge
   (`lmforge.align.constitution.rule_judge`: language of the question, length, repetition,
   finished sentence, no meta-talk, politeness) says how often it prefers the revision.
2. Training prompts (disjoint): the loop writes sft.jsonl (the revisions); one round of LoRA SFT
   on them (`lmforge sft`).
3. The trained model runs the loop on the held-out prompts again: the same share, after. Also:
   how often the judge prefers the trained model's first answers to the base model's.

    python benchmarks/constitution_eval.py                 # the default model
    python benchmarks/constitution_eval.py --n-train 48 --n-heldout 24 --sft-steps 12

Writes benchmarks/results/constitution_eval.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.rl_arithmetic import git_commit, machine  # noqa: E402

EN_TOPICS = ["the moon", "rain", "bread", "a bicycle", "the ocean", "music", "sleep", "a library", "coffee", "winter",
             "a computer", "the sun", "trees", "money", "a bridge", "friendship", "a volcano", "bees", "chess", "a river"]
RU_TOPICS = ["луна", "дождь", "хлеб", "велосипед", "океан", "музыка", "сон", "библиотека", "кофе", "зима",
             "компьютер", "солнце", "деревья", "деньги", "мост", "дружба", "вулкан", "пчёлы", "шахматы", "река"]
EN_TEMPLATES = ["Explain what {t} is to a child.", "Give one interesting fact about {t}.", "Why is {t} important?"]
RU_TEMPLATES = ["Объясни ребёнку, что такое {t}.", "Расскажи один интересный факт: {t}.", "Почему {t} — это важно?"]


def prompts(seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out): disjoint topics; each {"prompt", "lang"}."""
    rng = random.Random(seed)
    out = {}
    for lang, topics, templates in (("en", EN_TOPICS, EN_TEMPLATES), ("ru", RU_TOPICS, RU_TEMPLATES)):
        ts = topics[:]
        rng.shuffle(ts)
        held, train = ts[:6], ts[6:]
        out[lang] = ([{"prompt": tpl.format(t=t), "lang": lang} for t in train for tpl in templates],
                     [{"prompt": tpl.format(t=t), "lang": lang} for t in held for tpl in templates])
    return out["en"][0] + out["ru"][0], out["en"][1] + out["ru"][1]


def loop_by_language(model, tok, items, params, seed, batch_size):
    from lmforge.align.constitution import constitution_loop, load_principles

    res = {"sft": [], "pairs": [], "trace": []}
    for lang in ("en", "ru"):
        sub = [x["prompt"] for x in items if x["lang"] == lang]
        if sub:
            r = constitution_loop(model, tok, sub, load_principles(lang), params, seed, batch_size)
            for k in res:
                res[k] += r[k]
    return res


def share(trace) -> float:
    from lmforge.align.constitution import judge_prefers

    return sum(judge_prefers(t["prompt"], t["revision"], t["answer"]) for t in trace) / max(len(trace), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--n-train", type=int, default=48)
    ap.add_argument("--n-heldout", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--sft-steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/lmforge-constitution")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "constitution_eval.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from lmforge.align.common import write_jsonl
    from lmforge.align.constitution import judge_prefers
    from lmforge.config import from_dict
    from lmforge.engine import SamplingParams
    from lmforge.finetune.sft import SFTConfig, run_sft
    from lmforge.loading import load_model

    out = Path(args.out)
    info = {"benchmark": "constitution_eval", "command": " ".join(sys.argv), "commit": git_commit(), "machine": machine(),
            "model": args.model or "default", "judge": "rule_judge (lmforge.align.constitution)",
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    t0 = time.time()
    train_items, held = prompts(args.seed)
    rng = random.Random(args.seed)
    rng.shuffle(train_items)
    train_items = train_items[:args.n_train]
    held = held[:args.n_heldout] if args.n_heldout < len(held) else held
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.7, top_p=0.95, repetition_penalty=1.1,
                            seed=args.seed)
    base, tok = load_model(args.model)
    before = loop_by_language(base, tok, held, params, args.seed, args.batch_size)
    print(f"before: judge prefers the revision in {share(before['trace']):.3f} of {len(held)} held-out prompts", flush=True)
    train_out = loop_by_language(base, tok, train_items, params, args.seed + 1, args.batch_size)
    data = write_jsonl(out / "sft.jsonl", train_out["sft"])
    write_jsonl(out / "pairs.jsonl", train_out["pairs"])
    write_jsonl(out / "train_trace.jsonl", train_out["trace"])
    print(f"loop on {len(train_items)} training prompts: {len(train_out['sft'])} revisions", flush=True)
    cfg = from_dict(SFTConfig, {"model": args.model, "data": str(data), "out": str(out / "sft"), "method": "lora",
                                "dtype": "fp32",  # the adapter is merged in memory below: keep the base fp32
                                "batch_size": 4, "max_seq_len": 384, "seed": args.seed,
                                "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                                "train": {"lr": 2e-4, "max_steps": args.sft_steps, "warmup_steps": 2, "log_every": 2}})
    t_sft = time.time()
    res = run_sft(cfg, progress=False)
    sft_wall = time.time() - t_sft
    trained = res["model"]
    from lmforge.finetune.lora import merge_lora

    merge_lora(trained)
    trained.eval()
    after = loop_by_language(trained, tok, held, params, args.seed, args.batch_size)
    direct = [judge_prefers(a["prompt"], b["answer"], a["answer"]) for a, b in zip(before["trace"], after["trace"])]
    info.update(
        heldout_prompts=len(held), train_prompts=len(train_items), revisions_for_training=len(train_out["sft"]),
        sft={"steps": args.sft_steps, "wall_s": round(sft_wall, 1), "method": "lora r=8"},
        judge_prefers_revision={"before": share(before["trace"]), "after": share(after["trace"])},
        judge_prefers_trained_first_answer_over_base=sum(direct) / max(len(direct), 1),
        examples={"before": before["trace"][:2], "after": after["trace"][:2]},
        wall_s=round(time.time() - t0, 1),
    )
    info["machine"]["loadavg_end"] = os.getloadavg()
    Path(args.results).write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n")
    j = info["judge_prefers_revision"]
    print(f"{'':<44}{'before':>8}{'after':>8}")
    print(f"{'judge prefers revision over original':<44}{j['before']:>8.3f}{j['after']:>8.3f}")
    print(f"judge prefers trained first answers over base first answers: {info['judge_prefers_trained_first_answer_over_base']:.3f}")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
