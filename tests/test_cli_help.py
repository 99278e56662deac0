"""`--help` that teaches (every dotted flag with type, default and its source comment, by
section, no dataclass reprs), near-match suggestions for unknown flags, commands in docs and
recipes that parse, and the perplexity window defaulting to the model's context."""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import re
import shlex
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import run_cli, tiny_config
from test_eval_scoring import byte_tokenizer
from lmforge.cli.main import available_commands
from lmforge.config import _is_optional, parse_args
from lmforge.errors import LmforgeError

ROOT = Path(__file__).resolve().parents[1]


def command_configs() -> list[tuple[list[str], type]]:
    """(argv before --help, config class) for every command and subcommand in the CLI's registry."""
    out = []
    for name in available_commands():
        module = importlib.import_module(f"lmforge.cli.commands.{name.replace('-', '_')}")
        subs = getattr(module, "SUBCOMMANDS", None)
        if subs:
            out += [([name, sub], cls) for sub, (cls, _) in subs.items()]
        else:
            out.append(([name], module.Config))
    return out


COMMANDS = command_configs()


def trailing_comments(cls) -> dict[str, str]:
    """`name: type = ...  # comment` lines of cls's own body, read with a plain regex (an
    independent check of what --help should show)."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    out = {}
    for line in src.splitlines():
        m = re.match(r"^    (\w+): [^#]*?\s{2}#\s*(.+)$", line)
        if m and not m.group(2).startswith(("noqa", "type:")):
            out[m.group(1)] = m.group(2).strip()
    return out


def expected_comment(cls, name: str) -> str | None:
    """The trailing comment of the first class in the MRO that declares field `name`."""
    for c in cls.__mro__:
        if name in c.__dict__.get("__annotations__", {}):
            return trailing_comments(c).get(name)
    return None


def leaf_fields(cls, prefix=""):
    """(dotted name, declaring config class, field) of every leaf flag, walked independently."""
    hints = __import__("typing").get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("positional"):
            continue
        inner = _is_optional(hints[f.name])[1]
        if isinstance(inner, type) and dataclasses.is_dataclass(inner):
            yield from leaf_fields(inner, prefix + f.name + ".")
        else:
            yield prefix + f.name, cls, f


def flag_block(help_text: str, dashed: str) -> str:
    """The flag's row plus its wrapped continuation lines, whitespace collapsed."""
    lines = help_text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"  --{dashed} "):
            block = [line]
            for nxt in lines[i + 1:]:
                if not nxt.startswith("   "):  # continuation lines are indented deeper than rows
                    break
                block.append(nxt)
            return " ".join(" ".join(block).split())
    raise AssertionError(f"--{dashed} is not in the help")


@pytest.mark.parametrize("argv,cls", COMMANDS, ids=[" ".join(a) for a, _ in COMMANDS])
def test_help_lists_every_dotted_flag_with_its_description_and_no_reprs(capsys, argv, cls):
    r = run_cli(capsys, *argv, "--help")
    assert r.returncode == 0, r.stderr
    text = r.stdout
    # no dataclass reprs, type objects or typing noise
    for bad in ("Config(", "Args(", "Settings(", "<class", "typing.", "NoneType"):
        assert bad not in text, f"{' '.join(argv)} --help shows {bad!r}"
    assert not re.search(r"\b\w+\(\w+=", text), re.search(r".*\b\w+\(\w+=.*", text).group(0)
    for dotted, owner, f in leaf_fields(cls):
        block = flag_block(text, dotted.replace("_", "-"))
        assert "(default: " in block, block
        want = expected_comment(owner, f.name) or f.metadata.get("help")
        if want:
            assert " ".join(want.split()) in block, f"--{dotted}: {want!r} missing from {block!r}"


def test_every_command_has_a_section_group_per_nested_config(capsys):
    from lmforge.config import flag_sections

    for argv, cls in COMMANDS:
        text = run_cli(capsys, *argv, "--help").stdout
        headers = [line.split(":")[0] for line in text.splitlines() if re.match(r"^[a-z][\w.]*:", line)]
        nested = [s.name for s in flag_sections(cls) if s.name]
        assert [h for h in headers if h not in ("usage", "options", "arguments", "subcommands")] == nested, argv


