"""Score a model behind an OpenAI-compatible server (lmforge serve, llama.cpp, vLLM) over HTTP.

    --model http://127.0.0.1:8000/v1     (a URL without a path gets /v1 appended)

Generative and code tasks use `/v1/completions` (or `/v1/chat/completions` with `--chat`).
Log-likelihood tasks (multiple choice, perplexity) use `/v1/completions` with `echo: true`,
`logprobs: 1` and `max_tokens: 1`: the server returns the log-probability of every prompt token
and its character offset; the continuation's tokens are those ending after the context (the
same boundary rule as lmforge.eval.scoring). A server that does not return prompt logprobs gets
a clear error instead of a made-up score. The API key comes from LMFORGE_API_KEY or
OPENAI_API_KEY when set.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable
from urllib.parse import urlparse

from lmforge.errors import LmforgeError
from lmforge.eval.scoring import Score, move_trailing_space


def is_url(model: str | None) -> bool:
    return bool(model) and str(model).startswith(("http://", "https://"))


def normalize_base_url(url: str) -> str:
    url = url.rstrip("/")
    for tail in ("/chat/completions", "/completions"):
        if url.endswith(tail):
            url = url[: -len(tail)]
    return url + "/v1" if urlparse(url).path in ("", "/") else url


class RemoteModel:
    """A thin client: completions, chat completions, prompt log-likelihoods."""

    kind = "remote"

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, timeout_s: float = 600.0,
                 batch_size: int = 16, workers: int = 4, client=None):
        """`client`: an httpx.Client to use instead of a new one (tests pass Starlette's TestClient)."""
        import httpx

        self.base_url = normalize_base_url(base_url)
        key = api_key or os.environ.get("LMFORGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if client is not None:
            client.base_url = self.base_url
            client.headers.update(headers)
            self.client = client
        else:
            self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)
        self.batch_size = batch_size
        self.workers = workers
        self.model = model or self._first_model()

    # -- HTTP -------------------------------------------------------------------------------
    def _post(self, path: str, body: dict) -> dict:
        import httpx

        try:
            r = self.client.post(path, json=body)
        except httpx.HTTPError as e:
            raise LmforgeError(f"cannot reach {self.base_url}{path}: {e}") from None
        if r.status_code >= 400:
            raise LmforgeError(f"{self.base_url}{path} answered {r.status_code}: {r.text.strip()[:300]}")
        try:
            return r.json()
        except ValueError:
            raise LmforgeError(f"{self.base_url}{path} did not answer JSON") from None

    def _first_model(self) -> str:
        import httpx

        try:
            r = self.client.get("/models")
            r.raise_for_status()
            data = r.json().get("data") or []
        except (httpx.HTTPError, ValueError) as e:
            raise LmforgeError(f"cannot list models at {self.base_url}/models ({e}); pass --remote-model NAME") from None
        if not data:
            raise LmforgeError(f"{self.base_url}/models lists no model; pass --remote-model NAME")
        return str(data[0]["id"])

    # -- generation -------------------------------------------------------------------------
    def generate(self, prompts: list[str], max_tokens: int, stop: list[str] | None = None, chat: bool = False,
                 temperature: float = 0.0, seed: int | None = None, progress: Callable[[int], None] | None = None) -> list[str]:
        stop = [s for s in (stop or []) if s][:4]  # the OpenAI API takes at most four
        out: list[str] = [""] * len(prompts)
        if chat:
            def one(i):
                body = {"model": self.model, "messages": [{"role": "user", "content": prompts[i]}], "max_tokens": max_tokens,
                        "temperature": temperature}
                if stop:
                    body["stop"] = stop
                if seed is not None:
                    body["seed"] = seed
                res = self._post("/chat/completions", body)
                return i, (res["choices"][0].get("message") or {}).get("content") or ""

            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                for i, text in pool.map(one, range(len(prompts))):
                    out[i] = cut_at_stop(text, stop)
                    if progress is not None:
                        progress(1)
            return out
        for s in range(0, len(prompts), self.batch_size):
            chunk = prompts[s : s + self.batch_size]
            body = {"model": self.model, "prompt": chunk, "max_tokens": max_tokens, "temperature": temperature}
            if stop:
                body["stop"] = stop
            if seed is not None:
                body["seed"] = seed
            res = self._post("/completions", body)
            choices = sorted(res.get("choices", []), key=lambda c: c.get("index", 0))
            if len(choices) != len(chunk):
                raise LmforgeError(f"{self.base_url}/completions returned {len(choices)} choices for {len(chunk)} prompts")
            for j, c in enumerate(choices):
                out[s + j] = cut_at_stop(c.get("text") or "", stop)
            if progress is not None:
                progress(len(chunk))
        return out

    # -- log-likelihood ---------------------------------------------------------------------
    def prompt_logprobs(self, texts: list[str]) -> list[tuple[list[float | None], list[int], list[bool | None]]]:
        """(token logprobs, character offsets, token-is-argmax) of each text, from the server."""
        out = []
        for s in range(0, len(texts), self.batch_size):
            chunk = texts[s : s + self.batch_size]
            body = {"model": self.model, "prompt": chunk, "max_tokens": 1, "temperature": 0.0, "echo": True, "logprobs": 1}
            res = self._post("/completions", body)
            choices = sorted(res.get("choices", []), key=lambda c: c.get("index", 0))
            if len(choices) != len(chunk):
                raise LmforgeError(f"{self.base_url}/completions returned {len(choices)} choices for {len(chunk)} prompts")
            for text, c in zip(chunk, choices):
                lp = c.get("logprobs") or {}
                toks, vals, offs = lp.get("tokens"), lp.get("token_logprobs"), lp.get("text_offset")
                if not toks or vals is None or offs is None or not str(c.get("text", "")).startswith(text):
                    raise LmforgeError(
                        f"the server at {self.base_url} does not return prompt log-probabilities "
                        "(/v1/completions with echo=true and logprobs); log-likelihood tasks need them, "
                        "generative tasks work without")
                top = lp.get("top_logprobs") or [None] * len(toks)
                keep = [k for k, o in enumerate(offs) if o < len(text)]  # drop the generated token
                greedy = []
                for k in keep:
                    t = top[k]
                    greedy.append(None if not t else max(t, key=t.get) == toks[k])
                out.append(([vals[k] for k in keep], [offs[k] for k in keep], greedy))
        return out

    def loglikelihoods(self, requests: list[tuple[str, list[str]]], progress: Callable[[int], None] | None = None) -> list[list[Score]]:
        flat = []
        for ctx, conts in requests:
            for c in conts:
                a, b = move_trailing_space(ctx, c)
                if not a:
                    raise LmforgeError("an empty context cannot be scored remotely (the first token has no log-probability)")
                flat.append((a, b))
        res = self.prompt_logprobs([a + b for a, b in flat])
        scores = []
        for (ctx, cont), (vals, offs, greedy) in zip(flat, res):
            text_len = len(ctx) + len(cont)
            ends = offs[1:] + [text_len]
            first = next((k for k, e in enumerate(ends) if e > len(ctx)), len(vals))
            part = vals[first:]
            if not part or any(v is None for v in part):
                raise LmforgeError(f"the server returned no log-probability for continuation {cont!r}")
            g = greedy[first:]
            scores.append(Score(float(sum(part)), all(x is True for x in g), len(part)))
        out, k = [], 0
        for _, conts in requests:
            out.append(scores[k : k + len(conts)])
            k += len(conts)
            if progress is not None:
                progress(1)
        return out


def cut_at_stop(text: str, stop: list[str]) -> str:
    """Servers may return the stop string or ignore `stop`; cut at the first one either way."""
    cut = len(text)
    for s in stop or []:
        at = text.find(s)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]
