"""Document look-up teaching data and its scoring: facts only the user's files hold, cited answers."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lmforge.tools.teach import (
    LOOKUP_KINDS,
    corpus_names,
    lookup_check,
    lookup_corpus,
    lookup_questions,
    lookup_record,
    tool_schemas_for,
    write_corpus,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A training-style folder of 24 notes, indexed as `lmforge index build` does."""
    from lmforge.tools.search import build_index

    tmp = tmp_path_factory.mktemp("lookup")
    docs = lookup_corpus(24, seed=7)
    folder = write_corpus(docs, tmp / "notes")
    index = tmp / "index.sqlite"
    build_index(folder, index)
    return docs, folder, index


def test_corpus_is_seeded_and_each_fact_lives_in_one_file(corpus):
    docs, folder, _ = corpus
    assert docs == lookup_corpus(24, seed=7)
    assert {d.kind for d in docs} == set(LOOKUP_KINDS)
    files = {p.relative_to(folder).as_posix(): p.read_text() for p in folder.rglob("*.md")}
    assert sorted(files) == sorted(d.relpath for d in docs)
    for d in docs:
        assert files[d.relpath] == d.text and d.subject in d.text
        for attr, value in d.facts:
            if attr in ("job", "home", "lead"):  # shared on purpose (towns, leads, jobs recur)
                continue
            holders = [rel for rel, text in files.items() if re.search(rf"(?<!\w){re.escape(value)}(?!\w)", text)]
            assert holders == [d.relpath], (attr, value, holders)


def test_heldout_corpus_shares_no_made_up_name_with_training():
    train = lookup_corpus(90, seed=1)
    held = lookup_corpus(45, seed=2, avoid=corpus_names(train))
    assert corpus_names(held) and not corpus_names(train) & corpus_names(held)
    train_text = " ".join(d.text for d in train).lower()
    for d in held:  # no held-out entity is mentioned anywhere in the training files
        assert not re.search(rf"\b{re.escape(d.subject.lower())}\b", train_text)


def test_records_show_the_fact_and_cite_the_file_that_holds_it(corpus):
    from lmforge.tools import get_tools
    from lmforge.tools.protocol import execute_tool_call

    docs, folder, index = corpus
    schemas = tool_schemas_for("calculator,search")
    qs = lookup_questions(docs, 40, seed=3)
    assert len({q.doc.relpath for q in qs}) == len(docs)  # every file is asked about
    assert len({re.sub(r"[A-Z][a-z]+", "X", q.question) for q in qs}) >= 15  # many phrasings
    for q in qs:
        rec = lookup_record(q, index, tools=schemas)
        user, call_turn, tool, answer = rec["messages"]
        assert user["content"] == q.question and rec["tools"] == schemas
        call = call_turn["tool_calls"][0]
        args = json.loads(call["function"]["arguments"])
        assert call["function"]["name"] == "search" and q.doc.subject in args["query"]
        # the result is what the search tool really returns now, and it shows the fact and its file
        assert execute_tool_call(call, get_tools("search", index=str(index)))["content"] == tool["content"]
        assert q.doc.relpath in tool["content"] and q.value in tool["content"]
        assert q.value in (folder / q.doc.relpath).read_text()
        assert lookup_check(answer["content"], q.value, q.doc.relpath) == {"fact": True, "cited": True, "correct": True}
        others = [d.relpath for d in docs if d.relpath != q.doc.relpath]
        assert not lookup_check(answer["content"], q.value, others[0])["correct"]


def test_scoring_accepts_cited_facts_and_rejects_the_rest():
    path = "places/kalomira.md"
    good = "The population of Kalomira is 48213 (source: places/kalomira.md)."
    assert lookup_check(good, "48213", path)["correct"]
    assert lookup_check("Kalomira has 48,213 people [places/kalomira.md]", "48213", path)["correct"]
    assert lookup_check("The mayor is DUNSEL MAROV (source: ./places/kalomira.md).", "Dunsel Marov", path)["correct"]
    assert lookup_check("Deadline: march 2031, see projects/zor.md", "March 2031", "projects/zor.md")["correct"]
    uncited = lookup_check("The population of Kalomira is 48213.", "48213", path)
    assert uncited == {"fact": True, "cited": False, "correct": False}
    assert not lookup_check("48213 (source: places/kalo.md)", "48213", path)["correct"]  # another file
    assert not lookup_check("48213 (source: places/kalomira.md, people/x_y.md)", "48213", path)["correct"]  # two files
    wrong = lookup_check("The population is 4821 (source: places/kalomira.md).", "48213", path)
    assert wrong == {"fact": False, "cited": True, "correct": False}
    assert not lookup_check("It is 148213 (source: places/kalomira.md)", "48213", path)["fact"]  # inside a longer number
    assert not lookup_check("Mayor Dunselmar (source: places/kalomira.md)", "Dunsel", path)["fact"]
    assert not lookup_check("", "48213", path)["correct"]