def test_sft_pretrain_rl_help_teach_the_nested_flags(capsys):
    sft = run_cli(capsys, "sft", "--help").stdout
    assert "SFTTrainConfig" not in sft and "lr=0.0002" not in sft
    assert "0 = derived from --epochs (default: 0)" in flag_block(sft, "train.max-steps")
    assert "(default: 0.0002)" in flag_block(sft, "train.lr")
    assert "{full,lora,qlora}" in flag_block(sft, "method")
    assert "micro-batches per optimizer step" in flag_block(sft, "train.grad-accum")  # inherited from TrainConfig
    # flags sit under their section's header
    lines = sft.splitlines()
    train_at = next(i for i, l in enumerate(lines) if l.startswith("train:"))
    assert any(l.startswith("  --train.max-steps int") for l in lines[train_at:])
    assert not any(l.startswith("  --train.") for l in lines[:train_at])

    pre = run_cli(capsys, "pretrain", "--help").stdout
    assert "(default: 0.003)" in flag_block(pre, "train.lr")  # the section's default_factory, not the class default
    assert "number of layers (default: 4)" in flag_block(pre, "model.depth")
    assert "Model shape from a depth dial" in pre  # the section's docstring heads its group

    rl = run_cli(capsys, "rl", "--help").stdout
    assert "completions sampled per prompt" in flag_block(rl, "grpo.group-size")
    assert "(default: constant)" in flag_block(rl, "train.schedule")


def test_subcommand_overview_lists_subcommands(capsys):
    r = run_cli(capsys, "data", "--help")
    assert r.returncode == 0 and "prepare" in r.stdout and "lmforge data <subcommand> --help" in r.stdout


def test_metadata_help_is_the_fallback(capsys):
    text = run_cli(capsys, "fetch", "--help").stdout
    assert "show each source's status and exit (default: false)" in flag_block(text, "list")


def _one_line_error(r) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_unknown_flag_names_the_nearest_flag(capsys):
    assert _one_line_error(run_cli(capsys, "sft", "--train.max_stpes", "5")) == \
        "error: unknown option '--train.max_stpes' (did you mean --train.max_steps?)"
    # the spelling the user typed comes back (the parser takes - and _ alike)
    assert _one_line_error(run_cli(capsys, "sft", "--train.max-stpes", "5")) == \
        "error: unknown option '--train.max-stpes' (did you mean --train.max-steps?)"
    # a key given without its section
    assert "(did you mean --train.max-steps?)" in _one_line_error(run_cli(capsys, "sft", "--max-steps", "5"))
    assert "(did you mean --model.depth?)" in _one_line_error(run_cli(capsys, "pretrain", "--depth", "3"))
    assert "(did you mean --train.lr?)" in _one_line_error(run_cli(capsys, "pretrain", "--trian.lr", "1"))
    assert "(did you mean --data?)" in _one_line_error(run_cli(capsys, "data", "prepare", "--dat", "x"))
    # nothing near: no guess, and no wall of every flag either
    far = _one_line_error(run_cli(capsys, "sft", "--zzzzqq", "1"))
    assert "did you mean" not in far and "`lmforge sft --help`" in far and "--train.lr" not in far
    assert "did you mean `lmforge pretrain`" in _one_line_error(run_cli(capsys, "pretrian"))


def test_unknown_keys_in_code_and_recipes_suggest_too(tmp_path):
    from lmforge.finetune.sft import SFTConfig

    with pytest.raises(LmforgeError, match=r"did you mean --train\.max_steps\?"):
        parse_args(SFTConfig, ["--train.max_stpes", "5"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  max_stpes: 5\n")
    with pytest.raises(LmforgeError, match=r"unknown config key 'train.max_stpes' \(did you mean 'train.max_steps'\?"):
        parse_args(SFTConfig, ["--config", str(recipe)])


# -- docs and recipes name real commands -----------------------------------------------------------

def _parse_command_line(line: str):
    """Parse (not run) one `lmforge ...` line with the CLI's own config classes."""
    words = shlex.split(line.split("  #")[0])
    assert words[0] == "lmforge"
    name, rest = words[1], words[2:]
    module = importlib.import_module(f"lmforge.cli.commands.{name.replace('-', '_')}")
    subs = getattr(module, "SUBCOMMANDS", None)
    if subs:
        cls, rest = subs[rest[0]][0], rest[1:]
    else:
        cls = module.Config
    return parse_args(cls, rest, prog=name)


def test_recipe_and_data_doc_commands_parse():
    recipe = (ROOT / "recipes/pretrain/cpu-1h.yaml").read_text()
    cmds = [l.lstrip("# ").strip() for l in recipe.splitlines() if re.match(r"^#\s+lmforge ", l)]
    assert any(c.startswith("lmforge fetch") for c in cmds)
    for c in cmds:
        _parse_command_line(c)
    fetch = _parse_command_line(next(c for c in cmds if c.startswith("lmforge fetch")))
    assert fetch.sources == ["english"]
    doc = (ROOT / "docs/DATA.md").read_text()
    fetches = re.findall(r"^(lmforge fetch[^\n]*)$", doc, re.M)
    assert len(fetches) >= 3
    for c in fetches:
        _parse_command_line(c)


def test_fetch_help_points_to_a_file_in_the_repo(capsys):
    text = run_cli(capsys, "fetch", "--help").stdout
    assert "docs/DATA.md" in text and "shared/DATA.md" not in text
    assert (ROOT / "docs/DATA.md").is_file()
    from lmforge.data import fetch as F

    assert "shared/" not in (F.__doc__ or "")
    doc = (ROOT / "docs/DATA.md").read_text()
    for name in list(F.SOURCES) + list(F.GROUPS):  # every --sources name is documented
        assert f"`{name}`" in doc, name


# -- perplexity: window = the model's context, stride = half of it, unless set ------------------

@pytest.fixture(scope="module")
def ctx64():
    from lmforge.model import Transformer

    torch.manual_seed(0)
    return Transformer(tiny_config(vocab_size=260, max_seq_len=64)).init_weights(seed=0).eval(), byte_tokenizer()


TEXT = "the quick brown fox jumps over the lazy dog. " * 6  # 270 bytes: several windows of 64


def test_perplexity_window_defaults_to_the_context(ctx64):
    from lmforge.eval.perplexity import perplexity

    model, tok = ctx64
    r = perplexity(model, tok, [TEXT])
    assert (r.window, r.stride, r.notes) == (64, 32, [])
    assert r.tokens == len(TEXT.encode())  # every byte token scored once
    same = perplexity(model, tok, [TEXT], window=64, stride=32)
    assert math.isclose(r.nll, same.nll, rel_tol=1e-9)


def test_a_window_above_the_context_is_clipped_with_a_note(ctx64):
    from lmforge.eval.perplexity import perplexity, resolve_window

    model, tok = ctx64
    notes = []
    r = perplexity(model, tok, [TEXT], window=1024, log=notes.append)
    assert (r.window, r.stride) == (64, 32) and r.tokens == len(TEXT.encode())
    assert notes == r.notes and "context (64 tokens)" in notes[0]
    # a stride that only fitted the unclipped window becomes half the clipped one
    r = perplexity(model, tok, [TEXT], window=256, stride=128)
    assert (r.window, r.stride) == (64, 32) and len(r.notes) == 2
    # a stride the user set inside the window is kept
    assert resolve_window(64, 200, 16)[:2] == (64, 16)
    assert resolve_window(64, 48, None) == (48, 24, [])
    with pytest.raises(LmforgeError, match="stride must be between 1 and the window"):
        resolve_window(64, 48, 60)  # the user's own window, not clipped: a stride above it is an error


def test_eval_ppl_task_on_a_small_context_model_uses_its_context(ctx64, tmp_path):
    """`lmforge eval --tasks ppl:val.txt` on a model with a 64-token context: the runner's
    default window (1024) no longer ends in "stride must be between 1 and the window"."""
    from lmforge.eval.perplexity import perplexity
    from lmforge.eval.runner import EvalSettings, LocalBackend, evaluate

    model, tok = ctx64
    txt = tmp_path / "val.txt"
    txt.write_text(TEXT)
    run, samples = evaluate(settings=EvalSettings(tasks=f"ppl:{txt}"), backend=LocalBackend(model, tok),
                            model_id="tiny", progress=False)
    ppl = next(t for t in run["tasks"] if t["kind"] == "perplexity")
    want = perplexity(model, tok, [TEXT])
    assert math.isclose(ppl["metrics"]["bits_per_byte"]["value"], want.bits_per_byte, rel_tol=1e-6)
