"""Python API: `lmforge.load()` -> an `LM` with `generate`, `chat`, `logits` and `tokenizer`."""
from __future__ import annotations

from dataclasses import fields
from typing import Iterator

import torch

from lmforge.chat import render_prompt
from lmforge.engine import SamplingParams, generate_text, stream_text
from lmforge.errors import LmforgeError
from lmforge.tokenizer import unicode_problem


def sampling_params(model=None, **kw) -> SamplingParams:
    """SamplingParams from keyword options, checked (`draft="auto"` etc., see SamplingParams);
    the sampling options not given come from `model`'s recommendation (generation_config.json,
    else top-k 40, top-p 0.95, min-p 0.05). Temperature defaults to 0: greedy."""
    from lmforge.engine import with_recommended
    from lmforge.fast.speculative import check_draft

    known = {f.name for f in fields(SamplingParams)}
    bad = [k for k in kw if k not in known]
    if bad:
        raise LmforgeError(f"unknown generation option '{bad[0]}' (known: {', '.join(sorted(known))})")
    p = SamplingParams(**kw)
    for s in [p.stop] if isinstance(p.stop, str) else p.stop or []:
        # stop strings are matched against the text, never encoded: the tokenizer's check misses them
        problem = unicode_problem(s) if isinstance(s, str) else None
        if problem is not None:
            raise LmforgeError(f"stop string {s!r} is not valid Unicode: {problem}")
    if model is not None:
        p = with_recommended(p, model, set(kw))
    check_draft(p.draft, p)
    return p


