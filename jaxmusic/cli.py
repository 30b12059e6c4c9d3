"""The `jaxmusic` command line."""

from __future__ import annotations

import argparse
import sys

from jaxmusic.errors import UserError


def _smoke(args) -> None:
    from jaxmusic import smoke

    smoke.run(seconds=args.seconds)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxmusic", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("smoke", help="run both backbones on tiny random weights and time them")
    p.add_argument("--seconds", type=float, default=5.0, help="audio length of the smoke input")
    p.set_defaults(func=_smoke)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
