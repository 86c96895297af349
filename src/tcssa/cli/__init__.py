"""The ``tcssa`` command: argument parsing and wiring only; the work lives in the library.

One module per command group registers its commands (``register``): ``apps`` (demo, report),
``vqa``, ``data`` (inspect, synth), ``mil`` (train, eval, compare, compress), ``classic_mil``
(show, cv), ``bench`` and ``wsi`` (extract). Options that are fields of a config dataclass
(TrainConfig, SlideLMTrainConfig, BenchConfig, ExtractConfig) are made from its fields by
``flags``. Handlers import the library inside the function, the one justified use of
function-local imports here, so that ``tcssa --help`` loads no torch.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from tcssa import __version__
from tcssa.cli import apps, bench, classic_mil, data, mil, vqa, wsi
from tcssa.cli.extras import OPTIONAL_PACKAGES, MissingExtraError, missing_extra
from tcssa.runtime import apply_process_settings

#: Set to 1 to see the Python traceback of an error instead of the one-line message.
DEBUG_ENV = "TCSSA_DEBUG"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tcssa",
        description="TC-SSA: compress whole-slide images into a few semantic slot tokens.",
        epilog=f"Errors are reported in one line; set {DEBUG_ENV}=1 to see the Python traceback.",
    )
    parser.add_argument("--version", action="version", version=f"tcssa {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in (apps, vqa, data, mil, classic_mil, bench, wsi):
        group.register(commands)
    return parser


def _command_name(args: argparse.Namespace) -> str:
    """``vqa train``, ``classic-mil cv``, ``train``: the command as typed, for the messages."""
    sub = getattr(args, "subcommand", None)
    return f"{args.command} {sub}" if sub else args.command


def _interrupted(args: argparse.Namespace) -> str:
    """The line for Ctrl-C: where a run directory stands, for the commands that write one."""
    out = getattr(args, "out", None)
    if args.command in ("train", "compare") and out:
        from tcssa.io.runs import CONFIG_FILE, SPLITS_FILE  # here: the error path of any command

        started = (Path(out) / CONFIG_FILE).is_file() or (
            args.command == "compare" and (Path(out) / SPLITS_FILE).is_file()
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
        print(f"tcssa {name}: error: {missing_extra(package, name)}", file=sys.stderr)
        return 1
    except OSError as err:  # a full disk, a folder that cannot be written, ... (before ValueError:
        if debug:  # tcssa.io.files.NoSpaceError is both)
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
