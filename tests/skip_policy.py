"""Which skips a default test run may show: only tests that need what a machine may lack.

Allowed are tests that need a ComfyUI checkout (``COMFYUI_ROOT``), a CUDA device, or the optional ``quanto`` extra
(optimum-quanto). Any other skip reason (a missing file, a missing dev dependency) means the suite silently tests
less than it says, and fails the run. Reads the short test summary of ``pytest -rs``::

    python tests/skip_policy.py PYTEST_OUTPUT_FILE   # prints the other skips; exit status 1 when there are any

(.ci/run does this after its test run; tests/test_standalone.py on a copy of the repository.)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

# Words one of which an allowed skip reason names (case-insensitive), with what the test needs.
ALLOWED = {
    "COMFYUI_ROOT": "a ComfyUI checkout (tests/comfyui)",
    "CUDA": "a CUDA device",
    "quanto": "the optional quanto extra (optimum-quanto)",
}
# pytest -rs: "SKIPPED [count] path:line: reason" (or "path: reason" when pytest knows no line)
SKIP_LINE = re.compile(r"^SKIPPED \[(?P<count>\d+)\] (?P<where>\S+): (?P<reason>.*)$")


def skips(output: str) -> list[tuple[str, str]]:
    """(location, reason) of each skip summary line in pytest's output."""
    found = (SKIP_LINE.match(line.rstrip()) for line in output.splitlines())
    return [(match["where"], match["reason"]) for match in found if match]


def is_allowed(reason: str) -> bool:
    """Whether a skip reason names one of the :data:`ALLOWED` needs."""
    return any(word.lower() in reason.lower() for word in ALLOWED)


def disallowed_skips(output: str) -> list[str]:
    """``location: reason`` of every skip in ``output`` whose reason is not allowed."""
    return [f"{where}: {reason}" for where, reason in skips(output) if not is_allowed(reason)]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tests/skip_policy.py PYTEST_OUTPUT_FILE", file=sys.stderr)
        return 2
    bad = disallowed_skips(Path(argv[0]).read_text(encoding="utf-8", errors="replace"))
    if bad:
        needs = ", ".join(ALLOWED.values())
        print(f"{len(bad)} skip reason(s) other than the needs allowed ({needs}):", file=sys.stderr)
        print("\n".join(f"  {line}" for line in bad), file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
