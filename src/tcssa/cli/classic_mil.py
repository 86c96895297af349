"""``tcssa classic-mil show | cv``: the classic MIL datasets (musk1, musk2, fox, tiger, elephant, ...).

``show`` loads one, prints its counts and can write it as a cohort folder; ``cv`` runs the
cross-validation protocol of Ilse et al. 2018 on them (tcssa.apps.classic_mil_cv).

Handlers import the library inside the function, the one justified use of function-local imports
here: ``tcssa --help`` then loads no torch.
"""

from __future__ import annotations

import argparse

from tcssa.apps.classic_mil_config import ClassicMILConfig
from tcssa.cli.flags import add_config_flags, config_from_args

# Dataset names are listed in the help, not imported: tcssa.data loads torch. A test keeps them in step.


def _cmd_show(args: argparse.Namespace) -> int:
    from tcssa.data.classic_mil import load_benchmark, write_benchmark_cohort

    bags, labels = load_benchmark(args.name, args.data_dir)
    print(
        f"{args.name}: {len(bags)} bags ({int(labels.sum())} positive), "
        f"{sum(len(b) for b in bags):,} instances, d = {bags[0].shape[1]}"
    )
    if args.out:
        out = write_benchmark_cohort(args.name, args.out, args.data_dir)
        print(f"wrote {out / 'features'} and {out / 'labels.csv'}")
    return 0


def _cmd_cv(args: argparse.Namespace) -> int:
    from tcssa.apps.classic_mil_cv import run_cv

    run_cv(config_from_args(args, ClassicMILConfig()), args.out)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    group = commands.add_parser(
        "classic-mil",
        help="the classic MIL datasets (musk1, musk2, fox, tiger, elephant, ucsb_breast_cancer): show one, "
        "or cross-validate models on them as Ilse et al. 2018",
    )
    sub = group.add_subparsers(dest="subcommand", metavar="CLASSIC_MIL_COMMAND", required=True)

    show = sub.add_parser(
        "show", help="load a classic MIL dataset, print its counts, optionally write it as a cohort folder"
    )
    show.add_argument(
        "name",
        help="musk1, musk2, elephant, protein, ucsb_breast_cancer (from the mil package), "
        "fox, tiger, elephant_mat (.mat files, need --data-dir)",
    )
    show.add_argument("--data-dir", help=ClassicMILConfig.__dataclass_fields__["data_dir"].metadata["help"])
    show.add_argument("--out", help="write OUT/features/{name}_{i}.h5 and OUT/labels.csv")
    show.set_defaults(func=_cmd_show)

    cv = sub.add_parser(
        "cv",
        help="accuracy of MIL models on the classic MIL datasets, cross-validated as Ilse et al. 2018",
        description="Accuracy of each model on the classic MIL datasets: 10-fold cross-validation "
        "repeated 5 times, beside the numbers Ilse et al. 2018 published; writes benchmark_mil.csv/.md.",
    )
    cv.add_argument("--out", required=True, help="folder for benchmark_mil.csv and benchmark_mil.md")
    add_config_flags(cv, ClassicMILConfig)
    cv.set_defaults(func=_cmd_cv)
