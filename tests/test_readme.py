"""The README, run as written: every command in it runs on a fresh machine after its install.

What is extracted (`parse_readme`):
- every ```bash block, one command per line (`\\` continues a line, `# ...` ends it);
- every bare ``` block whose lines start with `$ ` (a transcript): `$ ` lines are commands,
  `> ` lines right after one are what is typed at its prompt (stdin), other lines are the output
  the README shows, with `...` standing for lines left out;
- every ```python block, run as a script; an expression whose trailing comment is a string
  literal (`m.chat(...)   # 'The capital of France is Paris.'`) must equal it.

The install steps (`python3 -m venv`, `. .venv/bin/activate`, `pip install`, `python -m pytest`)
are not re-run: CI itself runs them, and `test_install_commands_are_what_ci_runs` checks the
README's test command is `.ci/run`'s, character for character, and the user install is its prefix.

How the rest runs (`Reader`): through bash, one command after another in README order, like one
reader at one terminal (`NAME=value` lines persist), with
- HOME in a temp folder, so `~/.cache/lmforge` starts empty (LMFORGE_HOME / LMFORGE_MODEL unset);
  the machine's own npm/pip registry settings are kept, as they would be on a fresh machine;
- the venv's bin first on PATH (what `. .venv/bin/activate` does);
- cwd a temp mirror of the repo root (its top-level entries symlinked), so relative paths such
  as `recipes/...` resolve while `runs/` and `data/` land in the temp folder, not the checkout.

Scaling: flags appended to a command (lmforge's CLI lets the last occurrence of a flag win),
by command name (`SCALE`), by the recipe it loads (`RECIPE_SCALE`) and by launcher
(`LAUNCHERS`): training 2 steps with small batches, a few val windows and one held-out file,
`chat`/`generate` 64 new tokens, the GPU recipe without torch.compile and with a 4 KB held-out
file, `torchrun` 2 CPU processes (gloo) and its own `--out`. `PLACEHOLDERS` turns the README's
stand-in words into small real paths, `FILES` writes the files a reader brings (`chats.jsonl`),
`INPUT` is typed into interactive commands. A new block (e.g. `lmforge speedrun --budget 10m`) is picked
up by itself; give its command a row in SCALE (speedrun already has `--budget 2m`) and in CHECKS.

What is checked: every command exits 0 without a traceback; shown output must appear (in order,
each run between `...` contiguous); `CHECKS` asserts what each command produced (files,
numbers in its summary line). Transcripts made by a minutes-long finetune cannot be reproduced
by a 2-step one (`SHAPE_ONLY`): there the command runs, its output's shape is checked (a reply;
a tool result only after a call), and each tool call the transcript shows, run through the real
tool, must give the tool result it shows.

Stages: a block runs after every earlier block of its stage (default blocks after default ones;
slow blocks after all earlier blocks), as the reader would have run them. Blocks matching
`SLOW` are `@pytest.mark.slow` (3 minutes on 2 quiet cores, 13 beside another training job);
the rest take 1.5-3 minutes (the Python block and the walkthrough are most of it).
"""
from __future__ import annotations

import ast
import io
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CI_RUN = REPO / ".ci" / "run"

# ---------------------------------------------------------------------------------------------
# Tables: how each command is scaled, fed and checked. Keyed by command name: `lmforge SUB[ SUB2]`
# minus "lmforge " (e.g. "pretrain", "tokenizer train"), or a script path ("benchmarks/x.py").

