"""The logit lens equals transformers' hidden states passed through its own final norm and head."""
from __future__ import annotations

import pytest
import torch

from lmforge.inspect.logit_lens import lens_log_probs, lens_table, logit_lens, render_lens_png

transformers = pytest.importorskip("transformers")

FRANCE = "The capital of France is"


def test_middle_layer_lens_matches_transformers(default_lm, tmp_path):
    from test_eval_crosscheck import hf_reference

    model, tok = default_lm.model, default_lm.tokenizer
    ids = tok.encode(FRANCE)
    ours = lens_log_probs(model, ids)  # [n_layers + 1, T, V]
    assert ours.shape[0] == model.cfg.n_layers + 1
    hf = hf_reference(model)
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_hidden_states=True)
    mid = model.cfg.n_layers // 2
    h = out.hidden_states[mid]  # residual stream after `mid` layers (index 0 = embeddings)
    with torch.no_grad():
        ref = torch.softmax(hf.lm_head(hf.model.norm(h))[0].float(), -1)
    assert (ours[mid].exp() - ref).abs().max().item() <= 1e-4
    assert torch.equal(ours[mid].argmax(-1), ref.argmax(-1))
    # the last layer's lens is the model's own output
    final = torch.softmax(out.logits[0].float(), -1)
    assert (ours[-1].exp() - final).abs().max().item() <= 1e-4

    res = logit_lens(model, tok, ids, top_k=3)
    assert res.top_text[-1][-1][0] == " Paris"  # the default model knows
    table = lens_table(res)
    assert "Paris" in table and table.count("\n") > model.cfg.n_layers
    png = render_lens_png(res, tmp_path / "lens.png", title=FRANCE)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_logit_lens_cli_on_a_tiny_model(tmp_path, capsys):
    from test_eval_scoring import byte_tokenizer, tiny_byte_model

    from lmforge.cli.main import main
    from lmforge.loading import save_hf

    save_hf(tiny_byte_model(seed=2), byte_tokenizer(), tmp_path / "m")
    assert main(["inspect", "logit-lens", "--model", str(tmp_path / "m"), "--prompt", "abc", "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "logit_lens.png").stat().st_size > 5000
    assert "top-3 after the last token 'c'" in (tmp_path / "o" / "logit_lens.txt").read_text()
    assert main(["inspect", "logit-lens", "--model", str(tmp_path / "m"), "--prompt", ""]) == 2
    assert "--prompt is empty" in capsys.readouterr().err
