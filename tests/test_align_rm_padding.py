"""Where the reward model reads its score: the last real token of each sequence, whatever the
padding side, even when the pad id (a chat model's end-of-turn token) also stands inside the text."""
from __future__ import annotations

import torch

from conftest import tiny_config
from lmforge.align.preference import collate_pairs
from lmforge.align.reward_model import bt_loss, pair_scores, reward_model_from_lm, score_ids
from lmforge.model import Transformer

PAD = 2  # as in SmolLM2: pad = eos = <|im_end|>, which ends every turn of a conversation


def _rm():
    torch.manual_seed(0)
    lm = Transformer(tiny_config()).init_weights(seed=1)
    rm = reward_model_from_lm(lm, pad_id=PAD, seed=3).eval()
    with torch.no_grad():
        rm.score.weight.normal_(0, 1.0)
    return rm


# chat-like sequences: the pad id closes inner turns and, in the last one, the reply itself
SEQS = [[1, 40, 41, PAD, 10, 50, 51, 52, PAD, 10],
        [1, 40, 41, PAD, 10, 60, PAD, 10],
        [1, 40, 41, PAD, 10, 50, 51, 52, 53, 54, PAD]]


def test_score_is_read_at_the_last_real_token_with_left_and_right_padding():
    rm = _rm()
    with torch.no_grad():
        alone = torch.tensor([rm(torch.tensor([s]), attention_mask=torch.ones(1, len(s), dtype=torch.long))[0] for s in SEQS])
        unmasked_alone = torch.tensor([rm(torch.tensor([s]))[0] for s in SEQS[:2]])
    right = torch.tensor(score_ids(rm, SEQS, padding_side="right"))
    left = torch.tensor(score_ids(rm, SEQS, padding_side="left"))
    assert (right - alone).abs().max() <= 1e-5
    assert (left - alone).abs().max() <= 1e-5
    assert (left - right).abs().max() <= 1e-5
    # without a mask, transformers' rule (rightmost non-pad token) agrees where the text does not end in pad
    assert (unmasked_alone - alone[:2]).abs().max() <= 1e-5
    # the scores differ between sequences, so equality above is not an accident of a constant head
    assert (alone[0] - alone[1]).abs() > 1e-3


def test_pair_batches_score_each_row_at_its_own_end():
    """collate_pairs right-pads a batch to its longest row; each pair's scores must not depend on
    which other pairs share its batch (the index comes from `lengths`, not from the pad id)."""
    rm = _rm()
    rows = [{"chosen": (s, [0] * 5 + [1] * (len(s) - 5)), "rejected": (s[:-2] + [70, s[-1]], [0] * 5 + [1] * (len(s) - 5))}
            for s in SEQS]
    with torch.no_grad():
        together = pair_scores(rm, collate_pairs(rows, PAD))
        for i, r in enumerate(rows):
            c, j = pair_scores(rm, collate_pairs([r], PAD))
            assert abs(float(c[0] - together[0][i])) <= 1e-5 and abs(float(j[0] - together[1][i])) <= 1e-5
        # the third row ends with the pad id itself: it is still read there, not one token earlier
        early = rm(torch.tensor([SEQS[2][:-1]]))[0]
        assert abs(float(together[0][2] - early)) > 1e-4
        loss_all, _ = bt_loss(rm, collate_pairs(rows, PAD))
        loss_each = torch.stack([bt_loss(rm, collate_pairs([r], PAD))[0] for r in rows]).mean()
    assert abs(float(loss_all - loss_each)) <= 1e-5
