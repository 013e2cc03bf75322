"""Multi-process training on one machine: re-run the train stage under torchrun (no torch import here).

`runtime.nproc_per_node: N` makes `python stages/train.py` run itself as
`python -m torch.distributed.run --standalone --nproc_per_node=N stages/train.py`,
so the dvc.yaml command stays the same for one process or many.
"""

from __future__ import annotations

import os
import subprocess
import sys

TORCHRUN_VARIABLES = ("LOCAL_RANK", "WORLD_SIZE")


def under_torchrun() -> bool:
    """True in a process started by torchrun (or any launcher that sets its variables)."""
    return any(name in os.environ for name in TORCHRUN_VARIABLES)


def relaunch_under_torchrun(nproc_per_node: int, script: str) -> int | None:
    """Run `script` under torchrun when nproc_per_node > 1 and we are not already a torchrun worker.

    Returns torchrun's exit code, or None when the caller should train in this process.
    """
    if nproc_per_node <= 1 or under_torchrun():
        return None
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc_per_node}", script]
    return subprocess.call(command)
