"""The tool adapter lmforge ships for the default model, used whenever tools are.

SmolLM2-135M-Instruct never calls a tool on its own. `lmforge/adapters/tools/` holds a small
LoRA adapter (PEFT layout) that lmforge trained to call the calculator, the Python sandbox and
the search tool (`benchmarks/tool_adapter.py`; its command and result JSON are in that folder).
`LM.chat_with_tools` (and so `lmforge chat --tools`) switches it on for the default model:

    with tool_adapter(model):      # attached once, unmerged: a GGUF's blocks stay as they are
        ...                        # generate with tools
    # outside: the adapter is off, the model answers as the file says

LMFORGE_TOOL_ADAPTER=0 turns this off; a model that is not the default one is left alone.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

ADAPTER_DIR = Path(__file__).resolve().parents[1] / "adapters" / "tools"


def shipped_tool_adapter() -> Path | None:
    """The shipped adapter's folder, when the package has its weights."""
    return ADAPTER_DIR if (ADAPTER_DIR / "adapter_model.safetensors").exists() else None


def is_default_model(model) -> bool:
    """Whether `model` was loaded from the default model's own file."""
    from lmforge.loading.resolve import default_model_path

    src, default = getattr(model, "source_path", None), default_model_path()
    return bool(src) and default is not None and Path(src).resolve() == default.resolve()


def _wanted(model) -> bool:
    if os.environ.get("LMFORGE_TOOL_ADAPTER", "1") in ("0", "false", "off", ""):
        return False
    return shipped_tool_adapter() is not None and is_default_model(model)


def attach_tool_adapter(model) -> bool:
    """Wrap the default model's layers with the shipped adapter (once; switched off until used).
    False when it does not apply (another model, turned off, or an adapter already there)."""
    from lmforge.finetune.lora import lora_layers, load_adapter, set_adapters_enabled

    if getattr(model, "tool_adapter", False):
        return True
    if not _wanted(model) or lora_layers(model):
        return False
    load_adapter(model, ADAPTER_DIR)
    set_adapters_enabled(model, False)
    model.eval()
    model.tool_adapter = True
    print("(tools: the default model runs with lmforge's tool adapter; LMFORGE_TOOL_ADAPTER=0 turns it off)",
          file=sys.stderr, flush=True)
    return True


@contextmanager
def tool_adapter(model):
    """The shipped adapter on inside the block when `model` is the default one; else nothing."""
    from lmforge.finetune.lora import set_adapters_enabled

    if not attach_tool_adapter(model):
        yield False
        return
    set_adapters_enabled(model, True)
    try:
        yield True
    finally:
        set_adapters_enabled(model, False)
