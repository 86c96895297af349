"""``tcssa synth`` and ``tcssa inspect``: write a synthetic cohort, describe feature files.

Handlers import the library inside the function, the one justified use of function-local imports
here: ``tcssa --help`` then loads no torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_synth(args: argparse.Namespace) -> int:
    from tcssa.data.synthetic import make_synthetic_cohort, parse_overrides

    # knobs with an option of their own ("slides" is num_slides) cannot also come through --set
    reserved = ("task", "num_slides", "dim", "seed", "min_patches", "max_patches", "lesion_fraction")
    options = parse_overrides(args.set or [], reserved + ("num_subtypes", "feature_dtype"))
    if args.subtypes is not None:
        options["num_subtypes"] = args.subtypes
    if args.float32:
        options["feature_dtype"] = "float32"
    lesion = args.lesion_fraction[0] if len(args.lesion_fraction) == 1 else tuple(args.lesion_fraction)
    cohort = make_synthetic_cohort(
        args.out,
        task=args.task,
        num_slides=args.slides,
        dim=args.dim,
        seed=args.seed,
        min_patches=args.min_patches,
        max_patches=args.max_patches,
        lesion_fraction=lesion,
        overwrite=args.overwrite,
        workers=args.workers,
        **options,
    )
    counts = {name: list(cohort.labels.values()).count(name) for name in cohort.config.class_names}
    print(
        f"wrote {len(cohort.slide_ids)} slides ({cohort.num_patches:,} patches, D={cohort.config.dim}, "
        f"task {cohort.config.task}) in {cohort.seconds:.1f} s"
    )
    print("labels: " + ", ".join(f"{name} {n}" for name, n in counts.items()))
    print(f"features: {cohort.features_dir}\nlabels:   {cohort.labels_csv}\ntruth:    {cohort.truth_csv}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from tcssa.data.inspection import file_report, folder_report, inspect_folder, summarize_file

    path = Path(args.path)
    if path.is_dir():
        summaries = inspect_folder(path)
        print(folder_report(path, summaries))
        return 1 if any(s.error for s in summaries) else 0
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    print(file_report(summarize_file(path)))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    inspect = commands.add_parser(
        "inspect",
        help="describe a feature file (N, D, dtype, coords, attrs) or a folder of them (one row per file)",
        description="A file: patches N, dimension D, stored dtype, coords extent and attributes. A folder: "
        "a table with one row per feature file; unreadable files are listed as errors (exit status 1).",
    )
    inspect.add_argument("path", help="a feature file (.h5 .hdf5 .pt .pth .npy .npz .csv) or a folder")
    inspect.set_defaults(func=_cmd_inspect)

    synth = commands.add_parser(
        "synth",
        help="write a synthetic gigapixel cohort (h5 features + labels.csv) with known tissue phenotypes",
        description="Write DIR/features/{slide_id}.h5 (TRIDENT style, with per-patch ground-truth "
        "phenotype), DIR/labels.csv (slide_id,label,case_id) and DIR/truth.csv.",
    )
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument(
        "--task",
        choices=("rare", "subtype", "composition", "margin"),
        default="rare",
        help="rare: a lesion in a few %% of positive slides; subtype: 2-3 classes with a subtle tumour "
        "shift; composition: immune-to-tumour ratio; margin: every slide has a lesion, positive when it "
        "lies at the tissue margin, negative when it lies inside (default rare)",
    )
    synth.add_argument("--slides", type=int, default=200, help="number of slides (default 200)")
    synth.add_argument("--dim", type=int, default=512, help="feature dimension D (default 512)")
    synth.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default 0)")
    synth.add_argument(
        "--min-patches", type=int, default=1000, help="fewest patches per slide (default 1000)"
    )
    synth.add_argument(
        "--max-patches", type=int, default=50000, help="most patches per slide (default 50000)"
    )
    synth.add_argument(
        "--lesion-fraction",
        type=float,
        nargs="+",
        default=[0.002, 0.05],
        metavar="F",
        help="rare (and margin) task: share of a positive (margin: every) slide's patches that are "
        "lesion: one value (fixed) or "
        "LOW HIGH (drawn log-uniform per slide; default 0.002 0.05)",
    )
    synth.add_argument(
        "--subtypes", type=int, choices=(2, 3), help="subtype task: number of classes (default 2)"
    )
    synth.add_argument("--float32", action="store_true", help="store float32 features (default float16)")
    synth.add_argument("--workers", type=int, help="slides generated side by side (default: up to 4)")
    synth.add_argument("--overwrite", action="store_true", help="replace DIR/features if it holds files")
    synth.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="any other SyntheticConfig knob, e.g. --set stain_std=2 --set lesion_offset=4 (repeatable)",
    )
    synth.set_defaults(func=_cmd_synth)
