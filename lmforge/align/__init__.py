"""Alignment: learning from comparisons, from checkable rewards, from the model's own critique.

- `preference`: preference data (prompt or messages, chosen, rejected), validated like SFT data.
- `reward_model`: the transformer with a scalar `score` head, Bradley–Terry training, HF folder.
- `dpo`: DPO losses (sigmoid, IPO, robust, hinge) with reference log-probs cached once.
- `grpo`: GRPO rollouts, group-relative advantages, clipped ratio, KL (k3) to the reference.
- `rewards`: built-in rewards (exact answer, sandbox unit tests, reward model) and dotted paths.
- `constitution`: answer -> critique -> revise, producing SFT data and preference pairs.
- `system2`: best-of-N with a reward model and self-consistency voting at inference.
- `tasks`: checkable generated tasks (arithmetic).

Every trainer plugs a loss and a batch source into `lmforge.train.train`. Submodules are
imported on use; importing `lmforge.align` loads nothing heavy.
"""
