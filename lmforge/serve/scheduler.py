"""Continuous batching: many requests share one model and one KV cache of B slots.

A background thread owns the model. Each iteration it
1. drops cancelled requests (client gone) and frees their slots,
2. admits queued requests into free slots (`cache.reset([slot])`),
3. prefills admitted prompts in chunks (several rows in one forward, `rows=slots`,
   `n_new` per row), so a long prompt never stalls the others for more than one chunk,
4. decodes every active row in ONE forward (`model(tokens[len(active), 1], cache, rows=active)`),
5. samples each row with its own parameters and generator, detokenizes (stop strings), and
   pushes events to the request's asyncio queue with `loop.call_soon_threadsafe`.

`n > 1` prefills the prompt once and copies its cache row into the sibling slots.
A vision-language model's request with pixels (`GenRequest.pixel_values`) is prefilled on its
own, whole (its image tokens must meet their features in one forward); text requests batch as
before. Prefix reuse never crosses an image: a slot's kept tokens count only up to the first
image token it holds, and an image request reuses only the text before its first image. Requests that
cannot get slots wait in a bounded queue; `submit` raises `QueueFull` beyond it (HTTP 429).
The event loop never runs model code: it only awaits queues.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import random
import threading
import time
from dataclasses import dataclass
from functools import partial

import torch

from lmforge.engine import TextStream
from lmforge.sampling import Row, SamplingParams, sample_next
from lmforge.serve import json_mode
from lmforge.serve.lone import lone_decoder_for

log = logging.getLogger("lmforge.serve")


def _stop_ids(model, tokenizer) -> set[int]:
    """The tokens that end a reply: a vision-language model's `<end_of_utterance>` too (as `LM.stop_ids`)."""
    if not hasattr(model, "render_chat"):
        return tokenizer.stop_ids()
    from lmforge.vision.generate import reply_stop_ids

    return reply_stop_ids(tokenizer)


class QueueFull(Exception):
    """The waiting queue is at its bound."""


@dataclass
class GenRequest:
    """One generation request on token ids; `n` choices share the prompt."""

    prompt: list[int]
    params: SamplingParams  # max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop
    n: int = 1
    logprobs: int | None = None  # None: off; k: the chosen token's logprob plus the top k
    json_mode: bool = False
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    json_prefix: str = ""  # JSON already forced into the prompt (a tool call's opening): JSON mode continues it
    json_keys: tuple | None = None  # json_mode.key_constraint: allowed keys at one depth (tool arguments)
    pixel_values: torch.Tensor | None = None  # a VLM prompt's images ([1, N, 3, H, W]); its <image> tokens take them
    pixel_attention_mask: torch.Tensor | None = None
    adapter: bool = False  # with the default model's tool adapter (a request with tools: lmforge.tools.shipped)


@dataclass
class Event:
    """What a request's queue receives: a token (with its released text), or a choice's end."""

    index: int
    text: str = ""
    token: int | None = None
    logprob: dict | None = None
    finish: str | None = None  # "stop" | "length" | "cancelled" | "error"
    completion_tokens: int = 0
    error: str | None = None


def _deliver(items) -> None:
    """Hand events to their asyncio queues: one thread-safe wake-up per event loop per step
    (a wake-up is a socket write; one per token per request costs more than sampling)."""
    by_loop: dict = {}
    for h, ev in items:
        by_loop.setdefault(h.loop, []).append((h, ev))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            for h, _ in batch:
                h.cancelled = True


def _put_all(batch) -> None:
    for h, ev in batch:
        h.queue.put_nowait(ev)


class Handle:
    """The async side of a submitted request."""

    def __init__(self, req: GenRequest, loop: asyncio.AbstractEventLoop):
        self.req = req
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False
        self.submitted = time.perf_counter()
        self._scheduler: Scheduler | None = None

    def cancel(self) -> None:
        """Free this request's slots at the scheduler's next iteration (idempotent)."""
        if not self.cancelled:
            self.cancelled = True
            if self._scheduler is not None:
                self._scheduler.wake()

    def push(self, ev: Event) -> None:  # called from the scheduler thread
        if self._scheduler is not None:
            self._scheduler._outbox.append((self, ev))  # delivered together at the end of the step
        else:
            _deliver([(self, ev)])

    async def events(self):
        """Events until every choice has finished."""
        left = self.req.n
        while left:
            ev = await self.queue.get()
            if ev.finish is not None:
                left -= 1
            yield ev