SCALE = {
    # enough steps for a checkpoint, a resume point and a metrics row; evals cut to a few windows
    # of val and the first held-out file (whole files are kept, so 1 byte means one file)
    "pretrain": "--train.max_steps 2 --train.warmup_steps 1 --data.eval_tokens 1024 --data.heldout_max_bytes 1",
    "sft": "--train.max_steps 2 --train.warmup_steps 1 --batch_size 2",
    "chat": "--max-new-tokens 64",
    "generate": "--max-new-tokens 64",
    "eval": "--limit 4",
    "speedrun": "--budget 2m",  # its shortest budget
}
RECIPE_SCALE = {
    # 110 M parameters: a micro-batch of 32 x 1024 x 16 accumulations is hours on 2 cores, and
    # torch.compile of its blocks minutes; its held-out folder (whole files) ~2 minutes of eval
    "recipes/pretrain/gpu-gpt2-small.yaml": "--train.grad_accum 1 --data.batch_size 2 --data.seq_len 128 "
                                            "--train.compile false --data.heldout tests/data/heldout_prose.txt",
}
LAUNCHERS = {
    # 8 GPUs -> 2 CPU processes over gloo. The README offers it instead of the one-GPU command, whose
    # run folder (same --out) it would resume, already finished, instead of training.
    "torchrun": ([(r"--nproc_per_node[ =]\d+", "--nproc_per_node 2")], "--out runs/torchrun"),
}
PLACEHOLDERS = {
    "DIR_OF_TEXT": "~/.cache/lmforge/data/english/moby-dick",  # fetched by the walkthrough
    "TOKENIZER": "~/.cache/lmforge/tokenizers/en8k",  # trained by the walkthrough
}
FILES = {
    "chats.jsonl": "".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {a} plus {b}?"},
        {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}) + "\n" for a in range(1, 5) for b in range(1, 5)),
}
INPUT = {"chat": "What is the capital of France?\n"}  # typed into an interactive chat with no piped input
SHAPE_ONLY = {
    r"--model ~/\.cache/lmforge/runs/tool_use(_search)?\b":
        "the adapter behind this transcript took 18-20 minutes of LoRA; 2 steps cannot reproduce its calls",
}
SLOW = {
    r"gpu-gpt2-small\.yaml": "a 110 M-parameter model: ~10 s a step on 2 cores and 1.4 GB checkpoints",
    r"\blmforge sft\b": "LoRA steps on the default model take ~30 s each on 2 cores",
    r"runs/tool_use": "chat through an adapter loads and merges the default model",
    r"\bspeedrun\b": "its shortest budget is 2 minutes",
}
TIMEOUT_S = 1200
INSTALL_STEP = re.compile(r"^(python3? -m venv |\. \S*activate$|source \S*activate$|pip install |python -m pytest\b)")


# ---------------------------------------------------------------------------------------------
# Parsing


@dataclass
class Command:
    text: str  # as in the README, trailing comment removed
    line: int
    stdin: str | None = None  # typed at the prompt (`> ` lines of a transcript)
    shown: list[str] = field(default_factory=list)  # output the README shows after it
    install: list[str] = field(default_factory=list)  # `&&` steps that are the install


@dataclass
class Block:
    line: int
    lang: str  # bash | transcript | python
    source: str
    commands: list[Command]

    @property
    def id(self) -> str:
        first = next((c.text for c in self.commands if c.text), "install" if self.lang != "python" else "python")
        return f"L{self.line}-{self.lang}-{re.sub(r'[^A-Za-z0-9]+', '_', first)[:40].strip('_')}"


