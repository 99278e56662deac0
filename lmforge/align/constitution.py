"""Constitutional self-improvement: answer -> critique against a principle -> revise.

    principles = load_principles("en")                 # or a path to your own YAML (format below)
    result = constitution_loop(model, tok, prompts, principles, params)
    result["sft"]    # [{"messages": [user, assistant=revision]}]    -> lmforge sft --data
    result["pairs"]  # [{"prompt", "chosen": revision, "rejected": original}] -> lmforge dpo --data

Every step is one batched engine call over all prompts: first answers, then critiques (the
model is shown the question, its answer and the principle's critique request), then revisions
(question, answer, critique, the principle's revision request). A principle is drawn per prompt
(seeded). Revisions that come out empty or equal to the original are dropped (and counted).

The principles file (YAML; shipped: `en`, `ru` in lmforge/align/principles/) has
`principles: [{id, critique, revision, checks?}]` and optional `critique_template` /
`revision_template` with the placeholders {prompt}, {answer}, {critique}, {request}; see en.yaml.

`rule_judge` is the fixed judge used to measure the loop: a few checks any reply can be held
to (language of the question, length, repetition, a finished last sentence, no talk about the
critique itself, politeness); `judge_prefers(a, b)` says whether reply a beats reply b.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.errors import LmforgeError

PRINCIPLES_DIR = Path(__file__).parent / "principles"
DEFAULT_CRITIQUE = "Question: {prompt}\n\nAnswer: {answer}\n\n{request}"
DEFAULT_REVISION = "Question: {prompt}\n\nFirst answer: {answer}\n\nCritique: {critique}\n\n{request}"
CHECKS = ("language", "concise", "no_repetition", "complete", "no_meta", "polite")


@dataclass
class Principle:
    id: str
    critique: str
    revision: str
    checks: list[str] = field(default_factory=list)


@dataclass
class Principles:
    principles: list[Principle]
    critique_template: str = DEFAULT_CRITIQUE
    revision_template: str = DEFAULT_REVISION
    language: str = "en"
    source: str = ""


def load_principles(spec: str | Path) -> Principles:
    """`en`, `ru` (shipped) or a path to a principles YAML; checked strictly."""
    import yaml

    path = Path(spec)
    if not path.exists() and (PRINCIPLES_DIR / f"{spec}.yaml").exists():
        path = PRINCIPLES_DIR / f"{spec}.yaml"
    if not path.exists():
        raise LmforgeError(f"principles file not found: {spec} (shipped: {', '.join(p.stem for p in sorted(PRINCIPLES_DIR.glob('*.yaml')))})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise LmforgeError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise LmforgeError(f"{path}: the top level must be a mapping with 'principles'")
    extra = set(data) - {"principles", "critique_template", "revision_template", "language"}
    if extra:
        raise LmforgeError(f"{path}: unknown key '{sorted(extra)[0]}' (known: principles, critique_template, revision_template, language)")
    items = data.get("principles")
    if not isinstance(items, list) or not items:
        raise LmforgeError(f"{path}: 'principles' must be a non-empty list")
    out, seen = [], set()
    for i, p in enumerate(items):
        if not isinstance(p, dict):
            raise LmforgeError(f"{path}: principle {i} must be a mapping with id, critique, revision")
        bad = set(p) - {"id", "critique", "revision", "checks"}
        if bad:
            raise LmforgeError(f"{path}: principle {i} has unknown key '{sorted(bad)[0]}'")
        for k in ("id", "critique", "revision"):
            if not isinstance(p.get(k), str) or not p[k].strip():
                raise LmforgeError(f"{path}: principle {i} needs a non-empty '{k}'")
        if p["id"] in seen:
            raise LmforgeError(f"{path}: principle id '{p['id']}' is used twice")
        seen.add(p["id"])
        checks = p.get("checks") or []
        unknown = [c for c in checks if c not in CHECKS]
        if unknown:
            raise LmforgeError(f"{path}: principle '{p['id']}' names unknown check '{unknown[0]}' (known: {', '.join(CHECKS)})")
        out.append(Principle(p["id"], p["critique"].strip(), p["revision"].strip(), list(checks)))
    ct = data.get("critique_template", DEFAULT_CRITIQUE)
    rt = data.get("revision_template", DEFAULT_REVISION)
    for name, t, need in (("critique_template", ct, ("{prompt}", "{answer}", "{request}")),
                          ("revision_template", rt, ("{prompt}", "{answer}", "{critique}", "{request}"))):
        missing = [n for n in need if n not in t]
        if missing:
            raise LmforgeError(f"{path}: {name} lacks the placeholder {missing[0]}")
    return Principles(out, ct.strip(), rt.strip(), str(data.get("language", "en")), str(path))


_PREFIX = re.compile(r"^\s*(?:(?:improved|revised|better|new|final)\s+answer|исправленный\s+ответ|улучшенный\s+ответ|ответ)\s*:\s*", re.I)


def clean_reply(text: str) -> str:
    """Strip a leading 'Revised answer:' label and surrounding quotes/whitespace."""
    t = _PREFIX.sub("", (text or "").strip())
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'«":
        t = t[1:-1].strip()
    return t


def _generate(model, tok, conversations: list[list[dict]], params, batch_size: int) -> list[str]:
    from lmforge.chat import render_prompt
    from lmforge.engine import generate_text

    out = []
    for i in range(0, len(conversations), batch_size):
        ids = [render_prompt(tok, c) for c in conversations[i:i + batch_size]]
        out += [r["text"].strip() for r in generate_text(model, tok, ids, params)]
    return out


def constitution_loop(model, tok, prompts: list[str | dict], principles: Principles, params, seed: int = 0,
                      batch_size: int = 16, system: str | None = None, answers: list[str] | None = None) -> dict:
    """Run answer -> critique -> revise over `prompts`; returns {"sft", "pairs", "trace", "stats"}.

    `prompts` are strings or records with `prompt`; `answers` may be given (skip the first pass).
    """
    rng = random.Random(seed)
    texts = [p if isinstance(p, str) else p["prompt"] for p in prompts]
    sys_msgs = [{"role": "system", "content": system}] if system else []
    if answers is None:
        answers = _generate(model, tok, [sys_msgs + [{"role": "user", "content": t}] for t in texts], params, batch_size)
    chosen = [principles.principles[rng.randrange(len(principles.principles))] for _ in texts]
    crit_req = [[{"role": "user", "content": principles.critique_template.format(prompt=t, answer=a, request=p.critique)}]
                for t, a, p in zip(texts, answers, chosen)]
    critiques = _generate(model, tok, crit_req, params, batch_size)
    rev_req = [[{"role": "user", "content": principles.revision_template.format(prompt=t, answer=a, critique=c, request=p.revision)}]
               for t, a, c, p in zip(texts, answers, critiques, chosen)]
    revisions = [clean_reply(r) for r in _generate(model, tok, rev_req, params, batch_size)]
    sft, pairs, trace = [], [], []
    dropped = 0
    for t, a, c, r, p in zip(texts, answers, critiques, revisions, chosen):
        trace.append({"prompt": t, "principle": p.id, "answer": a, "critique": c, "revision": r})
        if not r or r.strip() == a.strip():
            dropped += 1
            continue
        sft.append({"messages": sys_msgs + [{"role": "user", "content": t}, {"role": "assistant", "content": r}]})
        rec = {"chosen": r, "rejected": a}
        rec = {"messages": sys_msgs + [{"role": "user", "content": t}], **rec} if system else {"prompt": t, **rec}
        if a.strip():
            pairs.append(rec)
    return {"sft": sft, "pairs": pairs, "trace": trace,
            "stats": {"prompts": len(texts), "revised": len(sft), "pairs": len(pairs), "dropped": dropped}}


# -- the fixed rule-based judge -----------------------------------------------------------------
_CYR = re.compile(r"[А-Яа-яЁё]")
_LAT = re.compile(r"[A-Za-z]")
_META = re.compile(r"\b(critique|revised answer|first answer|improved answer|as an ai)\b|критик|исправленн|первый ответ", re.I)
_RUDE = re.compile(r"\b(stupid|idiot|shut up|dumb)\b|дурак|идиот|заткнись|тупой", re.I)


def language_of(text: str) -> str:
    c, lat = len(_CYR.findall(text)), len(_LAT.findall(text))
    return "ru" if c > lat else "en"


def rule_checks(prompt: str, reply: str, max_words: int = 80) -> dict[str, bool]:
    """Each check of the fixed judge, True when the reply passes it."""
    words = reply.split()
    grams = [tuple(words[i:i + 3]) for i in range(max(0, len(words) - 2))]
    return {
        "nonempty": bool(reply.strip()),
        "language": bool(reply.strip()) and language_of(reply) == language_of(prompt),
        "concise": 0 < len(words) <= max_words,
        "no_repetition": not grams or len(set(grams)) / len(grams) >= 0.8,
        "complete": bool(re.search(r"[.!?…)»\"]\s*$", reply.strip())),
        "no_meta": not _META.search(reply),
        "polite": not _RUDE.search(reply),
    }


def rule_judge(prompt: str, reply: str) -> float:
    """The judge's score: the number of checks passed (an empty reply scores 0)."""
    c = rule_checks(prompt, reply)
    return 0.0 if not c["nonempty"] else float(sum(c.values()))


