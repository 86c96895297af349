"""The ``tcssa`` command: argument parsing and wiring only; the work lives in the modules."""

from __future__ import annotations

import argparse
import sys

from tcssa import __version__


def _cmd_demo(args: argparse.Namespace) -> int:
    from tcssa.demo import token_budget_demo

    report = token_budget_demo(args.patches, args.dim, args.num_slots, args.seed)
    print("\n".join(report.lines()))
    return 0


# Each area of the package registers its commands with one function here; handlers import
# their module lazily so that `tcssa --help` stays fast.


def _add_demo_commands(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="compress a synthetic slide and show the token budget")
    demo.add_argument("--patches", type=int, default=20_000, help="patches in the slide (default 20000)")
    demo.add_argument("--dim", type=int, default=512, help="feature dimension D (default 512)")
    demo.add_argument("--num-slots", type=int, default=32, help="slot tokens K (default 32)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="a smaller, faster run")
    demo.set_defaults(func=_cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tcssa",
        description="TC-SSA: compress whole-slide images into a few semantic slot tokens.",
    )
    parser.add_argument("--version", action="version", version=f"tcssa {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"tcssa {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