def strip_comment(line: str) -> str:
    """The line without a trailing shell comment: `#` at a word start, outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def split_install(text: str, line: int) -> list[Command]:
    """A `&&` chain as its install steps (kept, not run) and one Command per other step."""
    steps = [s.strip() for s in text.split(" && ")]
    install = [s for s in steps if INSTALL_STEP.match(s)]
    rest = [s for s in steps if not INSTALL_STEP.match(s)]
    if install and steps[: len(install)] != install:
        raise AssertionError(f"README line {line}: install steps must come first in `{text}`")
    if not install:
        return [Command(text, line)]
    cmds = [Command("", line, install=install)]
    return cmds + [Command(s, line) for s in rest]


def parse_readme(text: str) -> list[Block]:
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        lang, start, body = m.group(1), i + 1, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        if lang in ("bash", "sh", "shell"):
            cmds, pending, pending_line = [], "", 0
            for n, raw in enumerate(body, start + 1):
                if not pending and (not raw.strip() or raw.lstrip().startswith("#")):
                    continue
                pending_line = pending_line or n
                if raw.rstrip().endswith("\\"):
                    pending += raw.rstrip()[:-1].strip() + " "
                    continue
                cmds += split_install(strip_comment(pending + raw.strip()).strip(), pending_line)
                pending, pending_line = "", 0
            blocks.append(Block(start, "bash", "\n".join(body), cmds))
        elif lang == "" and any(b.startswith("$ ") for b in body):
            cmds = []
            for n, raw in enumerate(body, start + 1):
                if raw.startswith("$ "):
                    cmds += split_install(strip_comment(raw[2:]).strip(), n)
                elif raw.startswith("> ") and cmds and not cmds[-1].shown:
                    cmds[-1].stdin = (cmds[-1].stdin or "") + raw[2:] + "\n"
                elif cmds:
                    cmds[-1].shown.append(raw)
            blocks.append(Block(start, "transcript", "\n".join(body), cmds))
        elif lang == "python":
            blocks.append(Block(start, "python", "\n".join(body), []))
        else:
            blocks.append(Block(start, lang or "text", "\n".join(body), []))
    return blocks


def segments(text: str) -> list[str]:
    """The commands of a pipeline (split at `|` outside quotes)."""
    out, quote, cur = [], None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "|":
            out.append(cur.strip())
            cur = ""
            continue
        cur += ch
    return out + [cur.strip()]


def command_name(segment: str) -> tuple[str, str | None]:
    """(name, launcher) of one command: ("tokenizer train", None), ("pretrain", "torchrun"),
    ("benchmarks/tool_use.py", None); ("", None) for what is not lmforge's (echo, cp...)."""
    words = shlex.split(segment)
    launcher = None
    if words and words[0] == "torchrun" and "lmforge.cli.main" in words:
        launcher, words = "torchrun", ["lmforge"] + words[words.index("lmforge.cli.main") + 1:]
    if len(words) >= 3 and words[0] in ("python", "python3") and words[1:3] == ["-m", "lmforge.cli.main"]:
        words = ["lmforge"] + words[3:]
    if len(words) >= 2 and words[0] in ("python", "python3") and words[1].endswith(".py"):
        return words[1], launcher
    if len(words) >= 2 and words[0] == "lmforge":
        name = words[1]
        if len(words) >= 3 and re.fullmatch(r"[a-z][a-z-]*", words[2]):
            name += " " + words[2]
        return name, launcher
    return "", launcher


def lookup(table: dict, name: str):
    return table.get(name) if name else None


def scale(text: str) -> str:
    """`text` with the test's scaling applied to its last pipeline command."""
    segs = segments(text)
    last = segs[-1]
    name, launcher = command_name(last)
    if launcher:
        subs, extra = LAUNCHERS[launcher]
        for pattern, repl in subs:
            last = re.sub(pattern, repl, last)
        last += " " + extra
    if lookup(SCALE, name):
        last += " " + lookup(SCALE, name)
    for recipe, extra in RECIPE_SCALE.items():
        if recipe in last:
            last += " " + extra
    for word, value in PLACEHOLDERS.items():
        last = re.sub(rf"(?<![\w/.-]){re.escape(word)}(?![\w/.-])", value, last)
    return " | ".join(segs[:-1] + [last])


def screen_lines(output: str) -> list[str]:
    """The lines a terminal would end up showing: progress bars' `\\r` rewrites collapsed."""
    return [ln.split("\r")[-1].rstrip() for ln in output.split("\n") if ln.split("\r")[-1].strip()]


def shows(expected: list[str], output: str) -> bool:
    """Each run of expected lines between `...` appears contiguously, runs in order."""
    got = screen_lines(output)
    runs, cur = [], []
    for ln in expected:
        if ln.strip() == "...":
            runs.append(cur)
            cur = []
        elif ln.strip():
            cur.append(ln.rstrip())
    runs = [r for r in runs + [cur] if r]
    pos = 0
    for run in runs:
        for start in range(pos, len(got) - len(run) + 1):
            if got[start:start + len(run)] == run:
                pos = start + len(run)
                break
        else:
            return False
    return True


def python_script(source: str) -> tuple[str, int]:
    """The block as a script that asserts each `expr  # 'literal'`; and how many it asserts."""
    tree = ast.parse(source)
    comments = {t.start[0]: t.string for t in tokenize.generate_tokens(io.StringIO(source).readline)
                if t.type == tokenize.COMMENT}
    out, checked = [], 0
    for node in tree.body:
        seg = ast.get_source_segment(source, node)
        expected = None
        if isinstance(node, ast.Expr) and node.end_lineno in comments:
            try:
                expected = ast.literal_eval(comments[node.end_lineno][1:].strip())
            except (ValueError, SyntaxError):
                pass
        if isinstance(expected, str):
            out.append(f"_got = {seg}\nassert _got == {expected!r}, 'README python line {node.lineno}: got %r' % (_got,)")
            checked += 1
        else:
            out.append(seg)
    return "\n".join(out) + "\n", checked


