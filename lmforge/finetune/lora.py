"""LoRA: low-rank adapters on linear layers, saved and loaded in PEFT's layout.

    params = apply_lora(model, LoraSettings(r=16, alpha=32, targets="all-linear"))
    ...train params...
    save_adapter(model, "out/", base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    load_adapter(model2, "out/")             # or an adapter PEFT wrote
    merge_lora(model2)                        # plain nn.Linear again, ready for save_hf

`LoRALinear` mirrors PEFT's module: the frozen layer is `base_layer`, the adapter is `lora_A`
(r x in) and `lora_B` (out x r), y = base(x) + B(A(dropout(x))) * scaling with scaling = alpha/r
(alpha/sqrt(r) with rsLoRA). So `model.layers.3.self_attn.q_proj.lora_A.weight` in our state
dict is `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` in PEFT's
`adapter_model.safetensors`, and the same tensors give the same logits in both.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from lmforge.errors import LmforgeError

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
TARGET_SHORTCUTS = {"attention": ATTN, "attn": ATTN, "mlp": MLP, "all-linear": ATTN + MLP, "all": ATTN + MLP}
PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class LoraSettings:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    # names (suffixes of module paths), shortcuts (attention, mlp, all-linear), comma-separated ok
    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    rslora: bool = False  # scaling alpha/sqrt(r) instead of alpha/r (rank-stabilized LoRA)

    def scaling(self, r: int | None = None, alpha: float | None = None) -> float:
        r = r or self.r
        alpha = self.alpha if alpha is None else alpha
        return alpha / math.sqrt(r) if self.rslora else alpha / r


def resolve_targets(targets) -> list[str]:
    """Module-name suffixes to adapt, with the shortcuts expanded."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    out: list[str] = []
    for t in targets:
        for name in TARGET_SHORTCUTS.get(t, (t,)):
            if name not in out:
                out.append(name)
    if not out:
        raise LmforgeError("no LoRA target modules given (e.g. --lora.targets attention,mlp)")
    return out


