"""Reward model on a checkable task: held-out pairwise accuracy, per kind of wrong answer.

    python benchmarks/reward_model.py                                   # recipes/rm/arithmetic.yaml
    python benchmarks/reward_model.py --set train.max_steps=40 --out /tmp/rm-small

Trains `lmforge rm train` with the recipe (the default model + LoRA, Bradley-Terry on correct vs
perturbed sums), then reports: the held-out pairwise accuracy on problems never trained on (the
bar: >= 0.80), the same per kind of wrong answer and for the hard kinds together, accuracy on
training pairs, the loss curve's ends, and wall time. The reference measured in the same run is
the backbone itself as a judge: which reply the language model finds more likely (summed
log-probabilities), on the same held-out pairs. The saved folder is reloaded and re-scored to
check that Python/CLI scoring gives what training measured. Writes
benchmarks/results/reward_model.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.rl_arithmetic import git_commit, machine  # noqa: E402


class LoadSampler:
    """The 1-minute load average every `every` s while the run lasts (the machine is shared)."""

    def __init__(self, every: float = 30.0):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every):
        while not self._stop.is_set():
            self.samples.append(round(os.getloadavg()[0], 2))
            self._stop.wait(every)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    def summary(self) -> dict:
        s = self.samples or [0.0]
        return {"mean": round(sum(s) / len(s), 2), "max": max(s), "samples": len(s)}


def set_key(d: dict, dotted: str, value: str) -> None:
    *path, last = dotted.split(".")
    for k in path:
        d = d.setdefault(k, {})
    try:
        d[last] = json.loads(value)
    except json.JSONDecodeError:
        d[last] = value


@torch.no_grad()
def likelihood_judge(model_path, rows: list[dict], groups: list[str], pad_id: int, batch_size: int = 16) -> dict:
    """The backbone LM as a judge: the reply with the higher summed log-probability wins."""
    from lmforge.align.dpo import reply_logps
    from lmforge.align.preference import collate_pairs
    from lmforge.loading import load_model

    lm, _ = load_model(model_path, dtype="fp32")
    lm.eval()
    wins = []
    for i in range(0, len(rows), batch_size):
        b = collate_pairs(rows[i:i + batch_size], pad_id)
        lp, _ = reply_logps(lm, b["input_ids"], b["reply_mask"])
        c, r = lp.chunk(2)
        wins += (c > r).tolist()
    return summarize(wins, groups)


def summarize(wins: list[bool], groups: list[str]) -> dict:
    from lmforge.align.tasks import HARD_PERTURBATIONS

    by: dict[str, list[bool]] = {}
    for g, w in zip(groups, wins):
        by.setdefault(g, []).append(w)
    hard = [w for g, w in zip(groups, wins) if g in HARD_PERTURBATIONS]
    return {"accuracy": sum(wins) / max(len(wins), 1), "pairs": len(wins),
            "by_kind": {g: round(sum(v) / len(v), 4) for g, v in sorted(by.items())},
            "hard_kinds": {"kinds": list(HARD_PERTURBATIONS), "accuracy": sum(hard) / max(len(hard), 1), "pairs": len(hard)}}


def summarize_groups(r: dict) -> dict:
    """`pairwise_accuracy(..., groups=...)` output in the shape of `summarize`."""
    from lmforge.align.tasks import HARD_PERTURBATIONS

    by = r.get("by_group", {})
    hard = [v for g, v in by.items() if g in HARD_PERTURBATIONS]
    n_hard = sum(v["pairs"] for v in hard)
    return {"accuracy": r["accuracy"], "pairs": r["pairs"], "margin": r["margin"], "loss": r["loss"],
            "by_kind": {g: round(v["accuracy"], 4) for g, v in sorted(by.items())},
            "by_kind_pairs": {g: v["pairs"] for g, v in sorted(by.items())},
            "hard_kinds": {"kinds": list(HARD_PERTURBATIONS), "pairs": n_hard,
                           "accuracy": sum(v["accuracy"] * v["pairs"] for v in hard) / max(n_hard, 1)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "recipes" / "rm" / "arithmetic.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override, e.g. train.max_steps=40")
    ap.add_argument("--out", default="/tmp/lmforge-rm-arith")
    ap.add_argument("--train-eval", type=int, default=256, help="training pairs re-scored for train accuracy")
    ap.add_argument("--no-reference", action="store_true", help="skip the likelihood-judge reference")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "reward_model.json"))
    args = ap.parse_args()

    from lmforge.align.pairs import row_groups
    from lmforge.align.reward_model import RMConfig, load_reward_model, run_rm, score_conversations
    from lmforge.config import from_dict, load_yaml
    from lmforge.train import read_metrics

    raw = load_yaml(args.config)
    for kv in args.set:
        k, _, v = kv.partition("=")
        set_key(raw, k, v)
    raw["out"] = args.out
    cfg = from_dict(RMConfig, raw)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info = {"benchmark": "reward_model", "command": " ".join([sys.executable.split("/")[-1]] + sys.argv),
            "commit": git_commit(), "machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "recipe": raw}
    t0 = time.time()
    with LoadSampler() as load:
        res = run_rm(cfg, progress=True)
        train_s = time.time() - t0
        rm = res["model"]
        out = Path(args.out)
        from lmforge.align.preference import load_pairs, tokenize_pairs
        from lmforge.loading import load_tokenizer

        tok = load_tokenizer(res["checkpoint"])
        pad_id = tok.pad_id if tok.pad_id is not None else 0
        held_file, train_file = out / "data" / "heldout_pairs.jsonl", out / "data" / "train_pairs.jsonl"
        held = res["heldout"]  # run_rm scored every held-out pair once, at fp32, per kind
        heldout = summarize_groups(held)
        val, _ = tokenize_pairs(tok, load_pairs(held_file)[0], cfg.max_seq_len)
        groups = row_groups(val)
        tr_rows, _ = tokenize_pairs(tok, load_pairs(train_file)[0], cfg.max_seq_len)
        tr_rows = tr_rows[:args.train_eval]
        train_acc = summarize(_wins(rm, tr_rows, pad_id), row_groups(tr_rows))
        # the saved folder, reloaded as a user would, scores as the trained model did
        loaded, ltok = load_reward_model(out)
        recs = [json.loads(x) for x in held_file.read_text().splitlines()[:16]]
        conv = lambda r, side: [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r[side]}]  # noqa: E731
        saved = score_conversations(loaded, ltok, [conv(r, "chosen") for r in recs] + [conv(r, "rejected") for r in recs])
        live = score_conversations(rm.eval(), tok, [conv(r, "chosen") for r in recs] + [conv(r, "rejected") for r in recs])
        reload_diff = max(abs(a - b) for a, b in zip(saved, live))
        ref = None
        if not args.no_reference:
            t1 = time.time()
            ref = likelihood_judge(cfg.model, val, groups, pad_id)
            ref["wall_s"] = round(time.time() - t1, 1)
    hist = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    first, last = hist[: max(1, len(hist) // 10)], hist[-max(1, len(hist) // 10):]
    mean = lambda rs, k: round(sum(float(r[k]) for r in rs) / len(rs), 4) if rs and k in rs[0] else None  # noqa: E731
    n_train_pairs = sum(1 for _ in train_file.open())
    problem = lambda line: tuple(json.loads(line)["meta"][k] for k in ("a", "b", "op"))  # noqa: E731
    train_problems = {problem(x) for x in train_file.read_text().splitlines()}
    held_problems = {problem(x) for x in held_file.read_text().splitlines()}
    info.update({
        "task": f"{cfg.task.digits}-digit + {cfg.task.digits_b or cfg.task.digits}-digit addition; chosen = the right sum, "
                f"rejected = a wrong one ({cfg.perturb or 'all kinds'}); held-out problems never trained on",
        "backbone": cfg.model or "default model (HuggingFaceTB/SmolLM2-135M-Instruct)",
        "method": cfg.method, "lora_r": cfg.lora.r if cfg.method == "lora" else None,
        "pairs": {"train": n_train_pairs, "heldout": len(val), "per_problem": cfg.pairs_per_problem},
        "problems": {"train": len(train_problems), "heldout": len(held_problems),
                     "overlap": len(train_problems & held_problems)},
        "steps": res["step"], "stopped": res.get("stopped"), "batch_pairs": cfg.batch_size, "lr": cfg.train.lr,
        "dtype": cfg.train.dtype, "threads": torch.get_num_threads(),
        "train_loop_s": round(float(hist[-1].get("elapsed_s", 0)), 1) if hist else None,
        "rm_command_wall_s": round(train_s, 1), "wall_s": round(time.time() - t0, 1),
        "bt_loss": {"first_10pct_steps": mean(first, "loss"), "last_10pct_steps": mean(last, "loss")},
        "train_batch_accuracy": {"first_10pct_steps": mean(first, "accuracy"), "last_10pct_steps": mean(last, "accuracy")},
        "train_accuracy": train_acc, "heldout": heldout, "bar": 0.8, "passes": heldout["accuracy"] >= 0.8,
        "reference_lm_likelihood": ref, "reload_max_score_diff": reload_diff, "load": load.summary(),
    })
    info["machine"]["loadavg_end"] = os.getloadavg()
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(info, indent=1) + "\n")
    print(f"\n{'':<24}{'held-out':>10}{'train':>10}{'LM judge':>10}")
    print(f"{'all':<24}{heldout['accuracy']:>10.3f}{train_acc['accuracy']:>10.3f}{(ref or {}).get('accuracy', float('nan')):>10.3f}")
    for k in heldout["by_kind"]:
        print(f"{k:<24}{heldout['by_kind'][k]:>10.3f}{train_acc['by_kind'].get(k, float('nan')):>10.3f}"
              f"{(ref or {}).get('by_kind', {}).get(k, float('nan')):>10.3f}")
    hk = "hard (" + "+".join(heldout["hard_kinds"]["kinds"]) + ")"
    print(f"{hk:<24}{heldout['hard_kinds']['accuracy']:>10.3f}{train_acc['hard_kinds']['accuracy']:>10.3f}"
          f"{(ref or {}).get('hard_kinds', {}).get('accuracy', float('nan')):>10.3f}")
    print(f"held-out pairs {len(val)}, steps {res['step']}, training loop {info['train_loop_s'] or 0:.0f} s "
          f"(lmforge rm train {train_s:.0f} s), load avg {load.summary()['mean']}")
    if ref:
        print(f"reward model / LM-likelihood judge on held-out pairs: {heldout['accuracy'] / max(ref['accuracy'], 1e-9):.2f}x")
    print(f"wrote {args.results}")


def _wins(rm, rows, pad_id, batch_size: int = 16) -> list[bool]:
    from lmforge.align.preference import collate_pairs
    from lmforge.align.reward_model import pair_scores

    rm.eval()
    wins: list[bool] = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            rc, rr = pair_scores(rm, collate_pairs(rows[i:i + batch_size], pad_id))
            wins += (rc > rr).tolist()
    return wins


if __name__ == "__main__":
    main()