# ---------------------------------------------------------------------------------------------
# Checks: what each command must have produced (beyond exit 0 and no traceback)


@dataclass
class Result:
    cmd: Command
    text: str  # as run (scaled)
    name: str
    launcher: str | None
    argv: list[str]  # of the last pipeline command, as bash expanded it
    output: str  # stdout and stderr, interleaved as on a terminal
    seconds: float
    cwd: Path
    home: Path


def flag(argv: list[str], name: str, default=None):
    """The value of the last `--name VALUE` / `--name=VALUE` (`-` and `_` alike)."""
    norm = lambda s: s.replace("_", "-")  # noqa: E731
    value = default
    for i, a in enumerate(argv):
        if norm(a) == f"--{norm(name)}" and i + 1 < len(argv):
            value = argv[i + 1]
        elif norm(a).startswith(f"--{norm(name)}="):
            value = a.split("=", 1)[1]
    return value


def path_in(r: Result, p: str) -> Path:
    return (r.cwd / Path(p).expanduser()) if not Path(p).expanduser().is_absolute() else Path(p).expanduser()


def check_pull(r: Result):
    m = re.search(r"model ready: (\S+)", r.output)
    assert m and Path(m.group(1)).is_file() and m.group(1).endswith(".gguf"), r.output


def check_fetch(r: Result):
    m = re.search(r"data in (\S+): (\d+) ready, (\d+) skipped, (\d+) failed", r.output)
    assert m, r.output
    if int(m.group(3)):
        pytest.skip("this machine lacks apt-get or dpkg-deb, so `lmforge fetch` skips the sources the walkthrough "
                    "trains on (as the README says)")
    built = re.findall(r"^\s*(\S+): done, (\d+) files", r.output, re.M)
    # an earlier block (the speedrun's own fetch) may have built some already
    kept = re.findall(r"^\s*(\S+): up to date", r.output, re.M)
    assert built + kept and int(m.group(2)) == len(built) + len(kept), r.output
    for source, n in built:
        folder = next(Path(m.group(1)).glob(f"*/{source}"))
        # its count includes the file it keeps out under heldout/
        assert 0 < len(list(folder.glob("*.txt"))) <= int(n), (source, folder)
    assert any((Path(m.group(1)) / "heldout").rglob("*.txt")), "no held-out text"


def check_tokenizer_train(r: Result):
    from tokenizers import Tokenizer

    out = path_in(r, flag(r.argv, "out"))
    vocab = int(flag(r.argv, "vocab-size", 32768))
    assert re.search(rf"trained vocab {vocab} on", r.output), r.output
    assert Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size() == vocab


def check_data_prepare(r: Result):
    out = path_in(r, flag(r.argv, "out"))
    m = re.search(r"train ([\d,]+) docs ([\d,]+) tokens, val ([\d,]+) docs ([\d,]+) tokens", r.output)
    assert m and int(m.group(2).replace(",", "")) > 0 and int(m.group(4).replace(",", "")) > 0, r.output
    assert json.loads((out / "manifest.json").read_text())


def check_pretrain(r: Result):
    steps = int(flag(r.argv, "train.max-steps"))
    m = re.search(r"done \(max_steps\): step (\d+), loss ([\d.]+).*checkpoint (\S+)/checkpoints/step-(\d+)", r.output)
    assert m and int(m.group(1)) == steps == int(m.group(4)), r.output
    if r.launcher == "torchrun":
        nproc = re.search(r"--nproc_per_node[ =](\d+)", r.text).group(1)
        assert f"on {nproc} process(es)" in r.output, r.output
    run = path_in(r, m.group(3))
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    losses = {row["step"]: row["loss"] for row in rows if "loss" in row}
    # rows every log_every steps and at the last one
    assert losses and max(losses) == steps and all(math.isfinite(v) for v in losses.values()), rows
    assert (run / "latest").exists() and (run / "config.yaml").is_file()


def check_sft(r: Result):
    steps = int(flag(r.argv, "train.max-steps"))
    m = re.search(r"done: (\d+) steps, loss ([\d.]+)", r.output)
    assert m and int(m.group(1)) == steps and math.isfinite(float(m.group(2))), r.output
    assert (path_in(r, flag(r.argv, "out", "runs/sft")) / "latest").exists()


