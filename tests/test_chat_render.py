"""The conversation renderer: the template's own text, and a loss mask on every assistant turn."""
import pytest

from lmforge.chat import render_conversation, render_text

transformers = pytest.importorskip("transformers")

CONVO = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


@pytest.fixture(scope="module")
def tok(default_lm):
    return default_lm.tokenizer


def test_render_equals_transformers_apply_chat_template(tok, default_model_path):
    hf = transformers.AutoTokenizer.from_pretrained(default_model_path.parent, gguf_file=default_model_path.name)
    for msgs, gen in ((CONVO, False), (CONVO[1:2], True), (CONVO[:4], True)):
        assert render_text(tok, msgs, add_generation_prompt=gen) == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


def test_loss_mask_covers_all_three_assistant_turns_and_nothing_else(tok):
    ids, mask = render_conversation(tok, CONVO)
    assert len(ids) == len(mask)
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "Hello!<|im_end|>4<|im_end|>Paris.<|im_end|>"
    # the spans are contiguous runs: one per assistant turn
    runs = sum(1 for j in range(len(mask)) if mask[j] and (j == 0 or not mask[j - 1]))
    assert runs == 3
    assert tok.decode(ids) == render_text(tok, CONVO)


def test_base_model_without_template_chats_as_plain_completion(tok):
    from dataclasses import replace

    from lmforge.chat import render_prompt

    bare = replace(tok, chat_template=None)
    ids = render_prompt(bare, [{"role": "user", "content": "Once upon a time"}])
    assert tok.decode(ids) == "Once upon a time"
    # training data for such a model is rendered in ChatML, the format SFT gives it
    text = render_text(bare, [{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_bad_role_is_a_clear_error(tok):
    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError, match="unknown role 'robot'"):
        render_text(tok, [{"role": "robot", "content": "x"}])
