"""The `minipeft` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import sys


def _cmd_info(args) -> int:
    import numpy as np

    from . import __version__, backend

    print(f"minipeft {__version__}")
    print(f"numpy {np.__version__}")
    gpu = backend.gpu_available()
    print(f"gpu: {'available' if gpu else 'not available'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="minipeft",
        description="Parameter-efficient fine-tuning, built from scratch to be read.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("info", help="versions, backend and device")
    s.set_defaults(func=_cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