def check_chat(r: Result):
    # every reply ends with a newline, even the empty one a 2-step model may give
    assert r.output, "chat wrote no reply"
    lines = screen_lines(r.output)
    if flag(r.argv, "model") is None:
        assert lines, "the default model gave an empty reply"
    calls = [i for i, ln in enumerate(lines) if "<tool_call>" in ln]
    results = [i for i, ln in enumerate(lines) if ln.startswith("[tool result] ")]
    # a tool result only ever answers a call the model wrote before it
    assert all(any(c < i for c in calls) for i in results), lines


def check_index_build(r: Result):
    m = re.search(r"(\S+\.sqlite): (\d+) added", r.output)
    assert m and int(m.group(2)) > 0 and Path(m.group(1)).is_file(), r.output


def check_benchmark_data(r: Result):
    m = re.search(r"^data: .* in (\S+\.jsonl)", r.output, re.M)
    assert m, r.output
    records = [json.loads(ln) for ln in Path(m.group(1)).read_text().splitlines()]
    assert records and all(rec["messages"][-1]["role"] == "assistant" for rec in records)


def check_speedrun(r: Result):
    assert (path_in(r, flag(r.argv, "out", "runs/speedrun")) / "report.md").is_file(), r.output


def check_shown_tool_results(r: Result):
    """What a transcript shows that the weights do not decide: each `<tool_call>` it shows, run
    through the real tool (the command's --tools and --search-index), gives the `[tool result]`
    it shows (up to its `...`)."""
    from lmforge.tools import execute_tool_call, get_tools

    index = flag(r.argv, "search-index")
    tools = get_tools(flag(r.argv, "tools"), **({"index": index} if index else {}))
    shown, checked = r.cmd.shown, 0
    for i, line in enumerate(shown):
        if not line.startswith("<tool_call>"):
            continue
        call = json.loads(line[len("<tool_call>"):].replace("</tool_call>", ""))
        result = execute_tool_call({"function": {"name": call["name"], "arguments": call["arguments"]}}, tools)["content"]
        rest = shown[i + 1:]
        assert rest and rest[0].startswith("[tool result] "), f"README line {r.cmd.line}: a call with no result shown"
        cut = rest.index("...") if "..." in rest else 1
        want = [rest[0][len("[tool result] "):]] + rest[1:cut]
        assert result.splitlines()[: len(want)] == want, f"README line {r.cmd.line}: {call} gives\n{result}"
        checked += 1
    assert checked, f"README line {r.cmd.line}: a tool transcript that shows no tool call"


CHECKS = {
    "pull": check_pull, "fetch": check_fetch, "tokenizer train": check_tokenizer_train,
    "data prepare": check_data_prepare, "pretrain": check_pretrain, "sft": check_sft, "chat": check_chat,
    "index build": check_index_build, "speedrun": check_speedrun,
    "benchmarks/tool_use.py": check_benchmark_data, "benchmarks/tool_use_search.py": check_benchmark_data,
}


# ---------------------------------------------------------------------------------------------
# Running


