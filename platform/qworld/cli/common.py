"""What every ``qworld`` command shares: bad input exits 2 with one line naming it."""

from __future__ import annotations

import sys

EXIT_BAD_INPUT = 2


def bad_input(message: str, command: str = "qworld") -> int:
    """Print ``<command>: error: <message>`` to stderr; return the bad-input exit status."""
    print(f"{command}: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT
