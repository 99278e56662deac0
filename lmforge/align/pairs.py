"""What `lmforge rm` and `lmforge dpo` share: preference pairs in, a run folder and batches out.

    model, tok, data = open_pair_run(cfg)      # the model, its tokenizer, train/held-out rows
    batches = pair_batches(data.rows, cfg.batch_size, data.pad_id, cfg.seed)

`cfg` is an RMConfig or DPOConfig (the fields model, data, val_data, val_fraction, task, out,
on_error, max_seq_len, seed, threads). Pairs come from --data (JSONL) or a generated task
(`--task.name arithmetic`: its train and held-out pairs are written into the run folder, so the
run keeps exactly the data it saw).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.errors import LmforgeError


@dataclass
class PairData:
    rows: list[dict]  # tokenized pairs: {"chosen": (ids, mask), "rejected": (ids, mask), "where"}
    val: list[dict]  # held-out pairs, same form
    pad_id: int
    report: object  # lmforge.finetune.datasets.DataReport


def task_pair_files(cfg, out: Path) -> tuple[str, str]:
    """(train JSONL, held-out JSONL or "") for --task.name: generated pairs written under out/data."""
    from lmforge.align.common import write_jsonl
    from lmforge.align.tasks import arithmetic_preferences

    if cfg.data:
        raise LmforgeError("give --data or --task.name, not both")
    t = cfg.task
    kinds = getattr(cfg, "perturb", None) or None  # RM-only options; DPO takes the defaults
    per = getattr(cfg, "pairs_per_problem", 1)
    train = arithmetic_preferences(t.n, cfg.seed, t.digits, t.ops, "train", t.digits_b, kinds=kinds, per_problem=per)
    data = str(write_jsonl(out / "data" / "train_pairs.jsonl", train))
    val_data = cfg.val_data
    if not val_data:
        held = arithmetic_preferences(t.n_eval, cfg.seed + 1, t.digits, t.ops, "heldout", t.digits_b, kinds=kinds,
                                      per_problem=per)
        val_data = str(write_jsonl(out / "data" / "heldout_pairs.jsonl", held))
    return data, val_data


def load_preference_rows(cfg, tok, max_len: int) -> tuple[list[dict], list[dict], object]:
    """(train rows, held-out rows, report) from --data/--val-data or a generated task."""
    from lmforge.align.preference import load_pairs, tokenize_pairs
    from lmforge.finetune.datasets import split_holdout

    data, val_data = cfg.data, cfg.val_data
    if cfg.task.name:
        data, val_data = task_pair_files(cfg, Path(cfg.out))
    if not data:
        raise LmforgeError("--data is required (preference JSONL), or --task.name arithmetic")
    pairs, report = load_pairs(data, cfg.on_error)
    rows, report = tokenize_pairs(tok, pairs, max_len, cfg.on_error, report)
    val: list[dict] = []
    if val_data:
        vpairs, vrep = load_pairs(val_data, cfg.on_error)
        val, _ = tokenize_pairs(tok, vpairs, max_len, cfg.on_error, vrep)
    elif cfg.val_fraction > 0:
        rows, val = split_holdout(rows, cfg.val_fraction, cfg.seed)
    return rows, val, report


def open_pair_run(cfg):
    """(model, tokenizer, PairData): threads and seed set, the model loaded, pairs read and
    tokenized, the data report printed and written to out/data_report.json."""
    from lmforge.align.common import load_policy

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    model, tok = load_policy(cfg.model)
    max_len = min(cfg.max_seq_len, model.cfg.max_seq_len)
    pad_id = tok.pad_id if tok.pad_id is not None else 0
    rows, val, report = load_preference_rows(cfg, tok, max_len)
    print(f"data: {report.summary()}; {len(val)} held-out pairs")
    for line in report.lines():
        print(f"data: {line}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_report.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    return model, tok, PairData(rows, val, pad_id, report)


def row_groups(rows: list[dict], key: str = "kind") -> list[str]:
    """A label per row from its record's `meta[key]` (the generated task's kind of wrong answer);
    "" where the record has none. Rows know their record by `where` (file:line)."""
    from lmforge.finetune.datasets import read_records

    files = {w.rsplit(":", 1)[0] for w in (r.get("where", "") for r in rows) if ":" in w}
    labels: dict[str, str] = {}
    for f in files:
        try:
            for where, obj in read_records(f):
                if isinstance(obj, dict) and isinstance(obj.get("meta"), dict):
                    labels[where] = str(obj["meta"].get(key, ""))
        except LmforgeError:
            continue
    return [labels.get(r.get("where", ""), "") for r in rows]


def pair_batches(rows: list[dict], batch_size: int, pad_id: int, seed: int):
    """The trainer's batch source: shuffled pairs, `collate_pairs` batches (B chosen, then B rejected)."""
    from lmforge.align.preference import collate_pairs
    from lmforge.train import ListBatches

    return ListBatches(rows, batch_size, collate=lambda xs: collate_pairs(xs, pad_id), seed=seed)
