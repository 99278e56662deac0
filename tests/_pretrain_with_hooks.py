"""`lmforge pretrain` with test hooks, for tests that SIGKILL a run at a chosen moment.

    python tests/_pretrain_with_hooks.py [--step-sleep S] [--save-sleep STEP:S] pretrain --config ...

--step-sleep sleeps after every optimizer step (time to kill between checkpoints); --save-sleep
sleeps in the middle of writing that step's checkpoint (model files written, trainer state not).
The hooks reach the trainer as TrainHooks, never through the production code's environment.
"""
import functools
import sys
import time

import lmforge.train.pretrain as pretrain
from lmforge.cli.main import main
from lmforge.train.trainer import TrainHooks, train


def _hooks(argv: list[str]) -> tuple[TrainHooks, list[str]]:
    step_sleep, save_at, save_sleep = 0.0, -1, 0.0
    while argv and argv[0] in ("--step-sleep", "--save-sleep"):
        flag, value, argv = argv[0], argv[1], argv[2:]
        if flag == "--step-sleep":
            step_sleep = float(value)
        else:
            at, secs = value.split(":")
            save_at, save_sleep = int(at), float(secs)
    hooks = TrainHooks(
        after_step=(lambda step: time.sleep(step_sleep)) if step_sleep else None,
        mid_save=(lambda step, tmp: time.sleep(save_sleep) if step == save_at else None) if save_sleep else None,
    )
    return hooks, argv


if __name__ == "__main__":
    hooks, rest = _hooks(sys.argv[1:])
    pretrain.train = functools.partial(train, hooks=hooks)
    sys.exit(main(rest))
