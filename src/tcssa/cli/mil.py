"""``tcssa train | eval | compare | compress``: MIL slide classifiers on a cohort.

The training options are TrainConfig's fields (tcssa.cli.flags makes a flag of each); a
``--config`` YAML file gives the base values, the flags given override them.

Handlers import the library inside the function, the one justified use of function-local imports
here: ``tcssa --help`` then loads no torch.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from tcssa.cli.flags import add_config_flags, config_from_args
from tcssa.train.config import TrainConfig


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The ``--config`` file's TrainConfig (or the defaults) with the flags given on top."""
    base = TrainConfig.from_yaml(args.config) if args.config else TrainConfig()
    return config_from_args(args, base)


class _ShortWarnings:
    """Show warnings as one "tcssa CMD: warning: ..." line instead of Python's file:line form."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __enter__(self):
        self._saved = warnings.showwarning
        warnings.showwarning = lambda message, category, *rest: print(
            f"tcssa {self.command}: warning: {message}", file=sys.stderr
        )

    def __exit__(self, *exc):
        warnings.showwarning = self._saved


def _cmd_train(args: argparse.Namespace) -> int:
    from tcssa.runtime import process_state
    from tcssa.train.runs import train_run

    config = train_config(args)
    process = process_state(config.device)
    try:
        with _ShortWarnings("train"):
            result = train_run(
                args.features,
                args.labels,
                args.out,
                config,
                split_csv=args.split,
                skip_missing=args.skip_missing,
                resume=args.resume,
            )
    finally:
        process.destroy_process_group()
    if process.is_main_process:
        summary = result.summary
        print(
            f"{config.model}: test AUC {summary['test_auc_mean']:.4f} ± {summary['test_auc_std']:.4f}, "
            f"balanced accuracy {summary['test_bacc_mean']:.4f} ± {summary['test_bacc_std']:.4f} "
            f"over {len(result.rows)} fold(s); results in {args.out}/summary.csv"
        )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from tcssa.train.runs import evaluate_checkpoint

    config = config_from_args(args, TrainConfig())
    with _ShortWarnings("eval"):
        metrics = evaluate_checkpoint(
            args.checkpoint,
            args.features,
            args.labels,
            args.out,
            skip_missing=args.skip_missing,
            batch_size=config.eval_batch_size,
            device=config.device,
        )
    print(
        " ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f"; predictions in {args.out}/predictions.csv"
    )
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from tcssa.io.runs import comparison_markdown
    from tcssa.runtime import process_state
    from tcssa.train.runs import compare

    config = train_config(args)
    process = process_state(config.device)
    try:
        with _ShortWarnings("compare"):
            rows = compare(
                args.features,
                args.labels,
                [m.strip() for m in args.models.split(",") if m.strip()],
                args.out,
                config,
                split_csv=args.split,
                skip_missing=args.skip_missing,
                resume=args.resume,
            )
    finally:
        process.destroy_process_group()
    if process.is_main_process:
        print(comparison_markdown(rows), end="")
    return 0


def _cmd_compress(args: argparse.Namespace) -> int:
    from tcssa.train.compress import compress_folder

    budget = args.token_budget
    if budget not in (None, "auto", "all"):
        try:
            budget = float(budget)
        except ValueError:
            raise ValueError(
                f"--token-budget must be auto, all or a routing coverage in (0, 1], got {budget!r}"
            ) from None
    written = compress_folder(
        args.checkpoint,
        args.features,
        args.out,
        device=args.device,
        overwrite=args.overwrite,
        token_budget="checkpoint" if budget is None else budget,
    )
    print(f"wrote {len(written)} slot-token file(s) to {args.out}")
    return 0


def _add_training_options(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Options of `train` and `compare`: the cohort, the run directory and TrainConfig's fields (less
    ``skip``); fields whose flag is not given keep the --config file's or the default value."""
    parser.add_argument("--features", required=True, help="folder of per-slide feature files (h5)")
    parser.add_argument("--labels", required=True, help="CSV with columns slide_id,label[,case_id]")
    parser.add_argument("--out", required=True, help="output folder (the run directory)")
    folds = parser.add_mutually_exclusive_group()
    add_config_flags(folds, TrainConfig, only=("folds",))
    folds.add_argument("--split", help="split CSV (the splits.csv of an earlier run) instead of --folds")
    add_config_flags(parser, TrainConfig, skip=("folds", *skip))
    parser.add_argument(
        "--config", help="YAML file of training options (TrainConfig fields); flags override it"
    )
    parser.add_argument(
        "--skip-missing",
        action="store_true",
        help="leave out labelled slides with no feature file (counted and listed) instead of failing",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last complete epoch (refused if the labels, split file "
        "or cohort changed since it started, or if another run is in progress there)",
    )


def register(commands: argparse._SubParsersAction) -> None:
    # Model names are checked by tcssa.mil.build_model (an unknown one lists the choices); importing
    # tcssa.mil here would pull torch into every `tcssa --help`.
    train = commands.add_parser(
        "train",
        help="train a slide classifier on every fold of a cohort",
        description="Train a MIL slide classifier per fold and write summary.csv, per-fold predictions, "
        "checkpoints and (tcssa) slot utilisation. Runs under "
        "`torchrun --nproc_per_node P -m tcssa train ...` with the slides of each update shared across "
        "the processes.",
    )
    _add_training_options(train)
    train.set_defaults(func=_cmd_train)

    evaluate = commands.add_parser("eval", help="evaluate a trained checkpoint on labelled slides")
    evaluate.add_argument(
        "--checkpoint", required=True, help="a fold_k folder of a run, or its model.safetensors"
    )
    evaluate.add_argument("--features", required=True, help="folder of per-slide feature files (h5)")
    evaluate.add_argument("--labels", required=True, help="CSV with columns slide_id,label")
    evaluate.add_argument("--out", required=True, help="output folder for predictions.csv and metrics.json")
    add_config_flags(
        evaluate,
        TrainConfig,
        only=("eval_batch_size", "device"),
        flag_names={"eval_batch_size": "--batch-size"},
    )
    evaluate.add_argument(
        "--skip-missing", action="store_true", help="leave out labelled slides with no feature file"
    )
    evaluate.set_defaults(func=_cmd_eval)

    comparison = commands.add_parser(
        "compare",
        help="train several models on the same folds and tabulate them",
        description="Train each model of --models on the same folds; write comparison.csv, comparison.md "
        "and one run directory per model.",
    )
    comparison.add_argument(
        "--models",
        required=True,
        help="comma-separated model names, e.g. tcssa,random-k,abmil,mean; a model with options as "
        "NAME:KEY=VALUE[:KEY=VALUE], e.g. a lambda sweep tcssa:aux_weight=0,tcssa,tcssa:aux_weight=1",
    )
    _add_training_options(comparison, skip=("model",))  # --models names them
    comparison.set_defaults(func=_cmd_compare)

    compress = commands.add_parser(
        "compress", help="write each slide's K slot tokens (h5) with a trained tcssa checkpoint"
    )
    compress.add_argument(
        "--checkpoint", required=True, help="a tcssa fold_k folder, or its model.safetensors"
    )
    compress.add_argument("--features", required=True, help="folder of per-slide feature files (h5)")
    compress.add_argument(
        "--out", required=True, help="output folder: one h5 per slide (tokens, topk_index, ...)"
    )
    compress.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    compress.add_argument(
        "--overwrite", action="store_true", help="replace slot-token files already in --out"
    )
    compress.add_argument(
        "--token-budget",
        metavar="auto|all|C",
        help="per slide, mark as valid (token_mask) only the fewest slots whose routing mass covers a "
        "share C in (0, 1] of the slide's (auto: 0.99); all: every token (default: the checkpoint's "
        "token_budget option, all when it has none)",
    )
    compress.set_defaults(func=_cmd_compress)
