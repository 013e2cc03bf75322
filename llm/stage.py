"""Shared entry point for stage scripts: every early stop is one line and an exit code, never a traceback.

Imports only the standard library and llm.errors, so that a stage script can import it before it
knows whether this Python has the project's dependencies (`dependencies_or_exit`).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

from llm.errors import Interrupted, LLMError

INSTALL_HINT = ("run `make install` and then `source .venv/bin/activate` (or run the whole pipeline with "
                "`make repro`, which needs nothing activated)")


def _stop(message: str, code: int) -> None:
    """Close any progress bar still open (so the message gets a line of its own), print, exit."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None:
        for bar in list(getattr(tqdm.tqdm, "_instances", ())):
            bar.close()
    print(message, file=sys.stderr)
    sys.exit(code)


@contextlib.contextmanager
def dependencies_or_exit() -> Iterator[None]:
    """Around a stage script's imports: a missing third-party module is one `error:` line and exit 2.

    DVC runs `python stages/<name>.py` with whatever `python` comes first on PATH; without the project's
    virtual environment there, that is a Python without torch, yaml or tqdm.
    """
    try:
        yield
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if not missing or missing == "llm":
            raise
        _stop(f"error: this Python ({sys.executable}) cannot import {missing}, which the project needs; "
              f"{INSTALL_HINT}", 2)


def run_stage(main: Callable[[], object]) -> None:
    """Run a stage's `main`: an LLMError prints `error: ...` and exits 2; a stop on SIGINT/SIGTERM prints
    one line and exits 128 + the signal number (130, 143)."""
    try:
        main()
    except LLMError as exc:
        _stop(f"error: {exc}", 2)
    except Interrupted as exc:
        _stop(str(exc), 128 + exc.signum)
    except KeyboardInterrupt:
        _stop("interrupted", 130)
