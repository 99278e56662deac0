"""Generate one reply (--prompt or stdin), or one per line of a JSONL file (--data)."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from lmforge.align.system2 import System2Args
from lmforge.cli.common import ModelArgs, SamplingArgs, load_lm, sampling_from, with_model_sampling
from lmforge.errors import LmforgeError


@dataclass
class Config(ModelArgs, SamplingArgs, System2Args):
    prompt: str | None = None
    system: str | None = None
    raw: bool = False  # plain completion even when the model has a chat template
    json: bool = False  # print a JSON object with the text and token counts
    image: str | None = None  # an image the prompt asks about (a vision-language model such as SmolVLM)
    data: str | None = None  # JSONL: {"prompt": ...} or {"messages": [...]} per line
    out: str | None = None  # output JSONL for --data (default: stdout)
    batch_size: int = 8
    stream: bool = True


def _prompt(lm, prompt: str | None, messages: list | None, system: str | None, raw: bool) -> tuple[list[int], list | None]:
    """(prompt ids, the conversation they render, or None for a raw completion)."""
    if messages is None and (raw or not lm.tokenizer.chat_template):
        return lm.tokenizer.encode(prompt, add_bos=None), None
    if messages is None:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return lm.encode_chat(messages), list(messages)


def read_stdin() -> str:
    """The prompt piped on stdin, without the line breaks that end it: `echo "Q" | lmforge
    generate` asks what `--prompt "Q"` asks (as `--prompt "$(cat file)"` would). Only trailing
    "\\n" / "\\r\\n" go; spaces and line breaks inside or before the text are the prompt's."""
    try:
        text = sys.stdin.read()
    except UnicodeDecodeError as e:
        raise LmforgeError(f"stdin is not valid {e.encoding}: {e.reason} (byte 0x{e.object[e.start]:02x})") from None
    return text.rstrip("\r\n")


def system2_reply(lm, cfg, mode: str, ids: list[int], messages: list | None, params) -> dict:
    """The chosen reply (system2_generate's dict); --verbose lists the samples on stderr."""
    from lmforge.align.system2 import describe, system2_generate

    out = system2_generate(lm.model, lm.tokenizer, ids, params, mode=mode, n=cfg.system2_n,
                           reward_model=cfg.reward_model, messages=messages)
    if cfg.verbose:
        print("\n".join(describe(out)), file=sys.stderr)
    return out


def run(cfg: Config) -> None:
    from lmforge.align.system2 import check_args, details
    from lmforge.engine import generate_text, stream_text

    params = sampling_from(cfg)
    mode, note = check_args(cfg, params)
    if note:
        print(note, file=sys.stderr)
    if cfg.data:
        from lmforge.align.common import read_jsonl

        path = Path(cfg.data)
        if not path.exists():
            raise LmforgeError(f"data file not found: {path}")
        rows = read_jsonl(path)
        lm = load_lm(cfg)
        params = with_model_sampling(params, cfg, lm.model)
        out = open(cfg.out, "w", encoding="utf-8") if cfg.out else sys.stdout
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(rows), unit="prompt", disable=not cfg.out)
            for i in range(0, len(rows), cfg.batch_size):
                chunk = rows[i : i + cfg.batch_size]
                prompts = [_prompt(lm, r.get("prompt"), r.get("messages"), cfg.system, cfg.raw) for r in chunk]
                if mode is None:
                    results = generate_text(lm.model, lm.tokenizer, [ids for ids, _ in prompts], params)
                else:  # system 2: one prompt at a time, its N samples together
                    results = [system2_reply(lm, cfg, mode, ids, msgs, params) for ids, msgs in prompts]
                for r, res in zip(chunk, results):
                    rec = {**r, "completion": res["text"], "finish_reason": res["finish_reason"],
                           "completion_tokens": res["completion_tokens"]}
                    if mode is not None:
                        rec["system2"] = {"mode": mode, **details(res)}
                    out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                bar.update(len(chunk))
            bar.close()
        finally:
            if cfg.out:
                out.close()
        return
    prompt = cfg.prompt if cfg.prompt is not None else read_stdin()
    if not prompt.strip():
        raise LmforgeError("empty prompt (pass --prompt TEXT or text on stdin)")
    lm = load_lm(cfg)
    params = with_model_sampling(params, cfg, lm.model)
    images, stops = None, lm.stop_ids()
    if cfg.image:
        if cfg.raw or mode is not None:
            raise LmforgeError("--image goes with a chat prompt (not --raw or System 2)")
        content = [{"type": "image", "path": cfg.image}, {"type": "text", "text": prompt}]
        messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [{"role": "user", "content": content}]
        ids, images = lm.encode_images(messages)
    else:
        ids, messages = _prompt(lm, prompt, None, cfg.system, cfg.raw)
    if mode is not None:  # every sample must finish before one is chosen: nothing to stream
        res = system2_reply(lm, cfg, mode, ids, messages, params)
        if cfg.json:
            print(json.dumps({"text": res["text"], "completion_tokens": res["completion_tokens"], "prompt_tokens": len(ids),
                              "finish_reason": res["finish_reason"], "system2": {"mode": mode, **details(res)}},
                             ensure_ascii=False))
        else:
            print(res["text"])
        return
    if cfg.json:
        res = generate_text(lm.model, lm.tokenizer, [ids], params, images, stops)[0]
        res.pop("ids")
        print(json.dumps(res, ensure_ascii=False))
        return
    if cfg.stream:
        for _, piece in stream_text(lm.model, lm.tokenizer, [ids], params, images, stops):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        print(generate_text(lm.model, lm.tokenizer, [ids], params, images, stops)[0]["text"])
