"""Shared entry point for stage scripts: user errors become one line and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

from llm.errors import LLMError


def run_stage(main: Callable[[], object]) -> None:
    """Run a stage's `main`; print an LLMError as `error: ...` and exit 2, no traceback."""
    try:
        main()
    except LLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