class LM:
    """A loaded model and its tokenizer."""

    def __init__(self, model, tokenizer):
        if tokenizer is None:
            raise LmforgeError("this model has no tokenizer; pass one or use a folder with tokenizer.json")
        self.model = model
        self.tokenizer = tokenizer

    @property
    def config(self):
        return self.model.cfg

    def encode_chat(self, messages: list[dict], tools=None, template_kwargs: dict | None = None) -> list[int]:
        return render_prompt(self.tokenizer, messages, tools=tools, template_kwargs=template_kwargs)

    def generate(self, prompt: str | list[str], stream: bool = False, **kw):
        """Complete raw text (no chat template). A list of prompts is decoded as one batch.

        Options are SamplingParams fields: max_new_tokens, temperature, top_k, top_p,
        repetition_penalty, seed, stop, and draft (speculative decoding of one greedy sequence:
        "none" (default), "auto", "ngram", "self", "self:LAYERS", a draft model's path or an LM)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        ids = [self.tokenizer.encode(p) for p in prompts]
        params = sampling_params(self.model, **kw)
        if stream:
            if len(ids) != 1:
                raise LmforgeError("stream=True takes one prompt")
            return (piece for _, piece in stream_text(self.model, self.tokenizer, ids, params))
        out = [r["text"] for r in generate_text(self.model, self.tokenizer, ids, params)]
        return out[0] if isinstance(prompt, str) else out

    def chat(self, messages: list[dict] | str, stream: bool = False, tools=None, template_kwargs: dict | None = None,
             **kw) -> str | Iterator[str]:
        """Reply to OpenAI-style messages (`[{"role": "user", "content": ...}]`).

        `tools`: OpenAI tool schemas (listed in the prompt; the reply may hold tool-call text), or
        names / `lmforge.tools.Tool` objects, which are executed in a loop and the final answer
        returned (see `chat_with_tools` for the whole exchange).
        `template_kwargs`: extra variables for the model's chat template (`{"enable_thinking": False}`
        for Qwen3), as `transformers.apply_chat_template` takes them.
        """
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if tools and (isinstance(tools, str) or not isinstance(next(iter(tools)), dict)):
            if stream:
                raise LmforgeError("stream=True with executed tools is not supported; use chat_with_tools(on_text=...)")
            return self.chat_with_tools(messages, tools, template_kwargs=template_kwargs, **kw)[-1]["content"]
        seen = self.encode_images(messages) if not tools else None
        ids, images = seen if seen is not None else (self.encode_chat(messages, tools, template_kwargs), None)
        params = sampling_params(self.model, **kw)
        stops = self.stop_ids()
        if stream:
            return (piece for _, piece in stream_text(self.model, self.tokenizer, [ids], params, images, stops))
        return generate_text(self.model, self.tokenizer, [ids], params, images, stops)[0]["text"]

    def encode_images(self, messages: list[dict]) -> tuple[list[int], tuple] | None:
        """(prompt ids, (pixel_values, pixel_attention_mask)) when a message holds image parts
        (`{"type": "image", "path" | "data" | "image": ...}` or OpenAI's `image_url` data URLs);
        None when none does. A model that cannot see is a clear error."""
        from lmforge.vision.prompt import has_images

        if not has_images(messages):
            return None
        if not hasattr(self.model, "render_chat"):
            raise LmforgeError(f"{getattr(self.model, 'source_path', 'this model')} does not take images "
                               "(a vision-language model such as SmolVLM does)")
        p = self.model.render_chat(self.tokenizer, messages)
        return p.ids, (p.pixel_values, p.pixel_attention_mask)

    def stop_ids(self) -> set[int]:
        """The tokens that end a reply (a vision-language model's `<end_of_utterance>` too)."""
        if not hasattr(self.model, "render_chat"):
            return set(self.tokenizer.stop_ids())
        from lmforge.vision.generate import reply_stop_ids

        return reply_stop_ids(self.tokenizer)

    def chat_with_tools(self, messages: list[dict], tools, max_steps: int = 5, on_text=None, on_message=None,
                        template_kwargs: dict | None = None, **kw) -> list[dict]:
        """Let the model call tools (names like "calculator,python,search" or Tool objects) until it
        answers; returns the new messages (assistant turns with `tool_calls`, tool results, answer)."""
        from lmforge.tools import get_tools, run_tool_loop
        from lmforge.tools.protocol import STOP_STRINGS

        if isinstance(tools, str) or (tools and isinstance(next(iter(tools)), str)):
            tools = get_tools(tools)
        schemas = [t.schema() for t in tools]
        params = sampling_params(self.model, **kw)
        params.stop = list(params.stop) + [s for s in STOP_STRINGS if s not in params.stop]

        def generate_fn(msgs: list[dict]) -> str:
            ids = self.encode_chat(msgs, tools=schemas, template_kwargs=template_kwargs)
            pieces = []
            for _, piece in stream_text(self.model, self.tokenizer, [ids], params):
                pieces.append(piece)
                if on_text is not None:
                    on_text(piece)
            if on_text is not None:
                on_text("\n")
            return "".join(pieces)

        from lmforge.tools.shipped import tool_adapter

        with tool_adapter(self.model):
            full = run_tool_loop(generate_fn, list(messages), tools, max_steps=max_steps, on_message=on_message)
        return full[len(messages):]

    @torch.inference_mode()
    def logits(self, ids) -> torch.Tensor:
        """Logits [B, T, vocab] for token ids (a list, a list of lists, or a tensor)."""
        x = torch.as_tensor(ids, dtype=torch.long, device=self.model.lm_head.weight.device)
        if x.dim() == 1:
            x = x[None]
        return self.model(x).float()


def load(model=None, dtype: str = "fp32", device: str = "auto", quant: str = "none") -> LM:
    """Load a model. `device`: auto (CUDA when present, else MPS, else CPU; the default), cpu,
    cuda, cuda:N or mps. `quant`: none (exact weights; the default), int8, int4, or auto (int8
    with fp32 weights on CPU, bf16 weights on CUDA: what `lmforge chat/generate/serve` use)."""
    from lmforge.loading import load_model

    m, tok = load_model(model, dtype=dtype, device=device, quant=quant)
    return LM(m, tok)
