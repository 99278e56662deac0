"""A tiny prepared corpus for the training tests: seeded template sentences, a 320-token BPE."""
from __future__ import annotations

import random
from pathlib import Path

SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the captain", "a small bird", "the teacher", "our king"]
VERBS = ["sees", "likes", "finds", "follows", "paints", "remembers", "greets", "carries"]
OBJECTS = ["the red ball", "a green apple", "the long road", "a quiet river", "the tall tree", "a warm bread", "the white ship"]
ENDS = ["today.", "at night.", "in the morning.", "again and again.", "by the sea.", "without a word."]


def corpus_docs(n_docs: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sents = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDS)}".capitalize()
                 for _ in range(rng.randint(8, 20))]
        docs.append(" ".join(sents) + "\n")
    return docs


def make_prepared(root: Path, n_docs: int = 60, vocab_size: int = 320) -> dict:
    """Write text files, a tokenizer and prepared shards under `root`; returns their paths."""
    from lmforge.data.prepare import prepare
    from lmforge.tokenizer_train import train_bpe

    root = Path(root)
    text_dir, held = root / "text", root / "heldout"
    text_dir.mkdir(parents=True, exist_ok=True)
    held.mkdir(parents=True, exist_ok=True)
    docs = corpus_docs(n_docs)
    for i, d in enumerate(docs):
        (text_dir / f"doc_{i:03d}.txt").write_text(d)
    for i, d in enumerate(corpus_docs(3, seed=99)):
        (held / f"held_{i}.txt").write_text(d)
    tok = train_bpe(docs, vocab_size=vocab_size, min_frequency=1)
    tok.save(root / "tok")
    prepare([str(text_dir)], str(root / "tok"), str(root / "prepared"), val_fraction=0.1, workers=1, progress=False, log=lambda *a: None)
    return {"data": root / "prepared", "tokenizer": root / "tok", "heldout": held, "text": text_dir}
