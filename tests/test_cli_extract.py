"""``tcssa extract``: its flags are ExtractConfig's fields; exit status 1 when a slide failed."""

import argparse
import dataclasses
import importlib.util

import h5py
import pytest

import wsi_fakes

wsi_fakes.install_missing_parts()

from tcssa.cli import build_parser, main  # noqa: E402
from tcssa.cli.flags import cli_fields, config_from_args, flag_name  # noqa: E402
from tcssa.wsi.config import ExtractConfig  # noqa: E402


def _extract_parser() -> argparse.ArgumentParser:
    return build_parser()._subparsers._group_actions[0].choices["extract"]


def test_every_field_of_extract_config_has_its_flag():
    actions = {action.dest: action for action in _extract_parser()._actions}
    for f in cli_fields(ExtractConfig):
        assert f.metadata.get("help"), f.name
        action = actions[f.name]
        assert flag_name(f) in action.option_strings and action.default is argparse.SUPPRESS
        assert action.help.startswith(f.metadata["help"].replace("%", "%%"))
    args = build_parser().parse_args(
        ["extract", "s", "--out", "o", "--magnification", "10", "--workers", "2", "--mask", "m.geojson"]
    )
    config = config_from_args(args, ExtractConfig())
    assert config == ExtractConfig(target_magnification=10, num_workers=2, mask_path="m.geojson")
    assert (args.slides, args.out) == ("s", "o")


@pytest.fixture
def slides(tmp_path, monkeypatch):
    wsi_fakes.swap_in(monkeypatch)
    folder = tmp_path / "slides"
    wsi_fakes.write_slide(folder / "a.svs")
    wsi_fakes.write_slide(folder / "b.svs", tissue_columns=2)
    return folder


def test_extract_writes_the_features_and_prints_the_summary(slides, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["extract", str(slides), "--out", str(out), "--encoder", "fake-mean", "--magnification", "10"]
    assert main([*argv, "--batch-size", "2", "--no-thumbnails", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "2 slides extracted" in printed and "0 failed" in printed
    with h5py.File(out / "features_fake-mean" / "a.h5", "r") as f:
        assert (
            f["coords"].attrs["patch_size_level0"] == 512 and f["coords"].attrs["target_magnification"] == 10
        )
    assert not (out / "thumbnails").exists()
    assert main([*argv, "--no-thumbnails", "--no-progress"]) == 0  # again: both skipped
    assert "2 skipped (already done)" in capsys.readouterr().out


def test_extract_exits_1_when_a_slide_failed_and_2_on_a_bad_request(slides, tmp_path, capsys):
    (slides / "broken.svs").write_text("not a slide")
    out = str(tmp_path / "out")
    assert main(["extract", str(slides), "--out", out, "--encoder", "fake-mean", "--no-thumbnails"]) == 1
    printed = capsys.readouterr()
    assert "1 failed" in printed.out and "broken.svs: " in printed.out and "failed: " in printed.err
    assert main(["extract", str(tmp_path / "nowhere"), "--out", out, "--encoder", "fake-mean"]) == 2
    assert "tcssa extract: error: no such slide file or folder" in capsys.readouterr().err
    assert main(["extract", str(slides), "--out", out, "--encoder", "fake-mean", "--min-tissue", "2"]) == 2
    assert "min tissue is a share of the tile" in capsys.readouterr().err


@pytest.mark.skipif(
    importlib.util.find_spec("tcssa.viz.slides") is None, reason="tcssa.viz.slides not merged yet"
)
def test_extract_draws_the_thumbnails(slides, tmp_path):
    out = tmp_path / "out"
    assert (
        main(["extract", str(slides / "a.svs"), "--out", str(out), "--encoder", "fake-mean", "--no-progress"])
        == 0
    )
    assert sorted(p.name for p in (out / "thumbnails").iterdir()) == ["a.png", "a_grid.png", "a_mask.png"]


def test_extract_config_fields_are_the_keyword_arguments_of_extract_folder():
    import inspect

    from tcssa.wsi.extract import extract_folder, extract_slide

    names = {f.name for f in dataclasses.fields(ExtractConfig)}
    for function in (extract_folder, extract_slide):
        assert names <= set(inspect.signature(function).parameters), function.__name__
