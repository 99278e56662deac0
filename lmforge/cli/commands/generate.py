"""Generate one reply (--prompt or stdin), or one per line of a JSONL file (--data)."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.cli.common import ModelArgs, SamplingArgs, load_lm, sampling_from
from lmforge.errors import LmforgeError


@dataclass
class Config(ModelArgs, SamplingArgs):
    prompt: str | None = None
    system: str | None = None
    raw: bool = False  # plain completion even when the model has a chat template
    json: bool = False  # print a JSON object with the text and token counts
    data: str | None = None  # JSONL: {"prompt": ...} or {"messages": [...]} per line
    out: str | None = None  # output JSONL for --data (default: stdout)
    batch_size: int = 8
    stream: bool = True


def _prompt_ids(lm, prompt: str | None, messages: list | None, system: str | None, raw: bool) -> list[int]:
    if messages is None and (raw or not lm.tokenizer.chat_template):
        return lm.tokenizer.encode(prompt, add_bos=None)
    if messages is None:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return lm.encode_chat(messages)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LmforgeError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not ("prompt" in row or "messages" in row):
                raise LmforgeError(f"{path}:{n}: each line needs a 'prompt' or 'messages' field")
            rows.append(row)
    return rows


def run(cfg: Config) -> None:
    from lmforge.engine import generate_text, stream_text

    if cfg.data:
        path = Path(cfg.data)
        if not path.exists():
            raise LmforgeError(f"data file not found: {path}")
        rows = _read_jsonl(path)
        lm = load_lm(cfg)
        params = sampling_from(cfg)
        out = open(cfg.out, "w", encoding="utf-8") if cfg.out else sys.stdout
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(rows), unit="prompt", disable=not cfg.out)
            for i in range(0, len(rows), cfg.batch_size):
                chunk = rows[i : i + cfg.batch_size]
                ids = [_prompt_ids(lm, r.get("prompt"), r.get("messages"), cfg.system, cfg.raw) for r in chunk]
                for r, res in zip(chunk, generate_text(lm.model, lm.tokenizer, ids, params)):
                    out.write(json.dumps({**r, "completion": res["text"], "finish_reason": res["finish_reason"],
                                          "completion_tokens": res["completion_tokens"]}, ensure_ascii=False) + "\n")
                bar.update(len(chunk))
            bar.close()
        finally:
            if cfg.out:
                out.close()
        return
    prompt = cfg.prompt if cfg.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise LmforgeError("empty prompt (pass --prompt TEXT or text on stdin)")
    lm = load_lm(cfg)
    ids = _prompt_ids(lm, prompt, None, cfg.system, cfg.raw)
    params = sampling_from(cfg)
    if cfg.json:
        res = generate_text(lm.model, lm.tokenizer, [ids], params)[0]
        res.pop("ids")
        print(json.dumps(res, ensure_ascii=False))
        return
    if cfg.stream:
        for _, piece in stream_text(lm.model, lm.tokenizer, [ids], params):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        print(generate_text(lm.model, lm.tokenizer, [ids], params)[0]["text"])
