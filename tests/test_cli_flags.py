"""Command-line flags made from the config dataclasses (tcssa.cli.flags): every field has its flag,
typed from its annotation, with its help and default; only the flags given replace a config's values."""

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest

from tcssa.apps.classic_mil_config import ClassicMILConfig
from tcssa.bench.config import QUICK, BenchConfig
from tcssa.cli import build_parser
from tcssa.cli.flags import add_config_flags, cli_fields, config_from_args, flag_name
from tcssa.cli.mil import train_config
from tcssa.train.config import TrainConfig
from tcssa.vlm.config import SlideLMTrainConfig
from tcssa.wsi.config import ExtractConfig


def _subparser(*path):
    parser = build_parser()
    for name in path:
        parser = parser._subparsers._group_actions[0].choices[name]
    return parser


TRAIN_ARGS = ["--features", "f", "--labels", "l.csv", "--out", "o"]

MAPPED = [
    (("train",), TrainConfig, ()),
    (("compare",), TrainConfig, ("model",)),  # compare's --models names the models
    (("vqa", "train"), SlideLMTrainConfig, ()),
    (("bench",), BenchConfig, ()),
    (("classic-mil", "cv"), ClassicMILConfig, ()),
    (("extract",), ExtractConfig, ()),
]


@pytest.mark.parametrize("path,config_type,left_out", MAPPED, ids=[" ".join(m[0]) for m in MAPPED])
def test_every_field_of_each_mapped_config_has_a_flag(path, config_type, left_out):
    actions = {}
    for action in _subparser(*path)._actions:  # the first per dest: vqa's --grad-accum alias comes after
        actions.setdefault(action.dest, action)
    for f in dataclasses.fields(config_type):
        assert f.metadata.get("help"), f"{config_type.__name__}.{f.name} has no help metadata"
    for f in cli_fields(config_type):
        if f.name in left_out:
            assert f.name not in actions
            continue
        assert f.name in actions, f"{config_type.__name__}.{f.name} has no flag on tcssa {' '.join(path)}"
        action = actions[f.name]
        assert flag_name(f) in action.option_strings
        assert action.help.startswith(f.metadata["help"].replace("%", "%%"))
        assert action.default is argparse.SUPPRESS  # a flag left out replaces nothing


def test_the_fields_kept_off_the_command_line_are_few_and_marked():
    hidden = {
        config.__name__: sorted(f.name for f in dataclasses.fields(config) if not f.metadata.get("cli", True))
        for config in (TrainConfig, SlideLMTrainConfig, BenchConfig)
    }
    assert hidden == {
        "TrainConfig": ["model_options"],
        "SlideLMTrainConfig": ["extra"],
        "BenchConfig": ["quick"],
    }


# ------------------------------------------------------------------ the mapper on a throwaway config
@dataclass(frozen=True)
class Toy:
    mode: Literal["fast", "slow"] = field(metadata={"help": "how to run"})
    count: int = field(default=3, metadata={"help": "how many"})
    rate: float = field(default=1e-4, metadata={"help": "a rate"})
    share: float = field(default=0.15, metadata={"help": "a share of 100%"})
    name: str = field(default="toy", metadata={"help": "its name"})
    cap: int | None = field(default=None, metadata={"help": "a cap (default: none)"})
    verbose: bool = field(default=False, metadata={"help": "say more"})
    learn: bool | None = field(default=None, metadata={"off_flag": "--freeze", "help": "learn or freeze"})
    sizes: tuple[int, ...] = field(default=(10, 100), metadata={"help": "sizes"})
    span: tuple[int, int] = field(default=(1, 9), metadata={"help": "lowest and highest"})
    targets: list[str] | str = field(default="all", metadata={"help": "targets"})
    learning_rate: float = field(default=0.5, metadata={"flag": "--lr", "help": "spelled --lr"})
    notes: dict = field(default_factory=dict, metadata={"cli": False, "help": "not a flag"})


