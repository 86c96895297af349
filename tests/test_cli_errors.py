"""The command line on bad input and bad luck: one line naming the file, slide or key, no traceback."""

import errno
import json
import sys

import pytest

from tcssa.cli import build_parser, main
from train_fixtures import write_cohort

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def cohort(tmp_path):
    return write_cohort(tmp_path / "cohort")


def _train_args(features, labels, out, *extra):
    return ["train", "--features", str(features), "--labels", str(labels), "--out", str(out),
            "--model", "mean", "--folds", "3", "--epochs", "1", "--device", "cpu", *extra]  # fmt: skip


def _one_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------- disk full, Ctrl-C
def test_a_full_disk_during_training_is_one_line_naming_the_file(cohort, tmp_path, monkeypatch, capsys):
    import tcssa.train.engine as engine

    features, labels = cohort
    out = tmp_path / "run"
    target = out / "fold_0" / "model.safetensors"

    def full(folder, model, config):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(engine, "save_model", full)
    assert main(_train_args(features, labels, out)) == 1
    line = _one_line(capsys.readouterr().err)
    assert line == (
        f"tcssa train: error: no space left on device writing {target}; "
        "free some space and continue with --resume"
    )


def test_ctrl_c_during_training_says_the_run_is_safe_and_how_to_continue(
    cohort, tmp_path, monkeypatch, capsys
):
    import tcssa.train.runs as runs

    features, labels = cohort
    out = tmp_path / "run"
    real_fit = runs.fit

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "fit", interrupted)
    assert main(_train_args(features, labels, out)) == 130
    line = _one_line(capsys.readouterr().err)
    assert line == f"tcssa train: interrupted; the run directory {out} is safe, continue with --resume"
    monkeypatch.setattr(runs, "fit", real_fit)
    assert main(_train_args(features, labels, out, "--resume")) == 0


def test_ctrl_c_before_the_run_started_says_nothing_was_written(cohort, tmp_path, monkeypatch, capsys):
    import tcssa.train.runs as runs

    features, labels = cohort

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "make_splits", interrupted)
    assert main(_train_args(features, labels, tmp_path / "run")) == 130
    line = _one_line(capsys.readouterr().err)
    run = tmp_path / "run"
    assert (
        line
        == f"tcssa train: interrupted before the run started; {run} holds no results (rerun the same command)"
    )


def test_tracebacks_come_back_with_tcssa_debug(cohort, tmp_path, monkeypatch):
    features, labels = cohort
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("TCSSA_DEBUG", "1")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        main(_train_args(features, labels, tmp_path / "file"))


# ------------------------------------------------------------------------ --out
def test_an_out_that_is_a_file_is_an_error_naming_it(cohort, tmp_path, capsys):
    features, labels = cohort
    taken = tmp_path / "results.txt"
    taken.write_text("mine")
    assert main(_train_args(features, labels, taken)) == 2
    assert _one_line(capsys.readouterr().err) == (
        f"tcssa train: error: {taken} exists and is a file, not a folder: choose another --out"
    )
    assert taken.read_text() == "mine"


def test_an_eval_out_that_is_a_file_is_an_error_naming_it(cohort, tmp_path, capsys):
    features, labels = cohort
    out = tmp_path / "run"
    assert main(_train_args(features, labels, out)) == 0
    taken = tmp_path / "eval.txt"
    taken.write_text("mine")
    args = ["eval", "--checkpoint", str(out / "fold_0"), "--features", str(features), "--labels", str(labels),
            "--out", str(taken)]  # fmt: skip
    capsys.readouterr()
    assert main(args) == 2
    line = _one_line(capsys.readouterr().err)
    assert (
        line
        == f"tcssa eval: error: cannot write {taken / 'predictions.csv'}: {taken} is a file, not a folder"
    )


def test_an_out_that_cannot_be_written_is_an_error_naming_it(cohort, tmp_path, monkeypatch, capsys):
    from pathlib import Path

    features, labels = cohort
    out = tmp_path / "read_only" / "run"
    real_mkdir = Path.mkdir

    def denied(self, *args, **kwargs):  # a read-only parent (root ignores chmod, so it is simulated)
        if str(self).startswith(str(tmp_path / "read_only")):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", denied)
    assert main(_train_args(features, labels, out)) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"tcssa train: error: cannot create the run directory {out}: Permission denied")


def test_a_second_training_into_a_run_in_progress_is_refused(cohort, tmp_path, capsys):
    from tcssa.io.run_guard import lock_run_dir

    features, labels = cohort
    out = tmp_path / "run"
    with lock_run_dir(out):
        assert main(_train_args(features, labels, out, "--resume")) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"tcssa train: error: {out} is in use by another tcssa run (pid " in line


def test_resume_after_the_labels_changed_names_the_file(cohort, tmp_path, capsys):
    features, labels = cohort
    out = tmp_path / "run"
    assert main(_train_args(features, labels, out)) == 0
    labels.write_text(labels.read_text().replace("slide_002,class_0", "slide_002,class_1"))
    capsys.readouterr()
    assert main(_train_args(features, labels, out, "--resume")) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"cannot resume {out}: the labels file {labels.resolve()} changed since the run started" in line


