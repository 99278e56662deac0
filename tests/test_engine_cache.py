"""The KV cache: one new token per row per decode step, same tokens as recomputing everything."""
import torch

from lmforge.engine import SamplingParams, generate_naive, generate_tokens, sample_next


class CountingModel(torch.nn.Module):
    """Wraps a model and records the shape of every forward's input."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.cfg = model.cfg
        self.lm_head = model.lm_head
        self.calls = []

    def new_cache(self, *a, **k):
        return self.inner.new_cache(*a, **k)

    def forward(self, idx, **kw):
        self.calls.append((tuple(idx.shape), kw.get("cache") is not None))
        return self.inner(idx, **kw)


def _collect(model, prompts, params):
    out = [[] for _ in prompts]
    for b, t in generate_tokens(model, prompts, params):
        out[b].append(t)
    return out


def test_cache_matches_no_cache_greedy(tiny_model):
    params = SamplingParams(max_new_tokens=20)
    prompt = [5, 17, 99, 3, 42, 7]
    assert _collect(tiny_model, [prompt], params)[0] == generate_naive(tiny_model, prompt, params)


def test_cache_logits_equal_full_forward(tiny_model):
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(3))
    full = tiny_model(ids)
    cache = tiny_model.new_cache(1, 64)
    parts = [tiny_model(ids[:, :10], cache=cache)]
    for t in range(10, 30):
        parts.append(tiny_model(ids[:, t : t + 1], cache=cache))
    assert (torch.cat(parts, 1) - full).abs().max().item() <= 1e-5


def test_decode_step_processes_exactly_one_token_per_row(tiny_model):
    counting = CountingModel(tiny_model)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [4, 4, 4, 4]]
    params = SamplingParams(max_new_tokens=6)
    _collect(counting, prompts, params)
    prefill, *steps = counting.calls
    assert prefill == ((3, 7), True)  # one prefill for all rows, right-padded to the longest
    assert steps and all(shape == (3, 1) and cached for shape, cached in steps)


def test_batched_unequal_prompts_equal_single_runs(tiny_model):
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [200, 3], [17, 18, 19, 20]]
    params = SamplingParams(max_new_tokens=12)
    batched = _collect(tiny_model, prompts, params)
    for p, got in zip(prompts, batched):
        assert got == generate_naive(tiny_model, p, params)


def test_rows_leave_the_batch_at_their_stop_token(tiny_model):
    prompts = [[1, 2, 3], [7, 8, 9, 10]]
    free = _collect(tiny_model, prompts, SamplingParams(max_new_tokens=10))
    stop = free[0][3]  # row 0 stops when it would emit its 4th token
    out = _collect(tiny_model, prompts, SamplingParams(max_new_tokens=10, stop_ids={stop}))
    assert out[0] == free[0][: free[0].index(stop)]
    assert out[1] == free[1][: free[1].index(stop)] if stop in free[1] else out[1] == free[1]


def test_seeded_sampling_is_reproducible_and_matches_naive(tiny_model):
    params = SamplingParams(max_new_tokens=15, temperature=0.9, top_k=50, top_p=0.9, seed=123, repetition_penalty=1.3)
    a = _collect(tiny_model, [[3, 4, 5]], params)[0]
    b = _collect(tiny_model, [[3, 4, 5]], params)[0]
    assert a == b
    assert a == generate_naive(tiny_model, [3, 4, 5], params)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[5.0, 4.0, 3.0, -10.0, -10.0]])
    g = torch.Generator().manual_seed(0)
    seen_k = {int(sample_next(logits, SamplingParams(temperature=1.0, top_k=2), g)) for _ in range(200)}
    assert seen_k == {0, 1}
    seen_p = {int(sample_next(logits, SamplingParams(temperature=1.0, top_p=0.5), g)) for _ in range(200)}
    assert seen_p == {0}


def test_prompt_longer_than_context_is_a_clear_error(tiny_model):
    import pytest

    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError, match="longer than the model's context of 128"):
        list(generate_tokens(tiny_model, [[1] * 200], SamplingParams(max_new_tokens=2)))


def test_identical_prompts_are_prefilled_once(tiny_model, monkeypatch):
    """A GRPO group or System 2's N samples repeat one prompt: it goes through the model once and
    the copies decode from its cache rows, with the tokens each row would get on its own."""
    p, q = [5, 6, 7, 8, 9], [11, 12, 13]
    prefill_rows = []
    real = type(tiny_model).forward

    def spy(self, idx, *a, **kw):
        if idx.shape[1] > 1:
            prefill_rows.append(idx.shape[0])
        return real(self, idx, *a, **kw)

    monkeypatch.setattr(type(tiny_model), "forward", spy)
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    out = _collect(tiny_model, [p, q, p, p, q], greedy)
    assert prefill_rows == [2]  # two distinct prompts, one prefill row each
    assert out[0] == out[2] == out[3] == generate_naive(tiny_model, p, greedy)
    assert out[1] == out[4] == generate_naive(tiny_model, q, greedy)
    sampled = _collect(tiny_model, [p] * 4, SamplingParams(max_new_tokens=6, temperature=1.0, seed=3))
    assert len({tuple(x) for x in sampled}) > 1  # the copies sample on their own
