"""`python fsdp_kill_worker.py train ...` under torchrun: `lorakit train`, except that the process of
rank $KILL_RANK is SIGKILLed at its optimizer step $KILL_AT_STEP (before applying it), as a
crash or an OOM killer would (no cleanup, no Python exception). Used by tests/recipes/test_fsdp_train.py."""

import os
import signal
import sys

import torch

from lorakit.cli import main

if os.environ.get("RANK") == os.environ.get("KILL_RANK"):
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == int(os.environ["KILL_AT_STEP"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(self, *args, **kwargs)

    torch.optim.AdamW.step = step

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
