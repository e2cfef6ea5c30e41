"""The one base class of the errors that mean "your input or settings are wrong" (as opposed to a bug), and
the one path by which the command-line scripts report them.

Every such error in the package derives from `UserError` (and from the built-in it used to be, ValueError or
RuntimeError, so `except ValueError` still catches it). `run_cli` prints the message, which names the file,
key or value and the fix, and exits with 2, without a traceback; MLLM_CL_DEBUG=1 shows the traceback too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

DEBUG_ENV = "MLLM_CL_DEBUG"


class UserError(Exception):
    """Bad input or settings: the message says what is wrong, where, and what to do."""


# OSError: a path that cannot be read or written (missing, a file where a folder should be, no permission, a
# full disk); its message names the path.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, OSError)


def rank_prefix() -> str:
    """"[rank r/N] " in a run of several processes (torchrun sets RANK and WORLD_SIZE), "" otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return f"[rank {os.environ.get('RANK', '0')}/{size}] " if size > 1 else ""


INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C (128 + SIGINT)


def run_cli(prog: str, main: Callable[[], int | None], interrupted: str = "") -> int:
    """Run a script's `main`; a user error becomes one `PROG: error: ...` message on stderr and exit code 2
    (prefixed with the rank that raised it under torchrun); Ctrl-C becomes one `PROG: interrupted` line, with
    `interrupted` saying how to go on, and exit code 130."""
    try:
        return main() or 0
    except KeyboardInterrupt:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"{rank_prefix()}{prog}: interrupted{'; ' + interrupted if interrupted else ''}", file=sys.stderr)
        return INTERRUPTED
    except USER_ERRORS as e:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"{rank_prefix()}{prog}: error: {e}", file=sys.stderr)
        return 2
