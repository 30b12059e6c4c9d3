"""User-facing errors and the exit codes every jaxmusic command uses.

Anything a user can cause (a bad path, a corrupt file, a wrong shape, a bad argument)
raises `UserError` with one line that names the offending thing. Commands run through
`run_command`, which prints that line and exits with `EXIT_USER_ERROR`, without a
traceback; library callers can catch it.

Exit codes: 0 done; 1 a failure that is not the user's input (disk full, a bug; set
`JAXMUSIC_DEBUG=1` for the traceback); 2 a user error; 130 interrupted (Ctrl-C).
`jaxmusic train` adds 3 (stopped on a non-finite loss) and 75 (preempted; rerun to resume).
"""

from __future__ import annotations

import os
import sys
from typing import Callable

EXIT_OK, EXIT_FAILURE, EXIT_USER_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


class UserError(Exception):
    """An error in the user's input, reported as one clear line."""


def run_command(fn: Callable[[], int | None], *, tracebacks: bool = False) -> int:
    """Run a command's body; its exit code (None: 0), or one `error:` line and the code above.

    `tracebacks`: let unforeseen exceptions through with their traceback (long runs whose
    logs must say where a bug is), instead of one line.
    """
    try:
        code = fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:  # disk full, permissions, ...
        if tracebacks or os.environ.get("JAXMUSIC_DEBUG"):
            raise
        print(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as e:  # a bug or an unforeseen failure: still one line, traceback on request
        if tracebacks or os.environ.get("JAXMUSIC_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e} (set JAXMUSIC_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK if code is None else code
