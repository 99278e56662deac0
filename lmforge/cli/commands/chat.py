"""Chat with a model in the terminal (streaming; /reset, /system TEXT, /image PATH, /quit)."""
from __future__ import annotations

import base64
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.align.system2 import System2Args
from lmforge.cli.common import ModelArgs, SamplingArgs, load_lm, runtime_summary, sampling_from, with_model_sampling
from lmforge.errors import LmforgeError

HELP = ("commands: /reset (forget the conversation), /system TEXT (set the system prompt), "
        "/image PATH (attach a picture to your next message), /quit")


@dataclass
class Config(ModelArgs, SamplingArgs, System2Args):
    system: str | None = None
    tools: list[str] = field(default_factory=list)  # calculator,python,search
    search_index: str | None = None  # index for the search tool (lmforge index build)
    max_tool_steps: int = 4
    figures_dir: str = "lmforge-figures"  # where the python tool's figures are saved (PNG files)
    image: str | None = None  # a picture the first message asks about (a vision-language model such as SmolVLM)


def encode(lm, messages: list[dict], tools=None) -> tuple[list[int], tuple | None]:
    """(prompt ids, the pictures' (pixel_values, pixel_attention_mask) or None)."""
    with_images = lm.encode_images(messages)
    return with_images if with_images is not None else (lm.encode_chat(messages, tools=tools), None)


def fit_history(lm, messages: list[dict], reserve: int, tools=None) -> tuple[list[dict], int]:
    """Drop the oldest turns (never the system prompt or the last user turn) until the prompt
    plus `reserve` new tokens fits the context; returns (messages, turns dropped)."""
    ctx = lm.config.max_seq_len
    dropped = 0
    msgs = list(messages)
    while len(encode(lm, msgs, tools)[0]) + reserve > ctx:
        first = 1 if msgs and msgs[0]["role"] == "system" else 0
        if len(msgs) - first <= 1:
            break
        del msgs[first]
        dropped += 1
    return msgs, dropped


def save_figures(figures: list[dict], folder: str | Path) -> list[Path]:
    """Write a tool message's figures (data: URLs of PNGs the sandbox checked) as new files in
    `folder`, named by time so that no earlier figure is overwritten; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    paths = []
    for f in figures:
        head, _, data = f.get("url", "").partition(",")
        if head != "data:image/png;base64":
            continue
        k = 1
        while (folder / f"figure-{stamp}-{k}.png").exists():
            k += 1
        path = folder / f"figure-{stamp}-{k}.png"
        path.write_bytes(base64.b64decode(data))
        paths.append(path)
    return paths


def check_image(lm, path: str) -> str:
    """`path` when the model takes pictures and the file is one it reads; else a one-line error."""
    from lmforge.vision import open_image

    if not hasattr(lm.model, "render_chat"):
        raise LmforgeError(f"{getattr(lm.model, 'source_path', 'this model')} does not take images "
                           "(a vision-language model such as SmolVLM does)")
    open_image(path)
    return path


def user_message(text: str, image: str | None) -> dict:
    if image is None:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "image", "path": image}, {"type": "text", "text": text}]}


def run(cfg: Config) -> None:
    from lmforge.align.system2 import check_args, describe, system2_generate
    from lmforge.engine import stream_text

    params = sampling_from(cfg)
    mode, note = check_args(cfg, params)
    if mode is not None and cfg.tools:
        raise LmforgeError("--system2 cannot be combined with --tools")
    if cfg.image and (mode is not None or cfg.tools):
        raise LmforgeError("--image cannot be combined with --system2 or --tools")
    if note:
        print(note, file=sys.stderr)
    lm = load_lm(cfg)
    params = with_model_sampling(params, cfg, lm.model)
    image = check_image(lm, cfg.image) if cfg.image else None  # goes with the next user message
    tools = None
    if cfg.tools:
        from lmforge.tools import get_tools

        tools = get_tools(cfg.tools, **({"index": cfg.search_index} if cfg.search_index else {}))
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"lmforge chat — {getattr(lm.model, 'source_path', 'model')} ({runtime_summary(lm, cfg)})\n{HELP}", file=sys.stderr)
    system = cfg.system
    history: list[dict] = []
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except UnicodeDecodeError as e:
            raise LmforgeError(f"stdin is not valid {e.encoding}: {e.reason} (byte 0x{e.object[e.start]:02x})") from None
        text = line.strip()  # a piped line's "\n" / "\r\n" goes with the rest of the outer whitespace
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            history = []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            print(f"(system prompt {'set' if system else 'cleared'})", file=sys.stderr)
            continue
        if text.startswith("/image"):
            if mode is not None or tools:
                print("error: /image cannot be combined with --system2 or --tools", file=sys.stderr)
                continue
            path = text[len("/image"):].strip()
            if not path:
                print("usage: /image PATH", file=sys.stderr)
                continue
            try:  # a wrong path or a model that cannot see is said, and the chat goes on
                image = check_image(lm, path)
                print(f"(image attached to your next message: {image})", file=sys.stderr)
            except LmforgeError as e:
                print(f"error: {e}", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(HELP, file=sys.stderr)
            continue
        history.append(user_message(text, image))
        image = None
        messages = ([{"role": "system", "content": system}] if system else []) + history
        messages, dropped = fit_history(lm, messages, params.max_new_tokens, tools=[t.schema() for t in tools] if tools else None)
        if dropped:
            print(f"(dropped {dropped} earlier message(s) to stay within the {lm.config.max_seq_len}-token context)", file=sys.stderr)
            history = [m for m in messages if m["role"] != "system"]
        if tools:
            def show(m):
                if m["role"] == "tool":
                    print(f"[tool result] {m['content']}", file=sys.stderr)
                    # the files keep the figures; the conversation keeps the text (the model's part)
                    for path in save_figures(m.pop("figures", []), cfg.figures_dir):
                        print(f"[figure saved] {path}", file=sys.stderr)

            new_messages = lm.chat_with_tools(
                messages, tools, max_steps=cfg.max_tool_steps, on_message=show,
                on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()), **vars(params))
            history.extend(new_messages)
            continue
        if mode is not None:  # N samples, one kept: printed whole when chosen
            out = system2_generate(lm.model, lm.tokenizer, lm.encode_chat(messages), params, mode=mode, n=cfg.system2_n,
                                   reward_model=cfg.reward_model, messages=messages)
            if cfg.verbose:
                print("\n".join(describe(out)), file=sys.stderr)
            print(out["text"], flush=True)
            history.append({"role": "assistant", "content": out["text"]})
            continue
        reply = []
        ids, pixels = encode(lm, messages)
        for _, piece in stream_text(lm.model, lm.tokenizer, [ids], params, pixels, lm.stop_ids()):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(reply)})