def _toy_parser(config_type=Toy, **options):
    parser = argparse.ArgumentParser(prog="toy", exit_on_error=False)
    add_config_flags(parser, config_type, **options)
    return parser


def _help_of(parser, dest):
    return next(a.help for a in parser._actions if a.dest == dest)


def test_flags_take_their_type_choices_and_help_from_the_fields():
    parser = _toy_parser()
    flags = {a.dest: a.option_strings for a in parser._actions}
    assert flags["count"] == ["--count"] and flags["learning_rate"] == ["--lr"]
    assert flags["verbose"] == ["--verbose", "--no-verbose"] and flags["learn"] == ["--learn", "--freeze"]
    assert "notes" not in flags
    assert _help_of(parser, "count") == "how many (default 3)"
    assert _help_of(parser, "rate") == "a rate (default 1e-4)"
    assert _help_of(parser, "share") == "a share of 100%% (default 0.15)"  # argparse %-formats help
    assert _help_of(parser, "cap") == "a cap (default: none)"  # None: the text says what unset means
    assert _help_of(parser, "verbose") == "say more (default off)"
    assert _help_of(parser, "sizes") == "sizes (default 10 100)"
    assert "share of 100% (default 0.15)" in parser.format_help().replace("\n", " ").replace("  ", " ")

    args = parser.parse_args(
        "--mode slow --count 5 --rate 0.25 --cap 7 --verbose --freeze --sizes 1 2 3 --span 4 5 "
        "--targets q_proj v_proj --lr 2".split()
    )
    toy = config_from_args(args, Toy)
    assert toy == Toy(
        mode="slow",
        count=5,
        rate=0.25,
        cap=7,
        verbose=True,
        learn=False,
        sizes=(1, 2, 3),
        span=(4, 5),
        targets=["q_proj", "v_proj"],
        learning_rate=2.0,
    )
    assert isinstance(toy.rate, float) and isinstance(toy.sizes, tuple)
    one = config_from_args(parser.parse_args(["--mode", "fast", "--targets", "all-linear", "--learn"]), Toy)
    assert one.targets == "all-linear" and one.learn is True  # one value of list[str] | str: the str
    with pytest.raises(argparse.ArgumentError):
        parser.parse_args(["--mode", "medium"])
    with pytest.raises(argparse.ArgumentError):
        parser.parse_args(["--mode", "fast", "--count", "1.5"])
    with pytest.raises(argparse.ArgumentError, match="--span"):
        parser.parse_args(["--mode", "fast", "--span", "1"])


def test_only_the_flags_given_replace_the_base_values():
    parser = _toy_parser()
    base = Toy(mode="slow", count=8, name="from a file", verbose=True)
    assert vars(parser.parse_args(["--mode", "fast"])) == {"mode": "fast"}
    assert config_from_args(
        parser.parse_args(["--mode", "fast", "--count", "2"]), base
    ) == dataclasses.replace(base, mode="fast", count=2)


def test_a_field_without_a_default_is_a_required_flag(capsys):
    parser = argparse.ArgumentParser(prog="toy")
    add_config_flags(parser, Toy)
    with pytest.raises(SystemExit):
        parser.parse_args([])
    assert "the following arguments are required: --mode" in capsys.readouterr().err


def test_a_field_added_to_a_config_appears_on_the_command_line():
    grown = dataclasses.make_dataclass(
        "Grown",
        [("patience", int, field(default=4, metadata={"help": "epochs to wait"}))],
        bases=(Toy,),
        frozen=True,
    )
    parser = _toy_parser(grown)
    assert _help_of(parser, "patience") == "epochs to wait (default 4)"
    assert "--patience" in parser.format_help()
    assert config_from_args(parser.parse_args(["--mode", "fast", "--patience", "9"]), grown).patience == 9
    assert config_from_args(parser.parse_args(["--mode", "fast"]), grown).patience == 4


