"""Run directories: a lock for the life of a run, the inputs' fingerprints on --resume, a restart in
place of a run that trained nothing, the cohort checked before anything is written, left-out slides."""

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from tcssa.io.run_guard import LOCK_FILE, RunDirError, lock_run_dir, nothing_trained
from tcssa.train import TrainConfig
from tcssa.train.runs import compare, train_run
from train_fixtures import write_cohort

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = TrainConfig(model="mean", epochs=1, folds=2, val_fraction=0.0, num_slots=4, lr=1e-3, device="cpu")


@pytest.fixture
def cohort(tmp_path):
    return write_cohort(tmp_path / "cohort", num_slides=12)


def _train(features, labels, out, **options):
    return train_run(features, labels, out, options.pop("config", CONFIG), verbose=False, **options)


def _flip_label(labels, slide="slide_003"):
    lines = labels.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith(slide + ","):
            name = line.split(",")[1]
            lines[i] = line.replace(name, "class_0" if name == "class_1" else "class_1")
    labels.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------ lock
def test_a_second_run_into_a_locked_directory_is_refused_naming_it(cohort, tmp_path):
    features, labels = cohort
    out = tmp_path / "run"
    with lock_run_dir(out):  # as if another process were training there
        for resume in (False, True):
            with pytest.raises(RunDirError) as info:
                _train(features, labels, out, resume=resume)
            message = str(info.value)
            assert (
                f"{out} is in use by another tcssa run (pid " in message and "choose another --out" in message
            )
        assert not (out / "config.json").exists()
    _train(features, labels, out)  # released: the run goes ahead
    assert (out / "summary.csv").is_file()


