"""``tpgate`` command line. Each subcommand lives in its own module and is imported only when used, so
``tpgate plan`` never pays for Ray.

User errors (:class:`UserError`) print one line on stderr and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
from collections.abc import Sequence
from typing import NoReturn

from gateway.errors import UserError

# subcommand -> module with `add_arguments(parser)` and `run(args) -> int`
SUBCOMMANDS = {
    "plan": "gateway.commands.plan",
    "engine": "gateway.commands.engine",
    "load": "gateway.commands.load",
    "profile": "gateway.commands.profile",
    "drift": "gateway.commands.drift",
    "serve": "gateway.commands.serve",
    "tune": "gateway.commands.tune",
    "admin": "gateway.commands.admin",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse's own errors: same one-line form, status 2
        raise UserError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tpgate", description="Autotuning serving gateway for LMDeploy.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        summary = (module.__doc__ or name).strip().splitlines()[0]
        module.add_arguments(sub.add_parser(name, help=summary, description=summary))
    return parser


def version() -> str:
    """The installed distribution's version (from its package metadata)."""
    return importlib.metadata.version("tpgate")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(importlib.import_module(SUBCOMMANDS[args.command]).run(args))
    except UserError as exc:
        print(f"tpgate: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