def test_only_skip_flag_names_and_variants():
    parser = _toy_parser(only=("count", "name"), flag_names={"count": "--n"})
    assert {a.dest for a in parser._actions} == {"help", "count", "name"}
    assert config_from_args(parser.parse_args(["--n", "6"]), Toy(mode="fast")).count == 6
    assert "name" not in {a.dest for a in _toy_parser(skip=("name",))._actions}
    variants = _toy_parser(variants={"--small": Toy(mode="fast", count=1, sizes=(5,))})
    assert _help_of(variants, "count") == "how many (default 3; 1 with --small)"
    assert _help_of(variants, "sizes") == "sizes (default 10 100; 5 with --small)"
    assert _help_of(variants, "name") == "its name (default toy)"  # same in the preset: not repeated


def test_a_field_the_mapper_cannot_map_is_an_error_naming_it():
    @dataclass
    class NoHelp:
        count: int = 1

    @dataclass
    class Mapping:
        options: dict = field(default_factory=dict, metadata={"help": "a mapping"})

    with pytest.raises(TypeError, match=r"NoHelp\.count: no metadata\['help'\]"):
        _toy_parser(NoHelp)
    with pytest.raises(TypeError, match=r"Mapping\.options: no command-line flag .* mark it cli False"):
        _toy_parser(Mapping)


# ------------------------------------------------------------------ the real commands
def test_train_flags_override_the_config_file_and_only_those(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("lr: 1e-3\nepochs: 7\nmodel_options: {expert_dropout: 0.2}\n")
    parser = build_parser()
    args = parser.parse_args(["train", *TRAIN_ARGS, "--config", str(config), "--epochs", "2", "--folds", "3"])
    assert train_config(args) == TrainConfig(
        lr=1e-3, epochs=2, folds=3, model_options={"expert_dropout": 0.2}
    )
    assert train_config(parser.parse_args(["train", *TRAIN_ARGS])) == TrainConfig()
    with pytest.raises(SystemExit):  # --folds and --split stay exclusive
        parser.parse_args(["train", *TRAIN_ARGS, "--folds", "3", "--split", "s.csv"])


def test_the_help_shows_todays_defaults():
    assert "AdamW learning rate (default 1e-4)" in " ".join(_subparser("train").format_help().split())
    bench = " ".join(_subparser("bench").format_help().split())
    assert "feature dimension D (default 1024; 128 with --quick)" in bench
    assert "(default 1e-3)" in bench and "--train-batch-size" in bench and "--auc-seeds" in bench
    vqa = " ".join(_subparser("vqa", "train").format_help().split())
    assert "--train-compressor, --freeze-compressor" in vqa and "--gradient-checkpointing" in vqa
    assert "--stage {1,2}" in vqa and "--precision {auto,fp32,bf16}" in vqa


def test_eval_maps_batch_size_and_device_from_train_config():
    base = ["eval", "--checkpoint", "c", *TRAIN_ARGS]
    config = config_from_args(build_parser().parse_args([*base, "--batch-size", "3"]), TrainConfig())
    assert (config.eval_batch_size, config.device) == (3, "auto")


def test_bench_quick_keeps_the_preset_but_for_the_flags_given():
    args = build_parser().parse_args(["bench", "--quick", "--dim", "64", "--lr", "0.01", "--sizes", "500"])
    config = config_from_args(args, QUICK if args.quick else BenchConfig())
    assert config == dataclasses.replace(QUICK, dim=64, learning_rate=0.01, sizes=(500,))


def test_vqa_train_freeze_compressor_and_defaults():
    base = ["vqa", "train", "--stage", "2", "--data", "d.json", "--features", "f", "--out", "o"]
    parser = build_parser()
    assert config_from_args(parser.parse_args(base), SlideLMTrainConfig) == SlideLMTrainConfig(stage=2)
    frozen = config_from_args(parser.parse_args([*base, "--freeze-compressor"]), SlideLMTrainConfig)
    trained = config_from_args(parser.parse_args([*base, "--train-compressor"]), SlideLMTrainConfig)
    assert (frozen.train_compressor, trained.train_compressor) == (False, True)
    with pytest.raises(SystemExit):
        parser.parse_args(base[:2] + base[4:])  # --stage is required