class Reader:
    """One reader at one terminal: a fresh HOME, the repo root as cwd (mirrored), the venv active."""

    def __init__(self, root: Path):
        self.home = root / "home"
        self.cwd = root / "repo"
        self.home.mkdir(parents=True)
        self.cwd.mkdir()
        for entry in REPO.iterdir():
            if not entry.name.startswith(".") and entry.name not in ("runs", "data", "out") \
                    and not entry.name.endswith(".egg-info"):
                (self.cwd / entry.name).symlink_to(entry)
        for name, content in FILES.items():
            (self.cwd / name).write_text(content)
        env = {k: v for k, v in os.environ.items()
               if k not in ("LMFORGE_HOME", "LMFORGE_MODEL", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME")}
        real_home = Path.home()
        if (real_home / ".npmrc").is_file():
            env.setdefault("NPM_CONFIG_USERCONFIG", str(real_home / ".npmrc"))
        if (real_home / ".config/pip/pip.conf").is_file():
            env.setdefault("PIP_CONFIG_FILE", str(real_home / ".config/pip/pip.conf"))
        venv_bin = Path(sys.executable).parent
        env.update(HOME=str(self.home), PATH=f"{venv_bin}{os.pathsep}{env.get('PATH', '')}",
                   VIRTUAL_ENV=str(venv_bin.parent))
        self.env = env
        self.assignments: list[str] = []
        self.done: dict[int, str | None] = {}  # block line -> None (passed) or why it failed/skipped
        self.timings: dict[int, float] = {}

    def bash(self, script: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-o", "pipefail", "-c", "\n".join(self.assignments + [script])],
                              cwd=self.cwd, env=self.env, input=stdin or "", text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=TIMEOUT_S)

    def run_command(self, cmd: Command) -> Result | None:
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", cmd.text):
            self.assignments.append(cmd.text)
            return None
        text = scale(cmd.text)
        last = segments(text)[-1]
        name, launcher = command_name(last)
        stdin = cmd.stdin if cmd.stdin is not None else (INPUT.get(name) if len(segments(text)) == 1 else None)
        t0 = time.time()
        p = self.bash(text, stdin)
        seconds = time.time() - t0
        where = f"README line {cmd.line}: `{cmd.text}`\nran as: {text}\n"
        assert p.returncode == 0, f"{where}exit {p.returncode}; output ends:\n{p.stdout[-4000:]}"
        assert "Traceback (most recent call last)" not in p.stdout, f"{where}{p.stdout[-4000:]}"
        argv = self.bash(f"printf '%s\\0' {last}").stdout.split("\0")[:-1]
        r = Result(cmd, text, name, launcher, argv, p.stdout, seconds, self.cwd, self.home)
        shape_only = next((why for pat, why in SHAPE_ONLY.items() if re.search(pat, cmd.text)), None)
        if cmd.shown and not shape_only:
            assert shows(cmd.shown, p.stdout), f"{where}the README shows:\n" + "\n".join(cmd.shown) + \
                f"\nbut it printed:\n" + "\n".join(screen_lines(p.stdout)[-40:])
        if cmd.shown and shape_only:
            check_shown_tool_results(r)
        check = lookup(CHECKS, name)
        if check:
            check(r)
        print(f"  {seconds:6.1f} s  {text}")
        if cmd.shown:
            print("".join(f"           | {ln}\n" for ln in screen_lines(p.stdout)[-8:]), end="")
        return r

    def run_python(self, block: Block):
        script, checked = python_script(block.source)
        path = self.home / f"readme_block_{block.line}.py"
        path.write_text(script)
        t0 = time.time()
        p = self.bash(f"python {shlex.quote(str(path))}")
        assert p.returncode == 0, f"README python block at line {block.line}:\n{p.stdout[-4000:]}"
        print(f"  {time.time() - t0:6.1f} s  the python block at README line {block.line}")
        return checked

    def run_block(self, block: Block):
        t0 = time.time()
        if block.lang == "python":
            assert self.run_python(block) >= 1 or "# '" not in block.source
        else:
            for cmd in block.commands:
                if cmd.text:
                    self.run_command(cmd)
        self.timings[block.line] = time.time() - t0

    def run_through(self, block: Block, blocks: list[Block]):
        """Run every earlier block this one's stage allows (once per session), then this one."""
        slow = is_slow(block)
        for b in blocks:
            if b is block:
                break
            if is_slow(b) and not slow:
                continue
            if b.line not in self.done:
                try:
                    self.run_block(b)
                    self.done[b.line] = None
                except pytest.skip.Exception as e:
                    self.done[b.line] = f"skip: {e}"
                except BaseException as e:  # noqa: BLE001 -- a later block reports it as its cause
                    self.done[b.line] = f"fail: {str(e)[:2000]}"
            why = self.done[b.line]
            if why and why.startswith("skip: "):
                pytest.skip(f"an earlier README block (line {b.line}) was skipped: {why[6:]}")
            if why:
                pytest.fail(f"an earlier README block (line {b.line}) failed:\n{why[6:]}", pytrace=False)
        try:
            self.run_block(block)
        except pytest.skip.Exception as e:
            self.done[block.line] = f"skip: {e}"
            raise
        except BaseException as e:
            self.done[block.line] = f"fail: {str(e)[:2000]}"
            raise
        self.done[block.line] = None


def slow_reason(block: Block) -> str | None:
    text = " ".join(c.text for c in block.commands)
    return next((why for pat, why in SLOW.items() if re.search(pat, text)), None)


def is_slow(block: Block) -> bool:
    return slow_reason(block) is not None


BLOCKS = parse_readme(README.read_text())
RUNNABLE = [b for b in BLOCKS if b.lang == "python" or any(c.text for c in b.commands)]


@pytest.fixture(scope="session")
def reader(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    yield Reader(root)
    # the slow blocks leave ~5 GB of checkpoints; failures already carry their output
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id, marks=[pytest.mark.slow] if is_slow(b) else [])
                                   for b in RUNNABLE])
