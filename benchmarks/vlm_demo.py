"""Can lmforge teach a VLM to see on a laptop CPU? A tiny vision tower learns synthetic pictures.

The model: a new SigLIP-style tower (64x64 pictures, 8x8 patches, a few 128-wide layers) and the
Idefics3 connector (pixel shuffle -> 16 image tokens) in front of a small text model cut from the
default model, SmolLM2-135M: its vocabulary, word embeddings (kept frozen, tied to the output
head) and first `--text-layers` blocks (trained at a lower rate). The whole 30-layer model is too
slow for 20 minutes on two shared cores: about 40 tokens/s forward + backward, so ~1 picture a
second, too few to train a vision tower from nothing.

The task (lmforge/vision/synthetic.py): 1-4 coloured circles, squares and triangles in the left /
right / top / bottom slots; questions about the count, a shape's colour, the shape in a slot and
a shape's slot, each with a one-word answer. Held-out pictures come from another seed (any that
equals a training picture is dropped); answers are greedy, through the generation engine, exact
match, and compared with chance (guessing, and the best blind constant answer).

    python benchmarks/vlm_demo.py                          # <= 20 min of training on 2 CPU cores
    python benchmarks/vlm_demo.py --minutes 2 --n-eval 30 --out /tmp/vlm --result /tmp/vlm.json   # a quick look

The run folder (metrics.jsonl, plots/loss.png, checkpoints) defaults to ~/.cache/lmforge/runs/vlm_demo;
the result JSON to benchmarks/results/vlm_demo.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

# On a shared machine, OpenMP threads that spin while waiting for each other lose whole time
# slices to other processes; waiting passively removes that. Must be set before torch starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
IMAGE_TOKEN = "<jupyter_output>"  # SmolLM2 has no <image>: a special token that no question contains stands in


def parse(argv):
    from lmforge.paths import lmforge_home

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=18.0, help="cap on training wall time (evals during training included)")
    ap.add_argument("--max-steps", type=int, default=3000, help="a cap; the learning rate decays on the clock")
    ap.add_argument("--text-layers", type=int, default=4, help="blocks of the default model kept (30 = all)")
    ap.add_argument("--vision-layers", type=int, default=3)
    ap.add_argument("--vision-width", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16, help="pictures per step (each with up to 4 questions)")
    ap.add_argument("--lr", type=float, default=1e-3, help="vision tower and connector")
    ap.add_argument("--text-lr-scale", type=float, default=0.3, help="the text blocks' lr is lr x this (0 = frozen)")
    ap.add_argument("--n-train", type=int, default=20000, help="training pictures")
    ap.add_argument("--n-eval", type=int, default=150, help="held-out pictures (one question of each kind each)")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"], help="autocast dtype (weights stay fp32)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(lmforge_home() / "runs" / "vlm_demo"))
    ap.add_argument("--result", default=str(ROOT / "benchmarks" / "results" / "vlm_demo.json"))
    return ap.parse_args(argv)


def build(args, tok):
    import lmforge
    from lmforge.vision.build import build_vlm, first_layers
    from lmforge.vision.encoder import VisionConfig

    base = lmforge.load(None, dtype="fp32", quant="none").model
    text = first_layers(base, args.text_layers) if args.text_layers < base.cfg.n_layers else base
    del base
    vcfg = VisionConfig(hidden_size=args.vision_width, intermediate_size=4 * args.vision_width, n_layers=args.vision_layers,
                        n_heads=max(1, args.vision_width // 32), image_size=64, patch_size=8)
    vlm = build_vlm(text, vcfg, image_token_id=tok.token_to_id(IMAGE_TOKEN), scale=2, seed=args.seed)
    return vlm, vcfg


def param_groups(vlm, text_lr_scale: float) -> list[dict]:
    """The vision tower and connector learn from scratch at the full rate; the text blocks (and
    final norm) adapt at a lower one; the embeddings stay: they hold the words and, tied, the
    output head."""
    vlm.text.model.embed_tokens.weight.requires_grad_(False)
    new = list(vlm.vision_model.parameters()) + list(vlm.connector.parameters())
    text = [p for n, p in vlm.text.named_parameters() if not n.startswith(("model.embed_tokens", "lm_head"))]
    groups = [{"params": new}]
    if text_lr_scale > 0:
        groups.append({"params": text, "lr_scale": text_lr_scale, "weight_decay": 0.0})
    else:
        for p in text:
            p.requires_grad_(False)
    return groups


def save_vlm(vlm, vcfg, folder: Path) -> None:
    """Weights (safetensors, the tied head stored once) and the settings to rebuild the model."""
    import dataclasses

    from safetensors.torch import save_file

    tied = vlm.text.cfg.tie_embeddings
    state = {k: v.detach().contiguous() for k, v in vlm.state_dict().items() if not (tied and k == "text.lm_head.weight")}
    save_file(state, str(folder / "model.safetensors"))
    conf = {"vision": dataclasses.asdict(vcfg), "text": dataclasses.asdict(vlm.text.cfg), "scale": vlm.connector.scale,
            "image_token_id": vlm.image_token_id, "image_token": IMAGE_TOKEN}
    (folder / "vlm_config.json").write_text(json.dumps(conf, indent=1) + "\n")


def table(acc: dict, ch: dict, before: dict | None) -> str:
    lines = [f"{'question':<10}{'n':>5}{'accuracy':>10}{'untrained':>11}{'chance':>8}{'blind best':>12}"]
    for kind in ("count", "colour", "shape", "position", "overall"):
        if kind in acc:
            b = f"{before[kind]['accuracy']:.1%}" if before and kind in before else "-"
            lines.append(f"{kind:<10}{acc[kind]['n']:>5}{acc[kind]['accuracy']:>10.1%}{b:>11}"
                         f"{ch[kind]['uniform']:>8.1%}{ch[kind]['majority']:>12.1%}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    import lmforge
    from lmforge.provenance import git_commit
    from lmforge.train import TrainConfig, train
    from lmforge.vision import synthetic as syn
    from lmforge.vision.vqa import VQABatches, accuracy, collate, encode_row, forced_accuracy, vqa_loss

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    load_start = os.getloadavg()
    t0 = time.time()
    out = Path(args.out)
    if out.exists():  # a demo starts from nothing each time; its folder is its own
        shutil.rmtree(out)

    tok = lmforge.load(None, dtype="fp32", quant="none").tokenizer

    def encode(s):
        return tok.encode_text(s)[0]

    def decode(ids):
        return tok.decode(ids, skip_special=True)

    end_id = encode("\n")[0]
    vlm, vcfg = build(args, tok)
    groups = param_groups(vlm, args.text_lr_scale)
    n_new = sum(p.numel() for p in groups[0]["params"])
    n_text = sum(p.numel() for g in groups[1:] for p in g["params"])
    print(f"VLM: {vlm.num_parameters():,} parameters; training {n_new:,} (vision tower + connector, new) "
          f"+ {n_text:,} (text blocks, {args.text_layers} of the default model's 30)")

    size = vcfg.image_size
    train_scenes = syn.scenes(args.n_train, seed=args.seed, size=size)
    held, dropped = syn.heldout_scenes(args.n_eval, seed=args.seed + 1_000_000, train=train_scenes, size=size)
    items = [(held[i], qa) for i, qa in syn.eval_questions(held, seed=args.seed + 2_000_000)]
    chance = syn.chance([qa for _, qa in items])
    print(f"data: {len(train_scenes)} training pictures, {len(held)} held-out ({dropped} dropped as copies of training ones), "
          f"{len(items)} held-out questions")

    pad_id = tok.pad_id if tok.pad_id is not None else end_id
    batches = VQABatches(train_scenes, args.batch_size, encode, vlm.image_token_id, vlm.image_seq_len, end_id, pad_id,
                         vlm.image_config, size, seed=args.seed)
    # the curves: loss and greedy exact match (teacher-forced, one batched forward) on held-out
    # one-question rows
    val = items[:96]
    val_batch = collate([encode_row(encode, [qa], vlm.image_token_id, vlm.image_seq_len, end_id) for _, qa in val],
                        [syn.draw(s, size) for s, _ in val], pad_id, vlm.image_config)

    def eval_fn(m):
        return {"val_loss": vqa_loss(m, val_batch)[0], "val_acc": forced_accuracy(m, val_batch)}

    before = accuracy(vlm, encode, decode, items, end_id, size)["by_kind"]
    print("untrained: " + ", ".join(f"{k} {v['accuracy']:.1%}" for k, v in before.items()), flush=True)

    time_limit = args.minutes * 60
    cfg = TrainConfig(lr=args.lr, min_lr_ratio=0.05, warmup_steps=30, max_steps=args.max_steps, schedule="cosine",
                      schedule_clock="time", time_limit_s=time_limit, weight_decay=0.01, beta2=0.99, grad_clip=1.0, dtype=args.dtype,
                      log_every=5, eval_every=args.eval_every, save_every=0, keep_last=1, seed=args.seed, device="cpu")
    t_train = time.time()
    result = train(vlm, vqa_loss, batches, cfg, out, params=groups, eval_fn=eval_fn,
                   save_fn=lambda m, d: save_vlm(m, vcfg, d), resume=False,
                   config={"demo": {k: v for k, v in vars(args).items()}, "train": cfg.__dict__})
    train_s = time.time() - t_train
    hist = [r for r in result["history"] if "loss" in r]

    t_eval = time.time()
    after = accuracy(vlm, encode, decode, items, end_id, size)
    eval_s = time.time() - t_eval
    acc = after["by_kind"]
    load_end = os.getloadavg()
    print(table(acc, chance, before))
    res = {
        "benchmark": "vlm_demo",
        "command": "python benchmarks/vlm_demo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "git_commit": git_commit(),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch_threads": args.threads,
                    "load_avg_start": [round(x, 2) for x in load_start], "load_avg_end": [round(x, 2) for x in load_end],
                    "note": "load averages are (1, 5, 15 min); a shared machine: other jobs ran beside this one"},
        "model": {"text": f"first {args.text_layers} of 30 blocks of SmolLM2-135M-Instruct (embeddings frozen, tied head)",
                  "vision": {k: getattr(vcfg, k) for k in ("hidden_size", "intermediate_size", "n_layers", "n_heads",
                                                           "image_size", "patch_size")},
                  "image_tokens": vlm.image_seq_len, "parameters": vlm.num_parameters(),
                  "trained_new": n_new, "trained_text": n_text},
        "data": {"train_pictures": len(train_scenes), "heldout_pictures": len(held), "heldout_dropped_as_copies": dropped,
                 "heldout_questions": len(items), "train_seed": args.seed, "heldout_seed": args.seed + 1_000_000},
        "training": {"steps": result["step"], "stopped": result["stopped"], "batch_size": args.batch_size,
                     "pictures_seen": result["step"] * args.batch_size, "lr": args.lr, "text_lr_scale": args.text_lr_scale,
                     "wall_s": round(train_s, 1), "minutes": round(train_s / 60, 2),
                     "train_loop_s": hist[-1]["elapsed_s"] if hist else None,
                     "first_loss": hist[0]["loss"] if hist else None, "final_loss": result["loss"],
                     "run_dir": str(out)},
        "accuracy": {k: v["accuracy"] for k, v in acc.items()},
        "accuracy_untrained": {k: v["accuracy"] for k, v in before.items()},
        "chance": chance,
        "eval": {"greedy": True, "exact_match": True, "wall_s": round(eval_s, 1)},
        "examples": after["replies"][:8],
        "misses": [r for r in after["replies"] if r["reply"] != r["answer"]][:12],
        "total_wall_s": round(time.time() - t0, 1),
    }
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(res, indent=2) + "\n")
    print(f"training: {result['step']} steps ({result['stopped']}) in {train_s / 60:.1f} min; "
          f"load average {load_start[0]:.2f} -> {load_end[0]:.2f}; run folder {out}; wrote {args.result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