@dataclass
class _Seq:
    """One choice of a request, living in one cache slot."""

    handle: Handle
    index: int
    slot: int
    stream: TextStream
    gen: torch.Generator
    row: Row  # the logits chain and the end-of-row rule every decode loop shares (lmforge.sampling)
    prefilled: int = 0
    pending: int | None = None  # sampled token not yet fed to the model
    piece: str = ""  # text the last token released (stop strings held back)
    json_state: tuple | None = None
    done: bool = False

    @property
    def generated(self) -> int:
        return len(self.row.produced)


@dataclass
class SchedulerStats:
    steps: int = 0  # decode forwards
    rows: int = 0  # sum of active rows over decode steps (rows / steps = mean batch)
    prefill_tokens: int = 0
    tokens: int = 0
    requests: int = 0
    prefix_tokens: int = 0  # prompt tokens whose keys/values a slot already held (not recomputed)
    lone_steps: int = 0  # decode steps of a single row run by the fast decoder (lmforge.serve.lone)


class Scheduler:
    """Owns the model, the KV cache and the thread that runs them."""

    def __init__(self, model, tokenizer, slots: int = 8, ctx: int | None = None, max_queue: int = 64, prefill_chunk: int = 512):
        self.model = model
        self.tokenizer = tokenizer
        self.slots = slots
        self.ctx = min(ctx or model.cfg.max_seq_len, model.cfg.max_seq_len)
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.device = next(model.parameters()).device  # (a GGUF head has no weight tensor to ask)
        self.vocab = model.cfg.vocab_size
        self.stop_ids = _stop_ids(model, tokenizer)
        self.image_token = getattr(model, "image_token_id", None)
        self.cache = None  # allocated when the thread starts
        self.lone = None  # the fast decoder a single decoding row moves to (lmforge.serve.lone), built then too
        self.free = list(range(slots))
        # the tokens whose keys/values each slot holds (its cache length), kept after a request
        # ends: a new prompt that starts the same way (the conversation so far, a shared system
        # prompt) goes to that slot and prefills only the rest
        self.slot_tokens: list[list[int]] = [[] for _ in range(slots)]
        self.slot_used = [0] * slots  # admission counter when each slot was last taken (LRU)
        # how many of a slot's kept tokens may be reused: those before its first image token (the
        # keys/values after it depend on the pixels, which two prompts with equal ids need not share)
        self.slot_clean: list[int | None] = [None] * slots
        # whether each slot's keys/values were computed with the tool adapter (a prefix is kept only
        # for a request that runs the same way); the adapter is attached at the first request for it
        self.slot_adapter = [False] * slots
        self.tool_adapter = bool(getattr(model, "tool_adapter", False))
        self._admissions = 0
        self.waiting: collections.deque[Handle] = collections.deque()
        self.active: list[_Seq] = []
        self.prefilling: list[list[_Seq]] = []  # groups (n choices) whose prompt is not in yet
        self.stats = SchedulerStats()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._token_bytes: list | None = None
        self._first_byte: torch.Tensor | None = None
        self._outbox: list = []  # (handle, event) produced during the current step
        self._lock = threading.Lock()

    # -- public, any thread --------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop = False
                self._thread = threading.Thread(target=self._run, name="lmforge-scheduler", daemon=True)
                self._thread.start()

    def run_here(self) -> None:
        """Run the scheduler on the calling thread until `stop` (`lmforge serve` gives it the main
        thread and the HTTP server another). On 2 cores this halves the time per step: once a
        second thread also starts OpenMP work, libgomp manages more threads than there are CPUs
        and stops spinning between parallel regions, and a step has ~200 such regions."""
        self.claim_current_thread()
        self._run()

    def claim_current_thread(self) -> None:
        """Mark the calling thread as the scheduler's before `run_here` (so `start` from the
        server's startup does not launch another)."""
        with self._lock:
            if self._thread is not threading.current_thread():
                self._stop = False
                self._thread = threading.current_thread()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread() and self._thread is not threading.main_thread():
            self._thread.join(timeout)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def submit(self, req: GenRequest, loop: asyncio.AbstractEventLoop | None = None) -> Handle:
        """Queue a request; raises QueueFull when the queue is at its bound."""
        if req.n > self.slots:
            raise ValueError(f"n={req.n} exceeds the server's {self.slots} slots")
        if len(req.prompt) + 1 > self.ctx:
            raise ValueError(f"prompt of {len(req.prompt)} tokens does not fit the context of {self.ctx}")
        self.start()
        h = Handle(req, loop or asyncio.get_running_loop())
        h._scheduler = self
        with self._cond:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the server is busy: {len(self.waiting)} requests already queued")
            self.waiting.append(h)
            self._cond.notify_all()
        return h

    def load(self) -> dict:
        return {"slots": self.slots, "active": self.slots - len(self.free), "queued": len(self.waiting), "ctx": self.ctx}

    def token_bytes(self) -> list:
        if self._token_bytes is None:
            self._token_bytes = json_mode.cached_token_bytes(self.tokenizer)
        return self._token_bytes

    # -- the thread ----------------------------------------------------------------------
    def _run(self) -> None:
        if self.cache is None:
            self.cache = self.model.new_cache(self.slots, self.ctx)
            self.lone = lone_decoder_for(self.model, self.ctx)
        while True:
            with self._cond:
                while not self._stop and not self.waiting and not self.active and not self.prefilling:
                    self._cond.wait(timeout=1.0)
                if self._stop:
                    break
            try:
                with torch.inference_mode():
                    self._iteration()
            except Exception as e:  # a bug must not kill the server: fail the requests in flight
                log.exception("scheduler iteration failed")
                self._fail_all(f"{type(e).__name__}: {e}")
            self._flush()
        self._fail_all("server shutting down", finish="cancelled")
        self._flush()

    def _flush(self) -> None:
        items, self._outbox = self._outbox, []
        if items:
            _deliver(items)

    def _iteration(self) -> None:
        self._drop_cancelled()
        self._admit()
        if self.prefilling:
            self._prefill_step()
        decodable = [s for s in self.active if s.pending is not None and not s.done]
        if decodable:
            self._decode_step(decodable)
        self.active = [s for s in self.active if not s.done]

    def _drop_cancelled(self) -> None:
        with self._cond:
            for h in [h for h in self.waiting if h.cancelled]:
                self.waiting.remove(h)
        for s in self.active:
            if s.handle.cancelled and not s.done:
                self._finish(s, "cancelled")
        for group in [g for g in self.prefilling if g[0].handle.cancelled]:
            self.prefilling.remove(group)
            for s in group:
                self._finish(s, "cancelled")
        self.active = [s for s in self.active if not s.done]

    def _admit(self) -> None:
        while True:
            with self._cond:
                if not self.waiting or len(self.free) < self.waiting[0].req.n:
                    return  # first come, first served: a large n waits rather than being overtaken
                h = self.waiting.popleft()
            req = h.req
            if req.adapter and not self.tool_adapter:
                from lmforge.tools.shipped import attach_tool_adapter

                self.tool_adapter = attach_tool_adapter(self.model)  # after the lone decoder: it stays the file's
            slots, reused = self._take_slots(req.prompt, req.n, self._first_image(req), self._adapter(req))
            group = []
            for i, slot in enumerate(slots):
                seed = (req.params.seed + i) % (1 << 63) if req.params.seed is not None else random.getrandbits(62)
                gen = torch.Generator(device=self.device).manual_seed(seed)
                row = Row.start(req.params, req.prompt, self.ctx, self.stop_ids, self.vocab, self.device,
                                banned=sorted(self.stop_ids) if req.ignore_eos else [], logit_bias=req.logit_bias,
                                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty)
                s = _Seq(h, i, slot, TextStream(self.tokenizer, req.params.stop), gen, row)
                row.should_stop = partial(self._released, s)
                if req.json_mode:
                    s.json_state = json_mode.advance(json_mode.initial_state(), req.json_prefix.encode())
                group.append(s)
            group[0].prefilled = reused
            self.stats.requests += 1
            self.stats.prefix_tokens += reused
            self.prefilling.append(group)

    def _first_image(self, req: GenRequest) -> int | None:
        """The position of a request's first image token when it carries pixels, else None."""
        if req.pixel_values is None or self.image_token not in req.prompt:
            return None
        return req.prompt.index(self.image_token)

    def _adapter(self, req: GenRequest) -> bool:
        return req.adapter and self.tool_adapter

    def _gate(self, reqs: list[GenRequest]) -> None:
        """The tool adapter on for these rows of the next forward, off for the rest."""
        if self.tool_adapter:
            from lmforge.finetune.lora import set_adapter_rows

            set_adapter_rows(self.model, [self._adapter(r) for r in reqs])

    def _take_slots(self, prompt: list[int], n: int, first_image: int | None = None,
                    adapter: bool = False) -> tuple[list[int], int]:
        """`n` free slots for a prompt, the first the one whose kept tokens share the longest
        prefix with it (else the least recently used), and how many prompt tokens it keeps.
        At least the prompt's last token is always computed again: its logits start the reply.
        Neither the slot's kept tokens nor the prompt count past their first image token."""
        limit = len(prompt) - 1 if first_image is None else min(len(prompt) - 1, first_image)

        def shared(slot):
            if self.slot_adapter[slot] != adapter:
                return 0
            held, k = self.slot_tokens[slot][: self.slot_clean[slot]], 0
            for a, b in zip(held, prompt[:limit]):
                if a != b:
                    break
                k += 1
            return k

        # longest shared prefix, then least recently used, then the lowest slot (the free list's order)
        keep, _, best = max((shared(sl), -self.slot_used[sl], -sl) for sl in self.free)
        best = -best
        rest = sorted((sl for sl in self.free if sl != best), key=lambda sl: self.slot_used[sl])[: n - 1]
        slots = [best] + rest
        for sl in slots:
            self.free.remove(sl)
            self._admissions += 1
            self.slot_used[sl] = self._admissions
            self.slot_clean[sl] = first_image
            self.slot_adapter[sl] = adapter
        self.cache.reset(slots)
        self.cache.lengths[best] = keep
        del self.slot_tokens[best][keep:]
        for sl in rest:
            self.slot_tokens[sl] = []
        return slots, keep

    def _prefill_step(self) -> None:
        """One forward over a chunk of every prefilling text prompt (its first choice's slot);
        a prompt with images at the head of the line is prefilled alone, whole."""
        if self.prefilling[0][0].handle.req.pixel_values is not None:
            return self._prefill_images(self.prefilling[0])
        budget = self.prefill_chunk
        rows, chunks = [], []
        for group in self.prefilling:
            lead = group[0]
            if lead.handle.req.pixel_values is not None:
                continue  # its turn comes when it heads the line
            prompt = lead.handle.req.prompt
            take = min(len(prompt) - lead.prefilled, budget)
            if take <= 0:
                break
            rows.append(group)
            chunks.append(prompt[lead.prefilled : lead.prefilled + take])
            budget -= take
        T = max(len(c) for c in chunks)
        idx = torch.zeros(len(chunks), T, dtype=torch.long, device=self.device)
        for b, c in enumerate(chunks):
            idx[b, : len(c)] = torch.tensor(c, device=self.device)
        n_new = torch.tensor([len(c) for c in chunks], device=self.device)
        slots = torch.tensor([g[0].slot for g in rows], device=self.device)
        self._gate([g[0].handle.req for g in rows])
        # hidden states only: the output head runs on each row's last position, not T x vocab
        h = self.model(idx, cache=self.cache, rows=slots, n_new=n_new, hidden_only=True)
        self.stats.prefill_tokens += int(n_new.sum())
        for group, chunk in zip(rows, chunks):
            self.slot_tokens[group[0].slot].extend(chunk)
        done_rows, done_groups = [], []
        for b, group in enumerate(rows):
            group[0].prefilled += len(chunks[b])
            if group[0].prefilled == len(group[0].handle.req.prompt):
                done_rows.append(b)
                done_groups.append(group)
        if not done_groups:
            return
        last = h[torch.tensor(done_rows, device=self.device), n_new[done_rows] - 1]
        logits = self.model.head(last).float()
        for j, group in enumerate(done_groups):
            self._prefilled(group, logits[j])

    def _prefill_images(self, group: list[_Seq]) -> None:
        """The rest of one prompt with images, its pixels passed with it (`VLM.forward`)."""
        lead = group[0]
        req = lead.handle.req
        chunk = req.prompt[lead.prefilled:]
        idx = torch.tensor([chunk], device=self.device)
        pv, mask = (None if t is None else t.to(self.device) for t in (req.pixel_values, req.pixel_attention_mask))
        self._gate([req])
        h = self.model(idx, pv, mask, cache=self.cache, rows=torch.tensor([lead.slot], device=self.device),
                       n_new=torch.tensor([len(chunk)], device=self.device), hidden_only=True)
        self.stats.prefill_tokens += len(chunk)
        self.slot_tokens[lead.slot].extend(chunk)
        self._prefilled(group, self.model.head(h[:, -1]).float()[0])

    def _prefilled(self, group: list[_Seq], logits: torch.Tensor) -> None:
        """A group's prompt is in its lead slot: copy it to the siblings, sample every first token."""
        self.prefilling.remove(group)
        lead = group[0]
        L = len(lead.handle.req.prompt)
        if len(group) > 1:  # n > 1: copy the prompt's keys/values instead of recomputing them
            self.cache.copy_rows([lead.slot] * (len(group) - 1), [s.slot for s in group[1:]], upto=L)
        for s in group[1:]:
            self.slot_tokens[s.slot] = list(lead.handle.req.prompt)
        for s in group:
            s.prefilled = L
            self.active.append(s)
            self._sample_safe(s, logits)

    def _decode_step(self, seqs: list[_Seq]) -> None:
        for s in seqs:
            self.slot_tokens[s.slot].append(s.pending)
        if self.lone is not None and len(seqs) == 1 and not self._adapter(seqs[0].handle.req):
            self._gate([seqs[0].handle.req])  # off: a fast decoder built with the adapter attached reads its switch
            if self.lone.slot != seqs[0].slot:
                self.lone.leave(self.cache)
                self.lone.enter(self.cache, seqs[0].slot)
            logits = self.lone.step(seqs[0].pending)[None]
            self.stats.lone_steps += 1
        else:
            if self.lone is not None:
                self.lone.leave(self.cache)
            tokens = torch.tensor([[s.pending] for s in seqs], device=self.device)
            rows = torch.tensor([s.slot for s in seqs], device=self.device)
            self._gate([s.handle.req for s in seqs])
            logits = self.model(tokens, cache=self.cache, rows=rows)[:, -1].float()
        self.stats.steps += 1
        self.stats.rows += len(seqs)
        for j, s in enumerate(seqs):
            s.pending = None
            self._sample_safe(s, logits[j])

    # -- sampling, one row ---------------------------------------------------------------
    def _sample_safe(self, s: _Seq, logits: torch.Tensor) -> None:
        """One request's bad sampling parameters end that request, not the whole batch."""
        try:
            self._sample(s, logits)
        except Exception as e:  # noqa: BLE001
            log.exception("sampling failed")
            if not s.done:
                s.done = True
                self._free_slot(s)
                s.handle.push(Event(s.index, finish="error", error=f"sampling failed: {type(e).__name__}: {e}",
                                    completion_tokens=s.generated))

    def _sample(self, s: _Seq, logits: torch.Tensor) -> None:
        req = s.handle.req
        if s.handle.cancelled:
            self._finish(s, "cancelled")
            return
        shaped = s.row.process(logits)[None]
        if req.json_mode:
            tok, s.json_state = self._sample_json(s, shaped, req.params)
            if tok is None:  # nothing can continue the JSON: end it rather than emit garbage
                self._finish(s, "stop")
                return
        else:
            tok = int(sample_next(shaped, req.params, s.gen)[0])
        if not s.row.accept(tok):
            self._finish(s, "stop")
            return
        self.stats.tokens += 1
        lp = self._logprob(logits, tok, req.logprobs) if req.logprobs is not None else None
        s.handle.push(Event(s.index, text=s.piece, token=tok, logprob=lp))
        if s.row.finish is not None:
            self._finish(s, s.row.finish)
        else:
            s.pending = tok

    def _released(self, s: _Seq, produced: list[int]) -> bool:
        """The row's `should_stop`: detokenize the new token; a stop string or a complete JSON
        object ends the choice."""
        s.piece = s.stream.push(produced[-1])
        return s.stream.stopped or (s.handle.req.json_mode and json_mode.is_complete(s.json_state))

    def _sample_json(self, s: _Seq, logits: torch.Tensor, p: SamplingParams):
        """A token keeping the output a JSON-object prefix, or (None, state) if none can.

        The proposed token (sampled, or the argmax) is nearly always valid, so try it first;
        otherwise mask the vocabulary down to tokens whose first byte may come next (256 checks)
        and propose again; last, walk the survivors by rank.
        """
        table = self.token_bytes()
        st = s.json_state
        keys = s.handle.req.json_keys

        def ok(t):
            data = table[t] if t < len(table) else None
            return json_mode.advance(st, data, keys=keys) if data else None

        masked = logits
        for attempt in range(2):
            if not bool(torch.isfinite(masked).any()):
                return None, st
            if p.temperature > 0:
                m = masked.clone()
                for _ in range(8):  # rejection sampling keeps the sampled distribution's shape
                    t = int(sample_next(m, p, s.gen)[0])
                    nst = ok(t)
                    if nst is not None:
                        return t, nst
                    m[0, t] = float("-inf")
                    if not bool(torch.isfinite(m).any()):
                        break
            else:
                t = int(masked[0].argmax())
                nst = ok(t)
                if nst is not None:
                    return t, nst
            if attempt == 0:
                masked = logits.masked_fill(~self._first_byte_mask(st, keys)[None], float("-inf"))
        for t in torch.argsort(masked[0], descending=True).tolist():
            if masked[0, t] == float("-inf"):
                break
            nst = ok(t)
            if nst is not None:
                return t, nst
        return None, st

    def _first_byte_mask(self, st, keys=None) -> torch.Tensor:
        """Bool [V]: tokens whose first byte can continue the JSON from state `st`."""
        if self._first_byte is None:
            table = self.token_bytes()
            first = [t[0] if t else 256 for t in table] + [256] * max(0, self.vocab - len(table))
            self._first_byte = torch.tensor(first[: self.vocab], device=self.device)
        allowed = torch.zeros(257, dtype=torch.bool, device=self.device)
        for b in range(256):
            allowed[b] = json_mode.step(st, b, keys=keys) is not None
        return allowed[self._first_byte]

    def _logprob(self, logits: torch.Tensor, tok: int, k: int) -> dict:
        """OpenAI's logprob entry for the chosen token (model distribution, before sampling tweaks)."""
        lp = torch.log_softmax(logits, -1)
        entry = {"id": tok, "logprob": float(lp[tok]), "top": []}
        if k:
            vals, ids = torch.topk(lp, k)
            entry["top"] = [(int(i), float(v)) for i, v in zip(ids, vals)]
        return entry

    def token_text(self, tok: int) -> tuple[str, list[int]]:
        """A token's text and bytes, for logprob entries."""
        table = self.token_bytes()
        data = table[tok] if tok < len(table) else None
        if data is None:
            text = self.tokenizer.id_to_token(tok) or ""
            return text, list(text.encode())
        return data.decode("utf-8", errors="replace"), list(data)

    def _finish(self, s: _Seq, reason: str) -> None:
        if s.done:
            return
        s.done = True
        tail = s.stream.flush() if reason in ("stop", "length") else ""
        self._free_slot(s)
        s.handle.push(Event(s.index, text=tail, finish=reason, completion_tokens=s.generated))

    def _free_slot(self, s: _Seq) -> None:
        if self.lone is not None and self.lone.slot == s.slot:
            self.lone.leave(self.cache)  # the slot keeps the row's keys/values for a next turn
        self.free.append(s.slot)
        self.free.sort()

    def _fail_all(self, msg: str, finish: str = "error") -> None:
        self.slot_tokens = [[] for _ in range(self.slots)]  # a failed forward leaves no cache to trust
        self.slot_clean = [None] * self.slots
        if self.lone is not None:
            self.lone.drop()
        if self.cache is not None:
            self.cache.reset()
        for s in self.active:
            if not s.done:
                s.done = True
                self.free.append(s.slot)
                s.handle.push(Event(s.index, finish=finish, error=msg, completion_tokens=s.generated))
        for group in self.prefilling:
            for s in group:
                s.done = True
                self.free.append(s.slot)
                s.handle.push(Event(s.index, finish=finish, error=msg))
        self.active, self.prefilling = [], []
        self.free = sorted(set(self.free))
        if finish == "cancelled":
            with self._cond:
                while self.waiting:
                    h = self.waiting.popleft()
                    for i in range(h.req.n):
                        h.push(Event(i, finish=finish, error=msg))
