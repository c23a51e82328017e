"""``qworld`` command line: one subcommand per job.

One module per group of commands, each with ``add_commands(sub)``: it adds its subparsers and
sets each one's handler ``_cmd_<name>(args) -> exit status`` as ``func``. Bad input exits 2
with one line naming the field (:func:`qworld.cli.common.bad_input`), before Ray starts.

- :mod:`qworld.cli.oracle`: ``oracle`` (exact Q, no Ray)
- :mod:`qworld.cli.sweep`: ``sweep``, ``resume``, ``extract``, ``status``, ``sync``
- :mod:`qworld.cli.analysis`: ``report``, ``compare`` (pandas, no Ray)
- :mod:`qworld.cli.demos`: ``demos``

Each handler imports what it needs when it runs: ``qworld oracle`` never pays for Ray or RLlib.
"""

from __future__ import annotations

import argparse
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    from qworld.cli import analysis, demos, oracle, sweep

    parser = argparse.ArgumentParser(prog="qworld", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (oracle, sweep, analysis, demos):  # the order of `qworld --help`
        group.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qworld`` script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)
