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


# ---------------------------------------------------------------------------------- vqa
def _cmd_vqa_init_lm(args: argparse.Namespace) -> int:
    from tcssa.vlm.pipeline import init_lm

    size = {"hidden_size": args.hidden, "num_layers": args.layers, "vocab_size": args.vocab}
    init_lm(args.text, args.out, args.warm_up_steps, args.seed, **size)
    return 0


def _cmd_vqa_train(args: argparse.Namespace) -> int:
    from tcssa.vlm.pipeline import train_from_files
    from tcssa.vlm.train import TrainConfig

    config = TrainConfig(
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
    )
    return 0


def _cmd_vqa_eval(args: argparse.Namespace) -> int:
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
    )
    return 0


def _cmd_vqa_demo(args: argparse.Namespace) -> int:
    from tcssa.vlm.demo import run_vqa_demo

    run_vqa_demo(args.out, quick=args.quick, seed=args.seed, threads=args.threads)
    return 0


def _cmd_vqa_prefill(args: argparse.Namespace) -> int:
    from tcssa.vlm.prefill import run_prefill_benchmark

    run_prefill_benchmark(args.lm, args.tokens, args.out, repeats=args.repeats)
    return 0


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
    train.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default 1)")
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
    ev.set_defaults(func=_cmd_vqa_eval)

    demo = sub.add_parser("demo", help="synthetic VQA on the synthetic cohort: slots vs random-k vs mean")
    demo.add_argument("--out", required=True, help="folder for the demo's data, runs and vqa_results.csv")
    demo.add_argument("--quick", action="store_true", help="a smaller run (under 3 minutes on a laptop CPU)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument(
        "--threads", type=int, default=1, help="CPU threads for torch (default 1: the demo's ops are tiny)"
    )
    demo.set_defaults(func=_cmd_vqa_demo)

    prefill = sub.add_parser("prefill", help="LM prefill FLOPs and time: K slot tokens vs N patch tokens")
    prefill.add_argument("--lm", help="local causal LM folder (default: the small offline model)")
    prefill.add_argument(
        "--tokens", type=int, nargs="+", default=[32, 1000, 10000, 38400], help="slide-token counts to time"
    )
    prefill.add_argument("--repeats", type=int, default=3, help="timed repeats per length (default 3)")
    prefill.add_argument("--out", help="CSV file to write the measurements to")
    prefill.set_defaults(func=_cmd_vqa_prefill)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tcssa",
        description="TC-SSA: compress whole-slide images into a few semantic slot tokens.",
    )
    parser.add_argument("--version", action="version", version=f"tcssa {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo_commands(commands)
    _add_vqa_commands(commands)
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
