"""The model equals transformers' Llama on the same weights (transformers is only the reference)."""
import pytest
import torch

from lmforge.loading import save_hf
from lmforge.loading.load import build_model
from lmforge.model import Transformer
from tests.conftest import tiny_config

transformers = pytest.importorskip("transformers")


def hf_from_ours(model, tmp_path):
    save_hf(model, None, tmp_path)
    return transformers.AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(tie_embeddings=True, n_kv_heads=1),
        dict(n_kv_heads=4, rope_theta=500000.0,
             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 32}),
        dict(attention_bias=True, head_dim=32),
    ],
    ids=["gqa", "tied-mqa", "llama3-rope", "bias-headdim"],
)
def test_tiny_random_logits_equal_transformers(kw, tmp_path):
    cfg = tiny_config(**kw)
    ours = Transformer(cfg).init_weights(seed=1).eval()
    if cfg.attention_bias:  # random biases so they matter
        with torch.no_grad():
            for n, p in ours.named_parameters():
                if n.endswith("bias"):
                    p.normal_(0, 0.1)
    ref = hf_from_ours(ours, tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (2, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(ids) - ref(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_left_padded_batch_equals_transformers(tmp_path):
    cfg = tiny_config()
    ours = Transformer(cfg).init_weights(seed=2).eval()
    ref = hf_from_ours(ours, tmp_path)
    lens = [40, 25, 7]
    T = max(lens)
    ids = torch.randint(3, cfg.vocab_size, (3, T), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(3, T, dtype=torch.long)
    for b, n in enumerate(lens):
        mask[b, T - n:] = 1
        ids[b, : T - n] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ours(ids, positions=pos, attention_mask=mask)
        r = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        # each row alone, unpadded, gives the same logits on its real tokens
        for b, n in enumerate(lens):
            alone = ours(ids[b : b + 1, T - n:])
            assert (alone[0] - a[b, T - n:]).abs().max().item() <= 1e-4
    real = mask.bool()
    assert (a[real] - r[real]).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def hf_default(default_model_path):
    """transformers' own GGUF loader (its own dequantization and Q/K un-permutation)."""
    pytest.importorskip("gguf")
    return transformers.AutoModelForCausalLM.from_pretrained(
        default_model_path.parent, gguf_file=default_model_path.name, torch_dtype=torch.float32
    ).eval()


def test_default_model_long_prompt_equals_transformers(default_lm, hf_default):
    text = ("The history of the city begins with a small settlement on the river. " * 60)
    ids = default_lm.tokenizer.encode(text)[:600]
    assert len(ids) > 512
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (default_lm.model(x) - hf_default(x).logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_default_model_left_padded_batch_equals_transformers(default_lm, hf_default):
    tok = default_lm.tokenizer
    texts = ["What is the capital of France?", "Write a haiku about the sea, please, with care."]
    rows = [tok.encode(t) for t in texts]
    T = max(map(len, rows))
    ids = torch.full((2, T), tok.pad_id)
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = torch.tensor(r)
        mask[b, T - len(r):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = default_lm.model(ids, positions=pos, attention_mask=mask)
        r = hf_default(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert (a[mask.bool()] - r[mask.bool()]).abs().max().item() <= 1e-4


def test_build_model_rejects_mismatched_weights():
    from lmforge.errors import LmforgeError

    cfg = tiny_config()
    state = Transformer(cfg).state_dict()
    state.pop("model.norm.weight")
    with pytest.raises(LmforgeError, match="missing"):
        build_model(cfg, dict(state))