def judge_prefers(prompt: str, a: str, b: str, judge=rule_judge) -> float:
    """1 if the judge prefers a over b, 0.5 on a tie, 0 otherwise."""
    sa, sb = judge(prompt, a), judge(prompt, b)
    return 1.0 if sa > sb else 0.5 if sa == sb else 0.0


# -- the command --------------------------------------------------------------------------------
@dataclass
class ConstitutionConfig:
    model: str | None = None  # the model that answers, critiques and revises; default model when unset
    principles: str = "en"  # en | ru | a principles YAML
    data: str = ""  # prompts: JSONL with "prompt" (or "messages" ending with the user), or a .txt (one per line)
    out: str = "runs/constitution"
    system: str | None = None
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.95
    repetition_penalty: float = 1.1
    batch_size: int = 16
    limit: int = 0  # use only the first N prompts (0 = all)
    keep: str = "all"  # all | judged: keep only revisions the rule judge prefers to the original
    seed: int = 0
    dtype: str = "fp32"
    device: str = "auto"  # auto (CUDA when present, else MPS, else CPU) | cpu | cuda | cuda:N | mps
    threads: int = 0


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.exists():
        raise LmforgeError(f"prompts not found: {path}")
    if path.suffix == ".txt":
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    from lmforge.align.common import read_jsonl

    out = []
    for r in read_jsonl(path):
        if "prompt" in r:
            out.append(str(r["prompt"]))
        else:
            users = [m for m in r["messages"] if m.get("role") == "user"]
            if not users:
                raise LmforgeError(f"{path}: a record's messages have no user turn")
            out.append(str(users[-1]["content"]))
    return out


