"""The JSON-mode checker: every prefix of a valid JSON object passes, broken text does not."""
from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.serve import json_mode

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, database=None)
@given(st.dictionaries(st.text(max_size=8), json_values, max_size=5), st.sampled_from([None, 2]), st.booleans())
def test_every_prefix_of_a_json_object_is_accepted(obj, indent, ascii_only):
    text = json.dumps(obj, indent=indent, ensure_ascii=ascii_only).encode()
    st_ = json_mode.initial_state()
    for i, c in enumerate(text):
        st_ = json_mode.step(st_, c)
        assert st_ is not None, f"rejected byte {i} of {text!r}"
        assert json_mode.is_complete(st_) == (i == len(text) - 1)


def test_broken_json_is_rejected():
    bad = ['[1]', '"x"', '{"a" 1}', '{"a":}', '{,}', '{"a":1,}', '{"a":01}', '{"a":1.}', '{"a":"\x01"}',
           '{"a":"\\q"}', '{"a":[1 2]}', '{"a":1}}', '{"a":1} x', '{"a":-}', '{"a":"\\u12g4"}', ' {}', '{"a":1e}',
           '{"a":tru}', '{"a":nul1}', "{'a':1}"]
    for text in bad:
        assert json_mode.advance(json_mode.initial_state(), text.encode()) is None, text
    for text in ['{"a":tru', '{"a":[1,', '{"k', '{"a":"\\u12']:  # valid so far, not finished
        st_ = json_mode.advance(json_mode.initial_state(), text.encode())
        assert st_ is not None and not json_mode.is_complete(st_), text
    assert json_mode.is_json_prefix('{"a":"Zoë 日本"}')
    assert json_mode.advance(json_mode.initial_state(), b'{"a":"\xff"}') is None  # not UTF-8
    assert json_mode.advance(json_mode.initial_state(), b'{"a":"\xe2\x82"}') is None  # a cut character


def test_whitespace_runs_are_bounded():
    assert json_mode.advance(json_mode.initial_state(), b"{" + b" " * 16 + b"}") is not None
    assert json_mode.advance(json_mode.initial_state(), b"{" + b" " * 17 + b"}") is None


def test_token_bytes_of_byte_level_vocab(default_lm):
    tok = default_lm.tokenizer
    table = json_mode.token_bytes_table(tok)
    assert len(table) == tok.vocab_size
    for text in ['{"name": "Zoë", "n": [1, 2.5e3]}', "héllo wörld 日本"]:
        ids = tok.encode(text)
        assert b"".join(table[i] for i in ids) == text.encode()
    assert table[tok.eos_id] is None  # special tokens never appear inside JSON


def test_key_constraint_for_tool_arguments():
    keys = json_mode.key_constraint(2, {"city": {"type": "string"}, "days": {"type": ["integer", "null"]}, "x": {}})
    st_ = json_mode.advance(json_mode.initial_state(), b'{"name": "get_weather", "arguments": ', keys=keys)
    done = json_mode.advance(st_, b'{"city": "Paris", "days": null, "x": {"town": [1]}}}', keys=keys)
    assert json_mode.is_complete(done)  # untyped keys and deeper objects are free
    assert json_mode.advance(st_, b'{"days": -3, "x": true}', keys=keys) is not None
    for bad in (b'{"city": {', b'{"city": 1', b'{"days": "3"', b'{"days": t'):  # values of the wrong type
        assert json_mode.advance(st_, bad, keys=keys) is None, bad
    assert json_mode.advance(st_, b'{"ci', keys=keys) is not None
    for bad in (b'{"town"', b'{"cit"', b'{"city_"', b'{"c\\u0069ty"'):
        assert json_mode.advance(st_, bad, keys=keys) is None, bad
    assert json_mode.is_complete(json_mode.advance(st_, b"{}}", keys=keys))
