"""Exit codes and the error line of every entry point: a script can tell what went wrong from the code.

    0   OK           the command did what it was asked
    1   FAILED       the input was fine but the work failed while running (a diverged run, a crashed model
                     or benchmark child, every run of a batch failing at run time)
    2   BAD_INPUT    the command was asked something it cannot do: usage, an unknown or invalid setting, a
                     missing file or run directory, missing or mismatched data, an unreadable checkpoint
    128 + N          stopped by signal N after saving a checkpoint (the trainer: 143 for SIGTERM,
                     INTERRUPTED = 130 for Ctrl-C)

Errors are printed as `error: <message>` on stderr, on one line and whole: a message is never cut, because the
end of a message is usually the part that says what to do. Imports nothing heavy (the `--help` paths use it).
"""

from __future__ import annotations

import sys

OK = 0
FAILED = 1
BAD_INPUT = 2
INTERRUPTED = 130


def one_line(text: str) -> str:
    """The whole text on one line: its non-blank lines joined by spaces, nothing dropped."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def describe(exc: BaseException) -> str:
    """An exception's whole message on one line, or its type name when the message is empty."""
    return one_line(str(exc)) or type(exc).__name__


def error(msg: str, code: int) -> int:
    """Print `error: msg` on stderr and return `code` (entry points `return error(...)`)."""
    print(f"error: {one_line(msg)}", file=sys.stderr, flush=True)
    return code


def warn(msg: str) -> None:
    """Print `warning: msg` on stderr: something was skipped or changed, and the command went on."""
    print(f"warning: {one_line(msg)}", file=sys.stderr, flush=True)