def run_constitution(cfg: ConstitutionConfig) -> dict:
    import json

    import torch

    from lmforge.align.common import write_jsonl
    from lmforge.engine import SamplingParams
    from lmforge.loading import load_model

    if cfg.keep not in ("all", "judged"):
        raise LmforgeError("--keep must be all or judged")
    if not cfg.data:
        raise LmforgeError("--data is required (prompts: JSONL with 'prompt' or a .txt file)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    principles = load_principles(cfg.principles)
    prompts = read_prompts(cfg.data)
    if cfg.limit:
        prompts = prompts[:cfg.limit]
    model, tok = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            repetition_penalty=cfg.repetition_penalty, seed=cfg.seed)
    res = constitution_loop(model, tok, prompts, principles, params, cfg.seed, cfg.batch_size, cfg.system)
    wins = [judge_prefers(t["prompt"], t["revision"], t["answer"]) for t in res["trace"]]
    res["stats"]["judge_prefers_revision"] = sum(wins) / max(len(wins), 1)
    if cfg.keep == "judged":
        keep = {t["prompt"] for t, w in zip(res["trace"], wins) if w == 1.0}
        res["sft"] = [r for r in res["sft"] if r["messages"][-2]["content"] in keep]
        res["pairs"] = [r for r in res["pairs"] if (r.get("prompt") or r["messages"][-1]["content"]) in keep]
        res["stats"].update(revised=len(res["sft"]), pairs=len(res["pairs"]))
    out = Path(cfg.out)
    write_jsonl(out / "sft.jsonl", res["sft"])
    write_jsonl(out / "pairs.jsonl", res["pairs"])
    write_jsonl(out / "trace.jsonl", res["trace"])
    (out / "stats.json").write_text(json.dumps(res["stats"], indent=1) + "\n")
    s = res["stats"]
    print(f"{s['prompts']} prompts: {s['revised']} revisions (sft.jsonl), {s['pairs']} pairs (pairs.jsonl); "
          f"the rule judge prefers the revision in {s['judge_prefers_revision']:.0%}")
    print(f"next: lmforge sft --data {out}/sft.jsonl   or   lmforge dpo --data {out}/pairs.jsonl")
    return res