def test_the_lock_is_dropped_when_the_holding_process_dies(cohort, tmp_path):
    features, labels = cohort
    out = tmp_path / "run"
    out.mkdir()
    holder = (
        "import fcntl, sys, time\n"
        f"f = open({str(out / LOCK_FILE)!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.write('pid of the holder\\n'); f.flush(); print('locked', flush=True); time.sleep(120)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match="in use by another tcssa run"):
            _train(features, labels, out)
    finally:
        process.kill()  # SIGKILL: no clean-up in the holder, the OS drops the flock
        process.wait()
    _train(features, labels, out)
    assert (out / "summary.csv").is_file()


def test_a_finished_run_still_needs_resume(cohort, tmp_path):
    features, labels = cohort
    out = tmp_path / "run"
    _train(features, labels, out)
    with pytest.raises(ValueError, match=r"already holds a run \(config.json\); pass --resume"):
        _train(features, labels, out)
    _train(features, labels, out, resume=True)


def test_a_run_directory_that_is_a_file_or_under_one_is_an_error_naming_it(cohort, tmp_path):
    features, labels = cohort
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    with pytest.raises(RunDirError, match=rf"^{blocker} exists and is a file, not a folder"):
        _train(features, labels, blocker)
    with pytest.raises(
        RunDirError, match=rf"cannot create the run directory {blocker / 'run'}: {blocker} is a file"
    ):
        _train(features, labels, blocker / "run")


def test_a_run_directory_that_cannot_be_written_is_an_error_naming_it(cohort, tmp_path, monkeypatch):
    import builtins

    features, labels = cohort
    out = tmp_path / "read_only"
    out.mkdir()
    real_open = builtins.open

    def denied(path, *args, **kwargs):  # what a read-only folder does (root ignores chmod)
        if str(path).startswith(str(out)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denied)
    with pytest.raises(RunDirError, match=rf"cannot write in the run directory {out}: Permission denied"):
        _train(features, labels, out)


# ------------------------------------------------------------------ fingerprints
def test_resume_is_refused_when_the_labels_changed(cohort, tmp_path):
    features, labels = cohort
    out = tmp_path / "run"
    _train(features, labels, out)
    inputs = json.loads((out / "config.json").read_text())["inputs"]
    assert set(inputs) == {"labels_csv_sha256", "split_csv_sha256", "cohort_sha256", "splits_sha256"}
    _flip_label(labels)
    with pytest.raises(ValueError) as info:
        _train(features, labels, out, resume=True)
    message = str(info.value)
    assert message.startswith(
        f"cannot resume {out}: the labels file {labels.resolve()} changed since the run"
    )
    assert inputs["labels_csv_sha256"][:12] in message and "mix folds" in message


def test_resume_is_refused_when_the_split_file_changed(cohort, tmp_path):
    features, labels = cohort
    out = tmp_path / "run"
    _train(features, labels, out)
    split = tmp_path / "split.csv"
    split.write_text((out / "splits.csv").read_text())
    resumed = tmp_path / "from_split"
    _train(features, labels, resumed, split_csv=split)
    rows = split.read_text().splitlines()
    train_row = next(i for i, r in enumerate(rows) if r.startswith("0,train,"))
    rows[train_row] = rows[train_row].replace(",train,", ",val,")  # one training slide moved to val
    split.write_text("\n".join(rows) + "\n")
    with pytest.raises(
        ValueError, match=rf"cannot resume {resumed}: the split file {split.resolve()} changed"
    ):
        _train(features, labels, resumed, split_csv=split, resume=True)


def test_resume_is_refused_when_the_cohort_changed(cohort, tmp_path):
    features, labels = cohort
    out = tmp_path / "run"
    _train(features, labels, out, skip_missing=True)
    labels.write_text(labels.read_text() + "slide_999,class_1,case_999\n")  # labelled, no file yet
    with pytest.raises(ValueError, match="labels file .* changed"):
        _train(features, labels, out, skip_missing=True, resume=True)
    (features / "slide_000.h5").rename(features / "slide_000.hdf5")  # another file, same labels
    labels.write_text("".join(labels.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(ValueError, match=rf"cannot resume {out}: the cohort changed since the run started"):
        _train(features, labels, out, skip_missing=True, resume=True)


def test_a_run_from_before_the_fingerprints_resumes(cohort, tmp_path):
    features, labels = cohort
    out = tmp_path / "run"
    _train(features, labels, out)
    path = out / "config.json"
    old = json.loads(path.read_text())
    for key in ("inputs", "num_slides_left_out", "slides_left_out"):
        del old[key]
    path.write_text(json.dumps(old))
    _train(features, labels, out, resume=True)


# -------------------------------------------------- bad input before the run starts
def _poison(path, value=np.nan):
    with h5py.File(path, "r+") as f:
        x = f["features"][()]
        x[1, 0] = value
        f["features"][...] = x


def test_a_nan_feature_is_named_and_once_fixed_the_same_command_runs(tmp_path):
    from tcssa.cli import main

    features, labels = write_cohort(tmp_path / "cohort")  # 24 slides: the CLI's validation share
    bad = features / "slide_007.h5"
    with h5py.File(bad) as f:
        good = f["features"][()]
    _poison(bad)
    out = tmp_path / "run"
    args = ["train", "--features", str(features), "--labels", str(labels), "--out", str(out),
            "--model", "mean", "--folds", "3", "--epochs", "1", "--device", "cpu"]  # fmt: skip
    assert main(args) == 2
    assert not (out / "config.json").exists()  # nothing that would ask for --resume
    with h5py.File(bad, "r+") as f:
        f["features"][...] = good
    assert main(args) == 0  # the same command, no --resume
    assert (out / "summary.csv").is_file()


def test_the_error_for_a_nan_feature_names_the_file(cohort, tmp_path, capsys):
    from tcssa.cli import main

    features, labels = cohort  # fails before any split is made
    _poison(features / "slide_011.h5")
    args = ["train", "--features", str(features), "--labels", str(labels), "--out", str(tmp_path / "run"),
            "--model", "mean", "--folds", "2", "--epochs", "1"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "slide_011" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_run_that_stopped_before_its_first_epoch_ended_restarts_in_place(
    cohort, tmp_path, monkeypatch, capsys
):
    import tcssa.train.runs as runs

    features, labels = cohort
    out = tmp_path / "run"
    real_fit = runs.fit

    def broken(*args, **kwargs):
        (kwargs["out_dir"]).mkdir(parents=True, exist_ok=True)
        (kwargs["out_dir"] / "metrics.jsonl").write_text("")  # what fit leaves before epoch 1 ends
        raise RuntimeError("stopped in epoch 1")

    monkeypatch.setattr(runs, "fit", broken)
    with pytest.raises(RuntimeError):
        _train(features, labels, out)
    assert (out / "config.json").is_file() and nothing_trained(out)
    monkeypatch.setattr(runs, "fit", real_fit)
    _train(features, labels, out, config=CONFIG.override(lr=2e-3))  # other settings, no --resume
    assert "stopped before its first epoch ended; starting it again" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["lr"] == 2e-3
    assert not nothing_trained(out)


# ---------------------------------------------------------- slides the split leaves out
def test_config_counts_only_the_slides_the_split_uses(cohort, tmp_path, caplog, capsys):
    from tcssa.data import load_splits

    features, labels = cohort
    full = tmp_path / "full"
    _train(features, labels, full)
    config = json.loads((full / "config.json").read_text())
    assert (config["num_slides"], config["num_slides_left_out"], config["slides_left_out"]) == (12, 0, [])
    kept = [r for r in (full / "splits.csv").read_text().splitlines()[1:] if r.startswith("0,")]
    dropped = sorted({r.split(",")[2] for r in kept if r.split(",")[1] == "test"})[:3]
    split = tmp_path / "split.csv"
    split.write_text(
        "fold,split,slide_id\n" + "\n".join(r for r in kept if r.split(",")[2] not in dropped) + "\n"
    )
    with caplog.at_level("WARNING"):
        _train(features, labels, tmp_path / "part", split_csv=split)
    config = json.loads((tmp_path / "part" / "config.json").read_text())
    assert (config["num_slides"], config["num_slides_left_out"]) == (9, 3)
    assert config["slides_left_out"] == dropped
    assert str(split) in caplog.text and ", ".join(dropped) in caplog.text  # load_splits names them
    # splits handed over directly: the run says so itself
    capsys.readouterr()
    _train(features, labels, tmp_path / "given", splits=load_splits(split))
    out = capsys.readouterr().out
    assert "note: 3 labelled slide(s) are in no fold of the given splits and take no part in the run: " in out
    assert ", ".join(dropped) in out


# ------------------------------------------------------------------------ compare
def test_compare_locks_its_folder_and_refuses_other_folds_once_trained(cohort, tmp_path):
    features, labels = cohort
    out = tmp_path / "cmp"
    with lock_run_dir(out):
        with pytest.raises(ValueError, match=f"{out} is in use by another tcssa run"):
            compare(features, labels, ["mean"], out, CONFIG)
    compare(features, labels, ["mean"], out, CONFIG)
    with pytest.raises(ValueError, match=rf"{out} holds a comparison trained on other folds"):
        compare(features, labels, ["mean"], out, CONFIG.override(seed=1), resume=True)
    assert (out / "mean" / "summary.csv").is_file()
