"""The ``ebmfast`` command: ``train``, ``sample``, ``evaluate``, ``bench``.

Each subcommand is a module of this package (``ebmfast.cli.train``, ...) with ``add_arguments(parser)`` and
``run(args) -> int``; the work itself is done by the library (``ebmfast.training``, ``ebmfast.evaluation``,
``ebmfast.benchmark``), which never imports from here. Errors the user can fix (``ebmfast.errors.UsageError``: bad
values, missing data or checkpoints, unwritable outputs) and faults met while writing (a full disk, a file-size
limit: ``ebmfast.errors.WRITE_FAULTS``) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

from ..errors import NonFiniteError, UsageError, write_failure

__all__ = ["COMMANDS", "Parser", "build_parser", "entry", "main", "one_line", "run_parsed"]

COMMANDS = {
    "train": ("ebmfast.cli.train", "train an energy model by contrastive divergence (the seed's recipe)"),
    "sample": ("ebmfast.cli.sample", "draw samples from a checkpoint with Langevin dynamics, save a PNG grid"),
    "evaluate": ("ebmfast.cli.evaluate", "out-of-distribution scores, sample quality and a report for a checkpoint"),
    "bench": ("ebmfast.cli.bench", "measure sampler throughput per backend"),
}


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is reported like every other usage error: one line, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def one_line(text: object) -> str:
    """``text`` on one line (every error the command prints is one line)."""
    return " ".join(str(text).split())


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = Parser(prog="ebmfast", description="Fast Langevin sampling for deep energy-based models")
    parser.add_argument("--version", action="version", version=f"ebmfast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_parsed(build_parser().parse_args(argv))


def run_parsed(args: argparse.Namespace) -> int:
    """Run the subcommand ``args`` was parsed for (``args._module``, ``args.command``): its exit code, or one line on
    stderr and 2 for a usage error or a fault met while writing, 1 for a non-finite chain, 130 for Ctrl-C."""
    try:
        return int(args._module.run(args) or 0)
    except UsageError as exc:
        print(f"ebmfast {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as exc:  # a full disk, a file-size limit, ... while writing: one line
        fault = write_failure(exc)
        if fault is None:
            raise
        print(f"ebmfast {args.command}: error: {one_line(fault)}", file=sys.stderr)
        return 2
    except NonFiniteError as exc:  # the model's fault, not the command line's: one line, exit 1
        print(f"ebmfast {args.command}: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ebmfast {args.command}: interrupted", file=sys.stderr)
        return 130


def entry() -> NoReturn:
    """The process entry point (the ``ebmfast`` script, ``python -m ebmfast``): ``main()``, then exit with its code."""
    from ..training.distributed import exit_process

    exit_process(main())


if __name__ == "__main__":
    entry()