def test_readme_block(block, reader):
    reader.run_through(block, RUNNABLE)


# ---------------------------------------------------------------------------------------------
# The extraction itself, the install commands, and the harness on a made-up README


def test_every_fenced_block_is_run_or_is_the_install():
    kinds = {b.lang for b in BLOCKS}
    assert kinds <= {"bash", "transcript", "python"}, f"blocks this test does not run: {kinds}"
    assert [b for b in BLOCKS if b.lang == "transcript"], "no transcripts found"
    for b in BLOCKS:
        if b.lang != "python":
            assert b.commands, f"README line {b.line}: a block with no command"
    names = {command_name(segments(scale(c.text))[-1])[0] for b in RUNNABLE for c in b.commands if c.text}
    assert {"pull", "chat", "fetch", "tokenizer train", "data prepare", "pretrain", "sft"} <= names, names
    assert sum(1 for b in RUNNABLE if not is_slow(b)) >= 4


def test_install_commands_are_what_ci_runs():
    """Not re-run here: CI runs them in a fresh venv before any test starts."""
    installs = [c for b in BLOCKS for c in b.commands if c.install]
    ci_lines = [ln.strip() for ln in CI_RUN.read_text().splitlines()]
    test_cmd = [c for c in installs if c.install[-1] == "python -m pytest"]
    assert len(test_cmd) == 1 and " && ".join(test_cmd[0].install) in ci_lines, "the README's test command is not .ci/run's"
    ci = test_cmd[0].install
    for c in installs:
        if c is not test_cmd[0]:
            assert c.install == [s.replace('-e ".[test]"', "-e .") for s in ci[: len(c.install)]], c.install


def test_harness_parses_scales_and_matches():
    md = "\n".join([
        "```bash", "X=~/d   # a comment", "lmforge pretrain --config recipes/pretrain/gpu-gpt2-small.yaml \\",
        "  --data.dir DIR_OF_TEXT  # -> runs/x", "python3 -m venv .venv && pip install -e . && lmforge pull", "```",
        "```", "$ echo 'a # b' | lmforge chat", "> hi", "hello", "...", "bye", "```",
        "```", "not a transcript", "```",
        "```python", "'a' + 'b'   # 'ab'", "x = 1  # 'no'", "```"])
    b = parse_readme(md)
    assert [x.lang for x in b] == ["bash", "transcript", "text", "python"]
    cmds = b[0].commands
    assert cmds[0].text == "X=~/d" and cmds[1].line == 3 and cmds[1].text.endswith("--data.dir DIR_OF_TEXT")
    assert cmds[2].install == ["python3 -m venv .venv", "pip install -e ."] and cmds[3].text == "lmforge pull"
    t = b[1].commands[0]
    assert (t.text, t.stdin, t.shown) == ("echo 'a # b' | lmforge chat", "hi\n", ["hello", "...", "bye"])
    s = scale(cmds[1].text)
    assert s.startswith("lmforge pretrain --config recipes/pretrain/gpu-gpt2-small.yaml --data.dir ~/.cache/lmforge/data/")
    assert s.endswith("--train.compile false --data.heldout tests/data/heldout_prose.txt") and "--train.max_steps 2" in s
    assert scale(t.text) == "echo 'a # b' | lmforge chat --max-new-tokens 64"
    tr = scale("torchrun --standalone --nproc_per_node 8 -m lmforge.cli.main pretrain --config c.yaml")
    assert tr.startswith("torchrun --standalone --nproc_per_node 2 -m lmforge.cli.main pretrain --config c.yaml --out runs/torchrun")
    assert command_name("torchrun --nproc_per_node 2 -m lmforge.cli.main data prepare --x 1") == ("data prepare", "torchrun")
    assert command_name("python benchmarks/t.py --stage data") == ("benchmarks/t.py", None)
    assert shows(["hello", "...", "bye"], "warn\nhello\nx\r50%\ry\nbye\n")
    assert not shows(["hello", "bye"], "hello\nx\nbye\n") and not shows(["bye", "...", "hello"], "hello\nbye\n")
    script, checked = python_script(b[3].source)
    assert checked == 1 and "assert _got == 'ab'" in script and "x = 1" in script