def test_records_render_for_sft_within_the_recipe(default_model_path, corpus, tmp_path):
    from lmforge.chat import render_conversation, render_prompt
    from lmforge.config import load_yaml
    from lmforge.finetune.datasets import load_examples, tokenize_examples
    from lmforge.loading import load_tokenizer
    from lmforge.tools.teach import arithmetic_problems, calculator_record, write_jsonl

    docs, _, index = corpus
    tok = load_tokenizer(default_model_path)
    schemas = tool_schemas_for("calculator,search")
    qs = lookup_questions(docs, 6, seed=4)
    recs = [lookup_record(q, index, tools=schemas) for q in qs]
    recs += [calculator_record(p, tools=schemas) for p in arithmetic_problems(2, seed=4)]
    examples, report = load_examples(write_jsonl(recs, tmp_path / "train.jsonl"))
    assert report.total == 8 and not report.skipped
    max_len = load_yaml(ROOT / "recipes" / "sft" / "tool_use_search.yaml")["max_seq_len"]
    rows, report = tokenize_examples(tok, examples, max_len=max_len)
    assert len(rows) == 8 and not report.truncated
    ids, mask = rows[0]
    assert (ids, mask) == render_conversation(tok, examples[0].messages, tools=schemas)
    # the prompt chat_with_tools(tools="calculator,search") renders is a prefix of the training text
    prompt = render_prompt(tok, examples[0].messages[:1], tools=schemas)
    assert ids[:len(prompt)] == prompt
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert '<tool_call>{"name": "search", "arguments": {"query": ' in trained
    assert qs[0].answer in trained and f"(source: {qs[0].doc.relpath})" in trained
    assert "<tool_response>" not in trained and qs[0].question not in trained


class _ScriptedModel:
    """A stand-in for the model, a pure function of the prompt text: asks `search` for the
    question's entity, then answers from the first snippet and cites its file."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def reply(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids)
        last_user = text.rsplit("<|im_start|>user\n", 1)[-1].split("<|im_end|>")[0]
        if "<tool_response>" not in text.rsplit("<|im_start|>user\n", 1)[-1]:
            entity = re.search(r"mayor of (\w+)", last_user).group(1)
            return f'<tool_call>{{"name": "search", "arguments": {{"query": "{entity} mayor", "k": 3}}}}'  # stop string cut
        result = text.rsplit("<tool_response>", 1)[1].split("</tool_response>")[0]
        path = re.search(r"\[1\] (\S+\.md), line \d+ \(chars \d+-\d+\)", result).group(1)
        mayor = re.search(r"Mayor: ([^.]+)\.", result).group(1)
        return f"The mayor is {mayor} (source: {path})."


def test_chat_with_tools_runs_search_on_a_real_index(default_model_path, corpus, monkeypatch):
    """LM.chat_with_tools end to end (prompt rendering, stop string, parsing, the search tool over
    an FTS5 index in tmp_path, the result turn) with a scripted model; the batched eval loop
    gives the same conversation."""
    import lmforge.api
    import lmforge.engine
    from lmforge.loading import load_tokenizer
    from lmforge.tools import get_tools
    from lmforge.tools.teach import tool_loops_batched

    docs, _, index = corpus
    tok = load_tokenizer(default_model_path)
    fake = _ScriptedModel(tok)
    prompts_seen = []

    def fake_stream(model, tokenizer, prompts, params):
        assert "</tool_call>" in params.stop
        prompts_seen.append(prompts[0])
        yield 0, fake.reply(prompts[0])

    def fake_generate(model, tokenizer, prompts, params):
        return [{"text": fake.reply(p)} for p in prompts]

    monkeypatch.setattr(lmforge.api, "stream_text", fake_stream)
    monkeypatch.setattr(lmforge.engine, "generate_text", fake_generate)
    lm = lmforge.api.LM(model=None, tokenizer=tok)
    place = next(d for d in docs if d.kind == "place")
    mayor = dict(place.facts)["mayor"]
    tools = get_tools("calculator,search", index=str(index))
    question = f"Who is the mayor of {place.subject}?"
    new = lm.chat_with_tools([{"role": "user", "content": question}], tools, max_steps=3)

    call_turn, tool_turn, answer = new
    assert call_turn["tool_calls"][0]["function"] == {
        "name": "search", "arguments": json.dumps({"query": f"{place.subject} mayor", "k": 3})}
    first = tool_turn["content"].split("\n\n")[0]
    assert re.match(rf"\[1\] {re.escape(place.relpath)}, line \d+ \(chars \d+-\d+\):\n", first)
    assert f"Mayor: {mayor}." in first
    assert lookup_check(answer["content"], mayor, place.relpath)["correct"]
    # the model saw both tools listed, then the search result in a tool turn
    assert '"name": "calculator"' in tok.decode(prompts_seen[0]) and '"name": "search"' in tok.decode(prompts_seen[0])
    assert "<tool_response>" in tok.decode(prompts_seen[1])

    batched = tool_loops_batched(lm, [question, question], tools, max_new_tokens=8, max_steps=3, batch=2, log=None)
    assert batched == [new, new]
