"""SFT through the one trainer: packing isolation, loss equalities, and the `lmforge sft` life cycle
(train -> adapter in PEFT layout -> chat -> merge -> transformers/PEFT load -> resume)."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_config
from lmforge.finetune.sft import IGNORE, collate, collate_packed, lm_loss_sum, sft_loss
from lmforge.model import Transformer

TOL = 1e-4


def _tiny(**kw):
    torch.manual_seed(0)
    return Transformer(tiny_config(**kw)).init_weights(seed=0)


def _rows(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for k in range(n):
        L = 5 + 3 * k
        ids = torch.randint(0, 256, (L,), generator=g).tolist()
        rows.append((ids, [0] * (L // 2) + [1] * (L - L // 2)))
    return rows


def test_packed_rows_do_not_attend_across_examples():
    m = _tiny().eval()
    rows = _rows()
    b = collate_packed([rows], pad_id=0, seq_len=32)
    with torch.no_grad():
        packed = m(b["input_ids"], positions=b["positions"], attention_mask=b["attention_mask"])
        at = 0
        for ids, _ in rows:
            alone = m(torch.tensor([ids]))
            assert (packed[0, at:at + len(ids)] - alone[0]).abs().max() <= TOL
            at += len(ids)


def test_padding_packing_and_single_examples_give_the_same_loss():
    m = _tiny().eval()
    rows = _rows()
    with torch.no_grad():
        sums, count = 0.0, 0
        for r in rows:
            loss, met = sft_loss(m, collate([r], 0))
            sums += float(loss) * met["trained_tokens"]
            count += met["trained_tokens"]
        padded, _ = sft_loss(m, collate(rows, 0))
        packed, met = sft_loss(m, collate_packed([rows[:2], rows[2:]], 0, 32))
    assert abs(float(padded) - sums / count) < 1e-5
    assert abs(float(packed) - sums / count) < 1e-5
    assert met["tokens"] == sum(len(ids) for ids, _ in rows)


def test_chunked_cross_entropy_equals_full():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (37,), generator=g)
    full = lm_loss_sum(h, w, t, 0)
    gh, gw = torch.autograd.grad(full, (h, w))
    chunked = lm_loss_sum(h, w, t, 8)
    ch, cw = torch.autograd.grad(chunked, (h, w))
    assert torch.allclose(full, chunked, atol=1e-4)
    assert torch.allclose(gh, ch, atol=1e-5) and torch.allclose(gw, cw, atol=1e-5)
    ref = torch.nn.functional.cross_entropy(h @ w.T, t, reduction="sum")
    assert torch.allclose(full, ref, atol=1e-4)


# -- the command end to end on a tiny model with the default model's tokenizer -----------------
PAIRS = [("red", "RED!"), ("blue", "BLUE!"), ("green", "GREEN!"), ("pink", "PINK!")]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_model_path):
    """A 2-layer random model with the real tokenizer and chat template, as an HF folder."""
    from lmforge.loading import load_tokenizer, save_hf

    tok = load_tokenizer(default_model_path)
    d = tmp_path_factory.mktemp("tiny") / "model"
    save_hf(_tiny(vocab_size=49152, tie_embeddings=True, max_seq_len=256), tok, d)
    return d


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "train.jsonl"
    lines = []
    for word, out in PAIRS * 4:
        lines.append(json.dumps({"messages": [{"role": "user", "content": f"Shout {word}"},
                                              {"role": "assistant", "content": out},
                                              {"role": "user", "content": "again"},
                                              {"role": "assistant", "content": out}]}))
    lines.append("{broken")
    p.write_text("\n".join(lines) + "\n")
    return p


def _sft(tiny_dir, data_file, out, *extra):
    from lmforge.cli.main import main

    argv = ["sft", "--model", str(tiny_dir), "--data", str(data_file), "--out", str(out), "--on-error", "skip",
            "--batch-size", "4", "--train.lr", "3e-3", "--train.warmup-steps", "0", "--train.log-every", "1",
            "--train.schedule", "constant", "--lora.r", "4", "--lora.dropout", "0", *extra]
    return main(argv)


def _losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_sft_lora_life_cycle(tiny_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert _sft(tiny_dir, data_file, out, "--train.max-steps", "10", "--pack", "--train.lr", "1e-2") == 0
    printed = capsys.readouterr().out
    assert "1 skipped" in printed and "train.jsonl:17" in printed  # the broken line, reported
    losses = _losses(out)
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2
    ckpt = out / (out / "latest").read_text().strip()
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "trainer_state.pt"} <= {p.name for p in ckpt.iterdir()}
    assert not (ckpt / "model.safetensors").exists()  # LoRA checkpoints hold the adapter only
    assert json.loads((out / "data_report.json").read_text())["skipped"][0].endswith("invalid JSON: Expecting property name enclosed in double quotes (column 2)")

    # chat with the run folder: lmforge loads the base it names and merges the adapter
    import lmforge

    lm = lmforge.load(str(out))
    reply = lm.chat("Shout red", max_new_tokens=4)
    assert isinstance(reply, str)

    # merge, then the merged folder in transformers equals PEFT's base+adapter and lmforge's
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lmforge.cli.main import main

    assert main(["merge", "--model", str(out), "--out", str(tmp_path / "merged")]) == 0
    x = torch.tensor([lm.encode_chat([{"role": "user", "content": "Shout red"}])])
    with torch.no_grad():
        ours = lm.logits(x)
        merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)(x).logits
        base = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
        with_peft = peft.PeftModel.from_pretrained(base, str(ckpt)).eval()(x).logits
    assert (ours - merged).abs().max() <= TOL
    assert (ours - with_peft).abs().max() <= TOL


def test_sft_resume_reproduces_losses(tiny_dir, data_file, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _sft(tiny_dir, data_file, a, "--train.max-steps", "4") == 0
    assert _sft(tiny_dir, data_file, b, "--train.max-steps", "2") == 0
    assert _sft(tiny_dir, data_file, b, "--train.max-steps", "4") == 0  # resumes at step 2
    la, lb = _losses(a), _losses(b)
    assert len(lb) == 4 and max(abs(x - y) for x, y in zip(la, lb)) <= 1e-6


@pytest.mark.parametrize("method,extra", [("full", []), ("qlora", ["--base-quant", "int8", "--ce-chunk", "16",
                                                                  "--train.activation-checkpointing"])])
def test_sft_other_methods(tiny_dir, data_file, tmp_path, method, extra):
    out = tmp_path / method
    assert _sft(tiny_dir, data_file, out, "--method", method, "--train.max-steps", "4", *extra) == 0
    losses = _losses(out)
    assert losses[-1] < losses[0]
    ckpt = out / (out / "latest").read_text().strip()
    want = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    assert (ckpt / want).exists()
    import lmforge

    assert isinstance(lmforge.load(str(out)).chat("Shout red", max_new_tokens=3), str)


def test_sft_bad_data_fails_with_line(tiny_dir, data_file, tmp_path, capsys):
    from lmforge.cli.main import main

    code = main(["sft", "--model", str(tiny_dir), "--data", str(data_file), "--out", str(tmp_path / "r")])
    assert code == 2
    assert "train.jsonl:17: invalid JSON" in capsys.readouterr().err
    assert main(["sft", "--model", str(tiny_dir), "--data", str(data_file), "--method", "lora", "--base-quant", "nf4",
                 "--out", str(tmp_path / "r")]) == 2
    assert "use --method qlora" in capsys.readouterr().err


# -- the frozen base's dtype: `auto` = bf16 for LoRA where bf16 is fast -------------------------
def test_auto_base_dtype_is_bf16_for_lora_only(monkeypatch):
    from lmforge.finetune import sft

    monkeypatch.setattr(sft, "fast_bf16", lambda device="cpu": True)
    assert [sft.base_dtype("auto", m) for m in ("full", "lora", "qlora")] == ["fp32", "bf16", "fp32"]
    assert sft.base_dtype("fp32", "lora") == "fp32" and sft.base_dtype("bf16", "qlora") == "bf16"
    monkeypatch.setattr(sft, "fast_bf16", lambda device="cpu": False)
    assert sft.base_dtype("auto", "lora") == "fp32"
    assert sft.SFTConfig().dtype == "auto" and sft.SFTConfig().method == "lora"
    # the real check answers for any machine, and a device without CUDA never claims CUDA bf16
    assert isinstance(sft.fast_bf16("cpu"), bool)
    assert sft.fast_bf16("cuda") == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def test_full_finetuning_refuses_a_bf16_base(tiny_dir, data_file, tmp_path, capsys):
    assert _sft(tiny_dir, data_file, tmp_path / "r", "--method", "full", "--dtype", "bf16") == 2
    assert "full finetuning keeps fp32 weights" in capsys.readouterr().err


def test_lora_default_bf16_base_trains_fp32_adapters_and_merges_into_the_fp32_base(tiny_dir, data_file, tmp_path,
                                                                                  monkeypatch):
    from safetensors.torch import load_file

    from lmforge.cli.main import main
    from lmforge.config import load_yaml
    from lmforge.finetune import sft

    monkeypatch.setattr(sft, "fast_bf16", lambda device="cpu": True)  # the same on every machine
    out = tmp_path / "run"
    cfg = sft.SFTConfig(model=str(tiny_dir), data=str(data_file), out=str(out), on_error="skip", batch_size=4,
                        lora=sft.LoraArgs(r=4, dropout=0.0),
                        train=sft.SFTTrainConfig(max_steps=3, lr=3e-3, warmup_steps=0, schedule="constant", log_every=1))
    res = sft.run_sft(cfg, progress=False)
    q = res["model"].model.layers[0].self_attn.q_proj
    assert q.base_layer.weight.dtype == torch.bfloat16  # the frozen base: no fp32 copy
    assert q.lora_A.weight.dtype == q.lora_B.weight.dtype == torch.float32
    assert load_yaml(out / "config.yaml")["dtype"] == "bf16"  # the resolved value is recorded
    ckpt = out / (out / "latest").read_text().strip()
    state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
    moments = [t for s in state["optimizer"]["state"].values() for k, t in s.items() if k.startswith("exp_avg")]
    assert moments and all(t.dtype == torch.float32 for t in moments)
    adapter = load_file(str(ckpt / "adapter_model.safetensors"))
    assert all(t.dtype == torch.float32 for t in adapter.values())

    # merging reloads the base at its own precision (fp32 here), not the bf16 copy it trained with
    assert main(["merge", "--model", str(out), "--out", str(tmp_path / "merged")]) == 0
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    base = load_file(str(tiny_dir / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    a = adapter[f"base_model.model.{key[:-len('.weight')]}.lora_A.weight"]
    b = adapter[f"base_model.model.{key[:-len('.weight')]}.lora_B.weight"]
    want = base[key].float() + (b @ a) * (32.0 / 4)
    assert merged[key].dtype == torch.float32 and float((b @ a).abs().max()) > 0  # the adapter trained
    assert (merged[key] - want).abs().max() <= 1e-6
    via_bf16 = base[key].to(torch.bfloat16).float() + (b @ a) * (32.0 / 4)
    assert (via_bf16 - want).abs().max() > 1e-5  # what merging into the bf16 copy would have lost
