"""``tcssa demo`` and ``tcssa report``: the applications of tcssa.apps and the HTML report.

Handlers import the library inside the function, the one justified use of function-local imports
here: ``tcssa --help`` then loads no torch.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

#: The real slide the development checkout keeps beside the project (../shared/data, never on a
#: user's machine); the full `tcssa demo` draws it when present and no other slide is given. --quick
#: leaves it out unless asked (--slide): encoding it costs about 15 s, and --quick keeps to 3 minutes.
DEVELOPMENT_SLIDE = Path(__file__).resolve().parents[3].parent / "shared/data/wsi/cmu-1-small-region.svs"


def _demo_slide(given: str | None, quick: bool) -> str | None:
    if given == "none":
        return None
    if given is not None:
        return given
    return str(DEVELOPMENT_SLIDE) if DEVELOPMENT_SLIDE.is_file() and not quick else None


def _cmd_demo(args: argparse.Namespace) -> int:
    from tcssa.apps.demo import FULL, QUICK, run_demo

    config = replace(QUICK if args.quick else FULL, seed=args.seed, slide=_demo_slide(args.slide, args.quick))
    result = run_demo(args.out, config)
    print()
    print("\n".join(result.summary_lines()))
    print(f"\nreport: {result.report}   (demo took {result.seconds['total']:.0f} s)")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from tcssa.apps.slot_analysis import mean_patches, slide_figures
    from tcssa.io.runs import load_compare_run
    from tcssa.viz import build_report

    def analysis(compare):
        return slide_figures(
            compare, features_dir=args.features, slide_id=args.slide, embedding=args.embedding
        )

    patches = None if args.no_slides else mean_patches(load_compare_run(args.run_dir), args.features)
    out = build_report(
        args.run_dir, args.out, slide_analysis=None if args.no_slides else analysis, mean_patches=patches
    )
    print(f"report written to {out}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "demo",
        help="the main job: TC-SSA against MIL baselines on a synthetic cohort with rare lesions, "
        "two sweeps, and an HTML report",
    )
    demo.add_argument(
        "--quick",
        action="store_true",
        help="under 3 minutes on 2 cores: 80 slides of 1,000-4,000 patches, D = 256, lesions in 1-4%% "
        "(the full demo: 200 slides, 2,000-30,000 patches, D = 512, lesions 0.2-5%%); same report",
    )
    demo.add_argument(
        "--out",
        default="tcssa-demo",
        help="output folder (default ./tcssa-demo; an earlier demo there is replaced)",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of the cohort, folds and models (default 0)")
    demo.add_argument(
        "--slide",
        help="a real slide file (svs, tiff, ...) drawn in the report's 'A real slide' section: its tiles "
        "encoded by capricorn-densenet121 and routed through TC-SSA (needs the wsi extra); 'none' for no "
        "slide (default: none with --quick; otherwise the development checkout's "
        "../shared/data/wsi/cmu-1-small-region.svs when present)",
    )
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
