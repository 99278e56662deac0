"""Data: public corpora into the cache (`fetch`), documents from files/folders/JSONL/parquet/HF
datasets (`sources`), and token shards with a manifest that training checks (`prepare`).

    from lmforge.data.prepare import open_prepared
    data = open_prepared("data/tok32k", tokenizer=tok)   # raises if tokenized with another tokenizer
    data.train.read(0, 1025)                             # token ids across shards

Submodules are imported on use; importing lmforge.data loads nothing heavy.
"""