class LoRALinear(nn.Module):
    """A frozen linear layer (`base_layer`: nn.Linear or a quantized one) plus a trainable
    low-rank update."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        if r <= 0:
            raise LmforgeError(f"LoRA rank must be positive, got {r}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        dev = _device_of(base_layer)
        # the adapter lives in fp32 whatever the base's dtype (QLoRA: int8/4-bit base)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=dev, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        # per row of the batch, 1 where the update applies (a server batch mixing requests with and
        # without the adapter: `set_adapter_rows`); None: every row
        self.row_gate: torch.Tensor | None = None
        self.reset_lora()

    def reset_lora(self) -> None:
        # PEFT's default init: A as nn.Linear (Kaiming-uniform), B zero, so the update starts at 0
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged or self.disabled:
            return y
        a = self.lora_A.weight
        # under autocast the matmuls run in the autocast dtype; otherwise the adapter's fp32
        h = self.lora_dropout(x if _autocast_on(x.device.type) else x.to(a.dtype))
        delta = self.lora_B(self.lora_A(h)) * self.scaling
        if self.row_gate is not None:
            delta = delta * self.row_gate.to(delta.device, delta.dtype).view(-1, *([1] * (delta.dim() - 1)))
        return y + delta.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """B @ A * scaling, the change the adapter makes to the base weight (fp32)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def base_weight(self) -> torch.Tensor:
        b = self.base_layer
        return b.dequantize() if hasattr(b, "dequantize") else b.weight

    def merge(self) -> None:
        """Fold the update into a plain base weight (in place); forward then skips the adapter."""
        if self.merged:
            return
        if not isinstance(self.base_layer, nn.Linear):
            raise LmforgeError("cannot merge into a quantized base in place; use merged_linear()")
        with torch.no_grad():
            w = self.base_layer.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        with torch.no_grad():
            w = self.base_layer.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    def merged_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A new nn.Linear holding base + update (works for quantized bases too)."""
        w = self.base_weight().float() + (0 if self.merged else self.delta_weight())
        bias = getattr(self.base_layer, "bias", None)
        dtype = dtype or (self.base_layer.weight.dtype if isinstance(self.base_layer, nn.Linear) else torch.float32)
        lin = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=w.device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(w.to(dtype))
            if bias is not None:
                lin.bias.copy_(bias.detach().to(dtype))
        lin.weight.requires_grad_(False)
        return lin

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, rslora={self.rslora}"


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast weights only; buffers such as RoPE frequencies keep their fp32 precision."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta, in the device guard test)
        return False


def _device_of(module: nn.Module):
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return None


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def _is_linear_like(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or getattr(m, "is_quantized_linear", False)


def target_module_names(model: nn.Module, targets, layers: list[int] | None = None) -> list[str]:
    """Paths of the linear layers LoRA will wrap: names ending in a target, never the output head."""
    names = resolve_targets(targets)
    out = []
    for path, m in model.named_modules():
        if not _is_linear_like(m) or path == "lm_head" or path.endswith(".base_layer"):
            continue
        if path.split(".")[-1] in names or any(path.endswith("." + n) or path == n for n in names):
            if layers is not None and _layer_index(path) not in layers:
                continue
            out.append(path)
    if not out:
        raise LmforgeError(f"no linear layer matches LoRA targets {names}")
    return out


def _layer_index(path: str) -> int | None:
    m = re.search(r"\blayers\.(\d+)\.", path)
    return int(m.group(1)) if m else None


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def apply_lora(model: nn.Module, settings: LoraSettings, paths: list[str] | None = None,
               ranks: dict[str, int] | None = None, alphas: dict[str, float] | None = None) -> list[nn.Parameter]:
    """Freeze the model and wrap the target layers; return the trainable adapter parameters."""
    freeze(model)
    paths = paths if paths is not None else target_module_names(model, settings.targets)
    params = []
    for path in paths:
        m = model.get_submodule(path)
        if isinstance(m, LoRALinear):
            raise LmforgeError(f"{path} already has a LoRA adapter")
        r = (ranks or {}).get(path, settings.r)
        alpha = (alphas or {}).get(path, settings.alpha)
        lora = LoRALinear(m, r, alpha, settings.dropout, settings.rslora)
        lora.train(m.training)  # a new module defaults to training mode (dropout on); follow the model
        _set_module(model, path, lora)
        params += [lora.lora_A.weight, lora.lora_B.weight]
    model.lora_settings = settings
    return params


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {p: m for p, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_layers(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every adapter off (the base model's outputs) or on again."""
    for m in lora_layers(model).values():
        m.disabled, m.row_gate = not enabled, None


def set_adapter_rows(model: nn.Module, rows: list[bool]) -> None:
    """Adapters on for the rows of the next forward marked True and off for the others (all on,
    all off, or a gate per row when a batch mixes both)."""
    layers = lora_layers(model).values()
    mixed = any(rows) and not all(rows)
    # made once where the adapters live, not copied there by every layer at every step
    gate = torch.tensor(rows, dtype=torch.float32, device=next(iter(layers)).lora_A.weight.device) if mixed and layers else None
    for m in layers:
        m.disabled, m.row_gate = not any(rows), gate


