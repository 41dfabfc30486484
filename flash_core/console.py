"""What every entry point shares (``sd35-flash``, ``sd35-flash-train``, the toy-world build): argparse with
one-line errors, and one guard that turns every expected failure into one stderr line and an exit status."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .atomic import Terminated
from .errors import FlashError, one_line


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), status 2 (also ``sd35-flash-train``'s parser)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def out_of_memory(err: BaseException) -> bool:
    """MemoryError, torch's OutOfMemoryError, or the CPU allocator's refusal (a plain RuntimeError)."""
    return (isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in str(err))


EXPECTED_ERRORS = (FlashError, ValueError, OSError)


def run_guarded(prog: str, work: Callable[[], int], stopped: str = "") -> int:
    """``work()``, with every expected failure as one stderr line: an error (:data:`EXPECTED_ERRORS`, or running
    out of memory) status 2, SIGTERM 143, Ctrl-C 130; ``stopped`` is added to the line of a stop (what to do next).
    The entry points of ``sd35-flash``, ``sd35-flash-train`` and the toy-world build share it."""
    try:
        return work()
    except EXPECTED_ERRORS as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as err:
        if not out_of_memory(err):
            raise
        print(f"{prog}: error: out of memory ({one_line(err)[:200]}); lower --batch or --width/--height, "
              "or pass --memory auto to plan offloading and quantization", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        terminated = isinstance(err, Terminated)
        print(f"{prog}: {'stopped (SIGTERM)' if terminated else 'interrupted'}{stopped}", file=sys.stderr)
        return 128 + Terminated.signum if terminated else 130
