"""What every command-line entry point shares: one clear error line instead of a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line (no traceback)."""


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run ``main``; show ``UserError`` as ``error: ...`` (a traceback with GEMMA_CSE_DEBUG=1)."""
    try:
        return main(argv) or 0
    except UserError as err:
        if os.environ.get("GEMMA_CSE_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
