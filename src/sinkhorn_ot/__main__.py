"""Command line: ``sinkhorn-ot demo`` or ``python -m sinkhorn_ot demo``."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    """Entry point of the ``sinkhorn-ot`` console script; returns the exit code."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="sinkhorn-ot",
        description="Log-domain Sinkhorn optimal transport and balanced self-labelling.")
    parser.add_argument("--version", action="version", version=f"sinkhorn-ot {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    demo_parser = sub.add_parser(
        "demo", help="SeLa self-labelling on scikit-learn's load_digits (needs the [demo] "
                     "extra)")
    from . import demo  # light: its heavy dependencies are imported when it runs

    demo.build_parser(demo_parser)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return demo.main(args)


if __name__ == "__main__":
    sys.exit(main())
