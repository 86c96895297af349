"""``tcssa bench``: speed and memory of TC-SSA against the published code's formulation.

The measured sizes are BenchConfig's fields (tcssa.cli.flags makes a flag of each); ``--quick``
starts from the QUICK preset instead of the defaults, the flags given override either.

Handlers import the library inside the function, the one justified use of function-local imports
here: ``tcssa --help`` then loads no torch.
"""

from __future__ import annotations

import argparse

from tcssa.bench.config import QUICK, SECTIONS, BenchConfig
from tcssa.cli.flags import add_config_flags, config_from_args


def _cmd_bench(args: argparse.Namespace) -> int:
    from tcssa.bench import format_bench_table, run_bench

    config = config_from_args(args, QUICK if args.quick else BenchConfig())
    result, paths = run_bench(config, args.out, sections=args.sections, progress=not args.no_progress)
    print(format_bench_table(result))
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench",
        help="speed and memory of TC-SSA against the published code's formulation, 10^3 to 10^6 patches",
        description="Measure time and peak memory of TC-SSA (one slide, cohorts, training, streaming from "
        "h5, bfloat16) and of the alternatives, each as a ratio to the published code's formulation "
        "measured in the same run. Prints the table; writes bench.json, bench.csv, bench.md (markdown) and "
        "bench_scaling.png (time and memory against N).",
    )
    bench.add_argument(
        "--quick", action="store_true", help="small sizes (D=128, N<=20000, one thread): a check that it runs"
    )
    bench.add_argument("--out", default="runs/bench", help="output folder (default runs/bench)")
    add_config_flags(bench, BenchConfig, variants={"--quick": QUICK})
    bench.add_argument(
        "--sections",
        nargs="+",
        default=list(SECTIONS),
        choices=SECTIONS,
        help="which parts to run (default: all)",
    )
    bench.add_argument("--no-progress", action="store_true", help="no progress bars")
    bench.set_defaults(func=_cmd_bench)
