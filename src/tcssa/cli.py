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


def _cmd_report(args: argparse.Namespace) -> int:
    from tcssa.slot_analysis import slide_figures
    from tcssa.viz import build_report

    def analysis(compare):
        return slide_figures(
            compare, features_dir=args.features, slide_id=args.slide, embedding=args.embedding
        )

    out = build_report(args.run_dir, args.out, slide_analysis=None if args.no_slides else analysis)
    print(f"report written to {out}")
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

    report = commands.add_parser(
        "report", help="(re)build the HTML report of a `tcssa compare` run (or of `tcssa demo`'s output)"
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="the directory written by `tcssa compare`")
    report.add_argument("--out", help="where to write the HTML (default RUN_DIR/report.html)")
    report.add_argument(
        "--features",
        help="folder of the slide feature files, for the slot map and embedding "
        "(default: the folder the run's config.json records)",
    )
    report.add_argument(
        "--slide", help="slide id for the slot map (default: fold 0's most confident positive test slide)"
    )
    report.add_argument(
        "--embedding",
        choices=("pca", "tsne"),
        default="pca",
        help="2-D embedding of the slide's patches (default pca; tsne is slower)",
    )
    report.add_argument(
        "--no-slides",
        action="store_true",
        help="skip the slide-level figures (no checkpoint or features read)",
    )
    report.set_defaults(func=_cmd_report)


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
