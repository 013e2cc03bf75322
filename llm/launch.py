"""Multi-process training on one machine: re-run the train stage under torchrun (no torch import here).

`runtime.nproc_per_node: N` makes `python stages/train.py` run itself as
`python -m torch.distributed.run --standalone --nproc_per_node=N stages/train.py`,
so the dvc.yaml command stays the same for one process or many.
"""

from __future__ import annotations

import os
import signal
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
    return run_to_the_end(command)


def run_to_the_end(command: list[str]) -> int:
    """Run `command` and return its exit code, even when this process is signalled meanwhile.

    Ctrl-C reaches every process of the terminal's group, so the workers see it themselves: they
    finish their step, save checkpoints/last.pt and exit, and their status is ours. SIGTERM (sent
    to this process alone, as by a scheduler) is passed on to torchrun, which passes it on to them.
    """
    process = subprocess.Popen(command)
    handlers = {signal.SIGINT: lambda signum, frame: None,
                signal.SIGTERM: lambda signum, frame: process.send_signal(signum)}
    previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
    try:
        return process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
