"""Score a model on benchmarks (BIG-bench, HumanEval, your JSONL, perplexity); compare runs.

    lmforge eval --tasks core --limit 50                     the core suite on the default model
    lmforge eval --model M --tasks arithmetic/2_digit_addition,misconceptions --fewshot 3
    lmforge eval --tasks ppl:notes.txt                       perplexity / bits-per-byte of a text
    lmforge eval --tasks humaneval --samples 10 --pass-k 1,10 pass@k in the sandbox
    lmforge eval --model http://127.0.0.1:8000/v1 --tasks simple_arithmetic_json
    lmforge eval compare RUN1 RUN2                           side-by-side deltas of two runs

`--tasks` entries: a suite (core), a BIG-bench task name (NAME@mc / NAME@gen to force the
scoring), a task.json path, a .jsonl of your items ({"input", "choices", "answer"} or
{"input", "target"}), ppl:PATH for text, humaneval. Each run writes results.json, results.md,
plots/scores.png and samples/ into --out.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.errors import LmforgeError


@dataclass
class Config:
    model: str | None = field(default=None, metadata={"help": "GGUF / HF folder / run folder, or an OpenAI-compatible URL"})
    tasks: str = field(default="core", metadata={"help": "comma-separated tasks or suites"})
    limit: int | None = field(default=None, metadata={"help": "items per task (seeded random subset)"})
    fewshot: int = 0
    chat: bool = field(default=False, metadata={"help": "wrap prompts in the model's chat template"})
    seed: int = 0
    out: str | None = field(default=None, metadata={"help": "run folder (default runs/eval-<time>)"})
    dtype: str = "fp32"
    quant: str = "none"
    device: str = field(default="auto", metadata={"help": "auto (CUDA when present, else MPS, else CPU) | cpu | cuda | cuda:N | mps"})
    threads: int = field(default=0, metadata={"help": "torch threads (0 = torch's default)"})
    batch_tokens: int = field(default=2048, metadata={"help": "tokens per forward when scoring"})
    gen_batch_size: int = 8
    max_new_tokens: int | None = None
    samples: int = field(default=1, metadata={"help": "code tasks: completions per problem"})
    pass_k: list[int] = field(default_factory=lambda: [1], metadata={"help": "code tasks: k values of pass@k"})
    temperature: float = field(default=0.8, metadata={"help": "code tasks with --samples > 1"})
    timeout_s: float = 10.0
    ppl_window: int | None = None  # perplexity window in tokens (default: the model's context)
    ppl_stride: int | None = None  # perplexity stride (default: half the window)
    bigbench: str | None = field(default=None, metadata={"help": "bigbench sdist tarball or benchmark_tasks folder"})
    humaneval: str | None = None
    remote_model: str | None = field(default=None, metadata={"help": "model name on the server (default: its first)"})
    progress: bool = True
    args: list[str] = field(default_factory=list, metadata={"positional": True, "help": "compare RUN1 RUN2"})


def run(cfg: Config) -> int:
    if cfg.args:
        if cfg.args[0] != "compare":
            raise LmforgeError(f"unexpected argument '{cfg.args[0]}' (did you mean: lmforge eval compare RUN1 RUN2?)")
        if len(cfg.args) != 3:
            raise LmforgeError("usage: lmforge eval compare RUN1 RUN2 (run folders or results.json files)")
        from lmforge.eval.report import compare, load_run

        print(compare(load_run(cfg.args[1]), load_run(cfg.args[2])))
        return 0

    import sys
    import time
    from pathlib import Path

    from lmforge.eval.report import results_table, summary_header
    from lmforge.eval.runner import EvalSettings, evaluate

    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    settings = EvalSettings(
        tasks=cfg.tasks, limit=cfg.limit, fewshot=cfg.fewshot, chat=cfg.chat, seed=cfg.seed, batch_tokens=cfg.batch_tokens,
        gen_batch_size=cfg.gen_batch_size, max_new_tokens=cfg.max_new_tokens, samples=cfg.samples, pass_k=list(cfg.pass_k),
        temperature=cfg.temperature, timeout_s=cfg.timeout_s, ppl_window=cfg.ppl_window, ppl_stride=cfg.ppl_stride,
        bigbench=cfg.bigbench, humaneval=cfg.humaneval,
    )
    out = Path(cfg.out) if cfg.out else Path("runs") / time.strftime("eval-%Y%m%d-%H%M%S")
    run_rec, _ = evaluate(cfg.model, settings, dtype=cfg.dtype, quant=cfg.quant, device=cfg.device, out=out, progress=cfg.progress,
                          remote_model=cfg.remote_model, log=lambda m: print(m, file=sys.stderr),
                          meta={"command": "lmforge " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["eval"] else None})
    from lmforge.config import save_yaml

    save_yaml({**{k: getattr(cfg, k) for k in cfg.__dataclass_fields__ if k != "args"}}, out / "config.yaml")
    print(summary_header(run_rec))
    print()
    print(results_table(run_rec))
    print(f"\nwrote {out}/results.json, results.md, plots/scores.png")
    return 0
