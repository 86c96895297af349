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


def _cmd_bench(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from tcssa.bench import QUICK, BenchConfig, format_table, run_bench

    config = QUICK if args.quick else BenchConfig()
    overrides = {"dim": args.dim, "repeats": args.repeats, "seed": args.seed, "threads": args.threads}
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    result, paths = run_bench(config, args.out, sections=args.sections, progress=not args.no_progress)
    print(format_table(result))
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
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


_BENCH_SECTIONS = ("single", "agreement", "streaming", "cohort", "training", "auc")  # tcssa.bench.SECTIONS


def _add_bench_commands(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench",
        help="speed and memory of TC-SSA against the published code's formulation, 10^3 to 10^6 patches",
        description="Measure time and peak memory of TC-SSA (one slide, cohorts, training, streaming from "
        "h5, bfloat16) and of the alternatives, each as a ratio to the published code's formulation "
        "measured in the same run. Prints the table; writes bench.json, bench.csv, bench_scaling.png.",
    )
    bench.add_argument(
        "--quick", action="store_true", help="small sizes (D=128, N<=20000, one thread): a check that it runs"
    )
    bench.add_argument("--out", default="runs/bench", help="output folder (default runs/bench)")
    bench.add_argument("--dim", type=int, help="feature dimension D (default 1024; 256 with --quick)")
    bench.add_argument(
        "--repeats", type=int, help="timed repeats per measurement (default 5; 3 with --quick)"
    )
    bench.add_argument("--seed", type=int, help="seed for the synthetic slides and the models (default 0)")
    bench.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    bench.add_argument(
        "--sections",
        nargs="+",
        default=list(_BENCH_SECTIONS),
        choices=_BENCH_SECTIONS,
        help="which parts to run (default: all)",
    )
    bench.add_argument("--no-progress", action="store_true", help="no progress bars")
    bench.set_defaults(func=_cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tcssa",
        description="TC-SSA: compress whole-slide images into a few semantic slot tokens.",
    )
    parser.add_argument("--version", action="version", version=f"tcssa {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo_commands(commands)
    _add_bench_commands(commands)
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
