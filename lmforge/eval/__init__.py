"""Evaluation: perplexity, multiple choice by log-likelihood, generative and code tasks.

    from lmforge.eval.runner import evaluate, EvalSettings
    run, samples = evaluate(None, EvalSettings(tasks="core", limit=50), out="runs/eval-core")

Modules: `tasks` (data model, formatting, suites), `sources` (BIG-bench, HumanEval, JSONL,
text), `scoring` (batched log-likelihood), `perplexity`, `generative`, `code` (sandbox,
pass@k), `remote` (OpenAI-compatible servers), `report` (tables, JSON, plots, compare),
`runner` (the loop). Importing this package loads nothing heavy.
"""