def merge_lora(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding base + update (in place)."""
    for path, m in list(lora_layers(model).items()):
        _set_module(model, path, m.merged_linear(dtype))
    if hasattr(model, "lora_settings"):
        del model.lora_settings
    return model


# -- PEFT files -------------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's saved key names."""
    out = {}
    for path, m in lora_layers(model).items():
        out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = m.lora_A.weight.detach().float().contiguous().cpu()
        out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = m.lora_B.weight.detach().float().contiguous().cpu()
    return out


def peft_config_dict(model: nn.Module, base_model: str | None, settings: LoraSettings | None = None) -> dict:
    """adapter_config.json with the fields PEFT (0.21) writes for a plain LoRA."""
    settings = settings or getattr(model, "lora_settings", None) or LoraSettings()
    layers = lora_layers(model)
    short = sorted({p.split(".")[-1] for p in layers})
    ranks = {p: m.r for p, m in layers.items()}
    alphas = {p: m.alpha for p, m in layers.items()}
    # a module whose rank/alpha differs from the default is listed by path, as PEFT's patterns do
    rank_pattern = {p: r for p, r in ranks.items() if r != settings.r}
    alpha_pattern = {p: a for p, a in alphas.items() if a != settings.alpha}
    return {
        "alpha_pattern": alpha_pattern,
        "auto_mapping": None,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": settings.alpha if float(settings.alpha) != int(settings.alpha) else int(settings.alpha),
        "lora_bias": False,
        "lora_dropout": settings.dropout,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": settings.r,
        "rank_pattern": rank_pattern,
        "revision": None,
        "target_modules": short,
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": settings.rslora,
    }


def save_adapter(model: nn.Module, out_dir: str | Path, base_model: str | None = None,
                 settings: LoraSettings | None = None) -> Path:
    """Write adapter_model.safetensors + adapter_config.json (+ a short README) as PEFT does."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(model)
    if not state:
        raise LmforgeError("the model has no LoRA adapter to save")
    cfg = peft_config_dict(model, base_model, settings)
    from lmforge.finetune.lora_layouts import layout, to_checkpoint_layout

    from lmforge.finetune.lora_layouts import vlm_checkpoint_layout
    from lmforge.loading.state_maps import is_vlm

    if is_vlm(model):  # Idefics3 / SmolVLM: the text model under model.text_model
        state, cfg = vlm_checkpoint_layout(state, cfg, PEFT_PREFIX)
    elif layout(getattr(model, "cfg", None)) is not None:  # Phi-3, GPT-2: their checkpoints' layers
        state, cfg = to_checkpoint_layout(model, lora_layers(model), state, cfg, PEFT_PREFIX)
    save_file(state, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "README.md").write_text(
        f"---\nbase_model: {base_model or ''}\nlibrary_name: peft\n---\n\n"
        f"LoRA adapter (r={cfg['r']}, alpha={cfg['lora_alpha']}, targets {', '.join(sorted({p.split('.')[-1] for p in lora_layers(model)}))}) "
        "written by lmforge in PEFT's layout.\n\n"
        "    lmforge chat --model THIS_FOLDER\n    lmforge merge --adapter THIS_FOLDER --out merged/\n"
    )
    return out


def is_adapter_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / ADAPTER_CONFIG).exists()


def read_adapter_config(adapter_dir: str | Path) -> dict:
    p = Path(adapter_dir) / ADAPTER_CONFIG
    if not p.exists():
        raise LmforgeError(f"no {ADAPTER_CONFIG} in {adapter_dir}")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{p} is not valid JSON: {e}") from None
    return cfg


def _check_peft_config(cfg: dict, where: str, conv1d: bool = False) -> None:
    """Refuse what would change the math and is not supported here (say which field).
    `conv1d`: the base is GPT-2, whose Conv1D layers PEFT marks fan_in_fan_out (same math)."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise LmforgeError(f"{where}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    checks = [
        ("use_dora", False, "DoRA"), ("fan_in_fan_out", False, "fan_in_fan_out (Conv1D layers)"),
        ("bias", "none", "trained biases"), ("lora_bias", False, "lora_bias"),
    ]
    for key, ok, what in checks:
        if key == "fan_in_fan_out" and conv1d:
            continue
        if cfg.get(key, ok) not in (ok, None):
            raise LmforgeError(f"{where}: {key}={cfg[key]!r} ({what}) is not supported")
    for key in ("modules_to_save", "layer_replication", "target_parameters", "trainable_token_indices"):
        if cfg.get(key):
            raise LmforgeError(f"{where}: {key} is set; adapters that train extra modules are not supported")
    if cfg.get("use_qalora") or cfg.get("use_bdlora"):
        raise LmforgeError(f"{where}: QA-LoRA / BD-LoRA variants are not supported")


def _pattern_value(patterns: dict, path: str, default):
    """PEFT's rank/alpha patterns: a key matches a module whose path ends with it (regex)."""
    for key, val in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return val
    return default


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> LoraSettings:
    """Wrap the model's layers with the adapter in `adapter_dir` (ours or PEFT's) and load it."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    where = str(adapter_dir / ADAPTER_CONFIG)
    _check_peft_config(cfg, where, conv1d=(getattr(model, "cfg", None) is not None
                                           and model.cfg.extra.get("model_type") == "gpt2"))
    wfile = adapter_dir / ADAPTER_WEIGHTS
    if wfile.exists():
        tensors = load_file(str(wfile))
    elif (adapter_dir / "adapter_model.bin").exists():
        tensors = torch.load(adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise LmforgeError(f"no {ADAPTER_WEIGHTS} in {adapter_dir}")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
        if not m:
            raise LmforgeError(f"{wfile}: unsupported tensor '{key}' (only lora_A/lora_B weights of linear layers)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    alpha_of = {}  # a Phi-3/GPT-2 layer's alpha, for the parts it is split into
    from lmforge.finetune.lora_layouts import from_checkpoint_layout, layout
    from lmforge.loading.state_maps import is_vlm, vlm_path

    if is_vlm(model):
        pairs = {vlm_path(p, to_checkpoint=False): ab for p, ab in pairs.items()}
        cfg = dict(cfg, alpha_pattern={vlm_path(k, False): v for k, v in (cfg.get("alpha_pattern") or {}).items()})
    elif layout(getattr(model, "cfg", None)) is not None:
        pairs, alpha_of = from_checkpoint_layout(pairs, model.cfg, cfg, float(cfg.get("lora_alpha", 8)), _pattern_value)
    settings = LoraSettings(r=int(cfg.get("r", 8)), alpha=float(cfg.get("lora_alpha", 8)),
                            dropout=float(cfg.get("lora_dropout", 0.0) or 0.0),
                            targets=sorted({p.split(".")[-1] for p in pairs}), rslora=bool(cfg.get("use_rslora", False)))
    ranks, alphas = {}, {}
    modules = dict(model.named_modules())
    for path, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise LmforgeError(f"{wfile}: {path} has only {', '.join(ab)}")
        target = modules.get(path)
        if target is None or not _is_linear_like(target):
            raise LmforgeError(f"{wfile}: the adapter targets '{path}', which is not a linear layer of this model")
        r = ab["lora_A"].shape[0]
        if tuple(ab["lora_A"].shape) != (r, target.in_features) or tuple(ab["lora_B"].shape) != (target.out_features, r):
            raise LmforgeError(f"{wfile}: shapes of {path} ({tuple(ab['lora_A'].shape)}, {tuple(ab['lora_B'].shape)}) do not fit a "
                               f"{target.in_features}->{target.out_features} layer")
        ranks[path] = r
        alphas[path] = alpha_of.get(path) or float(_pattern_value(cfg.get("alpha_pattern"), path, settings.alpha))
    apply_lora(model, settings, paths=sorted(pairs), ranks=ranks, alphas=alphas)
    layers = lora_layers(model)
    with torch.no_grad():
        for path, ab in pairs.items():
            layers[path].lora_A.weight.copy_(ab["lora_A"].float())
            layers[path].lora_B.weight.copy_(ab["lora_B"].float())
    model.lora_settings = settings
    return settings


def load_adapter_model(adapter_dir: str | Path, base: str | None = None, dtype="fp32", device="cpu",
                       merge: bool = True):
    """(model, tokenizer): the base the adapter names (or `base`) with the adapter applied.

    `merge=True` folds it into plain weights, so inference runs at the base model's speed.
    """
    from lmforge.loading import load_model

    adapter_dir = Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    base = base or cfg.get("base_model_name_or_path")
    if not base:
        raise LmforgeError(f"{adapter_dir / ADAPTER_CONFIG} names no base model; pass the base with --model")
    base_path = Path(str(base)).expanduser()
    if not base_path.is_absolute() and not base_path.exists() and (adapter_dir / base_path).exists():
        base = str(adapter_dir / base_path)
    # merge in fp32, then cast: a bf16 base plus a small update loses the update to rounding
    model, tok = load_model(base, dtype="fp32", device=device)
    if (adapter_dir / "tokenizer.json").exists():  # a checkpoint may carry its own chat template
        from lmforge.tokenizer import Tokenizer

        tok = Tokenizer.from_dir(adapter_dir)
    load_adapter(model, adapter_dir)
    if merge:
        from lmforge.loading.load import parse_dtype

        merge_lora(model)
        cast_parameters(model, parse_dtype(dtype))
    model.eval()
    model.adapter_path = str(adapter_dir)
    return model, tok