def test_too_many_folds_is_one_line(cohort, tmp_path, capsys):
    features, labels = cohort
    args = _train_args(features, labels, tmp_path / "run")
    args[args.index("--folds") + 1] = "30"
    assert main(args) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("tcssa train: error: ") and "30 folds" in line
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------- --config
def test_a_config_value_of_the_wrong_type_names_the_key_the_value_and_the_file(cohort, tmp_path, capsys):
    features, labels = cohort
    config = tmp_path / "train.yaml"
    config.write_text("lr: 1e-3\nepochs: 1.5\n")
    assert main(_train_args(features, labels, tmp_path / "run", "--config", str(config))) == 2
    line = _one_line(capsys.readouterr().err)
    assert line == f"tcssa train: error: {config}: option 'epochs' must be a whole number, got 1.5"
    config.write_text("null\n")
    assert main(_train_args(features, labels, tmp_path / "run", "--config", str(config))) == 2
    assert f"{config}: the config file holds no options" in _one_line(capsys.readouterr().err)


# -------------------------------------------------------------------- checkpoints
def test_eval_of_a_damaged_checkpoint_names_the_checkpoint_file(cohort, tmp_path, capsys):
    features, labels = cohort
    out = tmp_path / "run"
    assert main(_train_args(features, labels, out)) == 0
    config = out / "fold_0" / "model_config.json"
    saved = json.loads(config.read_text())
    eval_args = ["eval", "--checkpoint", str(out / "fold_0"), "--features", str(features),
                 "--labels", str(labels), "--out", str(tmp_path / "eval")]  # fmt: skip
    for broken, expected in (
        ("null", "expected a JSON object"),
        (json.dumps({**saved, "model": {**saved["model"], "in_dim": "16"}}), "model.in_dim must be a whole"),
    ):
        config.write_text(broken)
        capsys.readouterr()
        assert main(eval_args) == 2
        line = _one_line(capsys.readouterr().err)
        assert line.startswith(f"tcssa eval: error: checkpoint config {config}: {expected}")


# ------------------------------------------------------------ optional dependencies
def test_a_missing_vlm_extra_names_the_extra_to_install(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a)
    )
    assert main(["vqa", "demo", "--quick", "--out", str(tmp_path / "demo")]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line == (
        "tcssa vqa demo: error: `tcssa vqa demo` needs the optional package 'transformers', which is not "
        'installed: pip install "tcssa[vlm]"'
    )
    assert not (tmp_path / "demo").exists()


def test_a_missing_optional_module_deeper_down_names_its_extra(monkeypatch, capsys):
    import tcssa.apps.classic_mil_cv as benchmarks

    def needs(module):
        def run(config, out_dir):
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)

        return run

    monkeypatch.setattr(benchmarks, "run_cv", needs("mil"))
    assert main(["classic-mil", "cv", "--out", "x"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("tcssa classic-mil cv: error: ") and 'pip install "tcssa[classic-mil]"' in line
    monkeypatch.setattr(benchmarks, "run_cv", needs("not_ours"))
    with pytest.raises(ModuleNotFoundError):  # not an optional dependency: a bug, shown as one
        main(["classic-mil", "cv", "--out", "x"])


# ------------------------------------------------------------------------- naming
def _help(*path):
    parser = build_parser()
    for name in path:
        parser = parser._subparsers._group_actions[0].choices[name]
    return parser.format_help()


def test_the_help_names_ucsb_breast_cancer_by_its_name():
    for text in (build_parser().format_help(), _help("classic-mil", "cv"), _help("classic-mil", "show")):
        assert "ucsb" not in text.replace("ucsb_breast_cancer", "")
    assert "ucsb_breast_cancer" in build_parser().format_help()


def test_classic_mil_data_dir_help_says_where_the_mat_files_come_from():
    text = " ".join(_help("classic-mil", "cv").split())
    assert "MILSurvey" in text and "Andrews et al. 2003" in text
    assert "musk1, musk2, elephant, protein and ucsb_breast_cancer run without it" in text
    assert 'pip install "tcssa[classic-mil]"' in text


def test_vqa_train_takes_grad_accum_steps_and_the_old_name_quietly(capsys):
    from tcssa.cli.flags import config_from_args
    from tcssa.vlm.config import SlideLMTrainConfig

    parser = build_parser()
    base = ["vqa", "train", "--stage", "1", "--data", "d.json", "--features", "f", "--out", "o"]

    def grad_accum(*flags):
        return config_from_args(parser.parse_args([*base, *flags]), SlideLMTrainConfig).grad_accum

    assert grad_accum() == 1
    assert grad_accum("--grad-accum-steps", "4") == 4
    capsys.readouterr()
    assert grad_accum("--grad-accum", "3") == 3
    assert "--grad-accum is deprecated; use --grad-accum-steps" in capsys.readouterr().err
    text = _help("vqa", "train")
    assert "--grad-accum-steps" in text and "--grad-accum " not in text.replace("--grad-accum-steps", "")
    assert "--grad-accum-steps" in _help("train")


def test_vqa_demo_has_a_default_out_like_demo():
    parser = build_parser()
    assert parser.parse_args(["vqa", "demo", "--quick"]).out == "tcssa-vqa-demo"
    assert parser.parse_args(["demo", "--quick"]).out == "tcssa-demo"


def test_the_debug_variable_is_named_in_the_help():
    assert "TCSSA_DEBUG=1" in build_parser().format_help()


def test_module_entry_point_reports_errors_in_one_line(tmp_path):
    import subprocess

    (tmp_path / "c.yaml").write_text("epochs: many\n")
    cmd = [sys.executable, "-m", "tcssa", "train", "--features", str(tmp_path), "--labels", "x.csv",
           "--out", str(tmp_path / "run"), "--config", str(tmp_path / "c.yaml")]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 2
    assert _one_line(result.stderr) == (
        f"tcssa train: error: {tmp_path / 'c.yaml'}: option 'epochs' must be a whole number, got 'many'"
    )
