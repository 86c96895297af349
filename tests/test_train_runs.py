import csv
import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from tcssa.cli import main
from tcssa.io.checkpoints import save_model
from tcssa.io.runs import COMPARISON_COLUMNS, SUMMARY_COLUMNS
from tcssa.train.runs import load_checkpoint
from train_fixtures import write_cohort

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def cohort(tmp_path):
    return write_cohort(tmp_path / "cohort")


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _train_args(features, labels, out, *extra):
    return [
        "train", "--features", str(features), "--labels", str(labels), "--out", str(out),
        "--folds", "3", "--epochs", "2", "--num-slots", "4", "--batch-size", "2", "--lr", "1e-3", *extra,
    ]  # fmt: skip


def test_train_writes_the_run_directory_contract(cohort, tmp_path, capsys):
    features, labels = cohort
    out = tmp_path / "run"
    assert main(_train_args(features, labels, out, "--model", "tcssa")) == 0
    assert "tcssa: test AUC" in capsys.readouterr().out

    summary = _rows(out / "summary.csv")
    assert list(summary[0]) == SUMMARY_COLUMNS
    assert [r["fold"] for r in summary] == ["0", "1", "2"]
    assert all(0 <= float(r["test_auc"]) <= 1 and int(r["epochs"]) == 2 for r in summary)

    config = json.loads((out / "config.json").read_text())
    assert (config["model"], config["num_slots"], config["epochs"], config["lr"]) == ("tcssa", 4, 2, 1e-3)
    assert config["features_dir"] == str(features.resolve())
    assert json.loads((out / "class_map.json").read_text()) == {"class_names": ["class_0", "class_1"]}

    splits = _rows(out / "splits.csv")
    tested = sorted(r["slide_id"] for r in splits if r["split"] == "test")
    assert tested == sorted(f"slide_{i:03d}" for i in range(24))  # test parts partition the cohort

    for fold in range(3):
        preds = _rows(out / f"fold_{fold}_predictions.csv")
        assert list(preds[0]) == ["slide_id", "label", "pred", "p_0", "p_1"]
        fold_tests = {r["slide_id"] for r in splits if r["fold"] == str(fold) and r["split"] == "test"}
        assert {r["slide_id"] for r in preds} == fold_tests
        for r in preds:
            assert float(r["p_0"]) + float(r["p_1"]) == pytest.approx(1, abs=1e-5)
            assert int(r["pred"]) == int(float(r["p_1"]) > float(r["p_0"]))
        assert (out / f"fold_{fold}" / "model.safetensors").is_file()
        assert json.loads((out / f"fold_{fold}" / "model_config.json").read_text())["model"]["num_slots"] == 4
        log = [json.loads(line) for line in (out / f"fold_{fold}" / "metrics.jsonl").read_text().splitlines()]
        assert [e["epoch"] for e in log] == [1, 2]
        assert {"train_loss", "train_switch_loss", "val_loss", "val_auc", "lr"} <= set(log[0])
        assert not (out / f"fold_{fold}" / "resume.safetensors").exists()  # removed once the fold is done

    util = _rows(out / "slot_utilisation.csv")
    assert list(util[0]) == ["fold", "slot", "count", "share", "patch_share"]
    assert len(util) == 3 * 4
    for fold in range(3):
        shares = [float(r["share"]) for r in util if r["fold"] == str(fold)]
        patch_shares = [float(r["patch_share"]) for r in util if r["fold"] == str(fold)]
        assert sum(shares) == pytest.approx(1, abs=1e-4)
        assert sum(patch_shares) == pytest.approx(2, abs=1e-4)  # top-2: each patch in two slots

    # the same --out again needs --resume; with it, finished folds are not retrained
    assert main(_train_args(features, labels, out, "--model", "tcssa")) == 2
    assert "pass --resume" in capsys.readouterr().err
    before = (out / "summary.csv").read_text()
    started = time.perf_counter()
    assert main(_train_args(features, labels, out, "--model", "tcssa", "--resume")) == 0
    assert (out / "summary.csv").read_text() == before
    assert main(_train_args(features, labels, out, "--model", "tcssa", "--resume", "--epochs", "3")) == 2
    assert "settings differ" in capsys.readouterr().err and time.perf_counter() - started < 60

    # eval on one fold's test slides reproduces that fold's predictions; compress writes the slots
    fold_tests = sorted(r["slide_id"] for r in splits if r["fold"] == "1" and r["split"] == "test")
    lines = [line for line in labels.read_text().splitlines() if line.split(",")[0] in fold_tests]
    test_labels = tmp_path / "test_labels.csv"
    test_labels.write_text("slide_id,label\n" + "\n".join(",".join(line.split(",")[:2]) for line in lines))
    assert main(["eval", "--checkpoint", str(out / "fold_1"), "--features", str(features),
                 "--labels", str(test_labels), "--out", str(tmp_path / "eval")]) == 0  # fmt: skip
    evaluated = {r["slide_id"]: r for r in _rows(tmp_path / "eval" / "predictions.csv")}
    for r in _rows(out / "fold_1_predictions.csv"):
        assert float(evaluated[r["slide_id"]]["p_1"]) == pytest.approx(float(r["p_1"]), abs=1e-5)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["auc"] == pytest.approx(float(summary[1]["test_auc"]), abs=1e-6)

    assert main(["compress", "--checkpoint", str(out / "fold_1" / "model.safetensors"),
                 "--features", str(features), "--out", str(tmp_path / "slots")]) == 0  # fmt: skip
    model, _ = load_checkpoint(out / "fold_1")
    with h5py.File(tmp_path / "slots" / "slide_005.h5") as f:
        tokens, index, weight = f["tokens"][()], f["topk_index"][()], f["topk_weight"][()]
        n = f.attrs["num_patches"]
    from tcssa.io.features import read_bag

    bag = read_bag(features / "slide_005.h5")
    expected = model.routing(bag.features.unsqueeze(0))
    assert tokens.shape == (4, 16) and index.shape == (n, 2) == weight.shape
    np.testing.assert_allclose(tokens, expected.tokens[0].detach().numpy(), atol=1e-6)
    assert (index == expected.topk_index[0].numpy()).all()

    # a gate that sends every patch to slot 2 is reported as collapse
    with torch.no_grad():
        model.compressor.gate.bias[2] += 100.0
    save_model(tmp_path / "collapsed", model, json.loads((out / "fold_1" / "model_config.json").read_text()))
    eval_args = ["eval", "--checkpoint", str(tmp_path / "collapsed"), "--features", str(features),
                 "--labels", str(test_labels), "--out", str(tmp_path / "eval_collapsed")]  # fmt: skip
    assert main(eval_args) == 0
    err = capsys.readouterr().err
    assert "slot collapse" in err and "slot 2 receives 100% of the patches" in err
    use = _rows(tmp_path / "eval_collapsed" / "slot_utilisation.csv")
    assert float(use[2]["patch_share"]) == 1.0 and float(use[2]["share"]) == 0.5


def test_compare_takes_models_with_options_for_a_sweep(cohort, tmp_path):
    import json

    from tcssa.mil import parse_model_spec

    features, labels = cohort
    out = tmp_path / "sweep"
    args = ["compare", "--features", str(features), "--labels", str(labels), "--out", str(out),
            "--models", "tcssa:aux_weight=0:expert_hidden=8,tcssa:aux_weight=1:expert_hidden=8",
            "--folds", "3", "--epochs", "1", "--num-slots", "4"]  # fmt: skip
    assert main(args) == 0
    rows = _rows(out / "comparison.csv")
    assert [r["model"] for r in rows] == [
        "tcssa:aux_weight=0:expert_hidden=8",
        "tcssa:aux_weight=1:expert_hidden=8",
    ]
    for row, weight in zip(rows, (0, 1), strict=True):
        saved = json.loads((out / row["model"] / "fold_0" / "model_config.json").read_text())
        assert saved["model"]["name"] == "tcssa" and saved["model"]["aux_weight"] == weight
    assert parse_model_spec("abmil:embed_dims=[64]:dropout=0.1") == (
        "abmil",
        {"embed_dims": [64], "dropout": 0.1},
    )
    assert parse_model_spec("tcssa:head=attention") == ("tcssa", {"head": "attention"})
    with pytest.raises(ValueError, match="unknown model 'clam'"):
        parse_model_spec("clam:x=1")
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        parse_model_spec("tcssa:aux_weight")


def test_compare_runs_every_model_on_the_same_folds(cohort, tmp_path, capsys):
    features, labels = cohort
    out = tmp_path / "cmp"
    args = ["compare", "--features", str(features), "--labels", str(labels), "--out", str(out),
            "--models", "mean,random-k", "--folds", "3", "--epochs", "1", "--num-slots", "4"]  # fmt: skip
    assert main(args) == 0
    assert "| mean |" in capsys.readouterr().out
    rows = _rows(out / "comparison.csv")
    assert list(rows[0]) == COMPARISON_COLUMNS
    assert [(r["model"], r["tokens"]) for r in rows] == [("mean", "1"), ("random-k", "4")]
    for r in rows:
        aucs = [float(s["test_auc"]) for s in _rows(out / r["model"] / "summary.csv")]
        assert float(r["auc_mean"]) == pytest.approx(np.mean(aucs), abs=1e-5)
        assert (out / r["model"] / "splits.csv").read_text() == (out / "splits.csv").read_text()
    assert "| model | AUC |" in (out / "comparison.md").read_text()


def test_labels_that_match_no_feature_file_are_refused(cohort, tmp_path, capsys):
    features, _ = cohort
    labels = tmp_path / "other.csv"
    labels.write_text("slide_id,label\nA1,tumour\nA2,normal\n")
    assert main(_train_args(features, labels, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "no feature file for 2 of 2 slides: A1, A2" in err
    assert main(_train_args(features, labels, tmp_path / "run", "--skip-missing")) == 2
    assert "none of the 2 slides has a feature file" in capsys.readouterr().err


def test_a_class_missing_from_a_training_fold_is_refused(cohort, tmp_path, capsys):
    features, labels = cohort
    split = tmp_path / "split.csv"
    ones = [f"slide_{i:03d}" for i in range(1, 24, 2)]
    zeros = [f"slide_{i:03d}" for i in range(0, 24, 2)]
    rows = ["fold,split,slide_id"] + [f"0,train,{s}" for s in zeros] + [f"0,test,{s}" for s in ones]
    split.write_text("\n".join(rows) + "\n")
    assert main([*_train_args(features, labels, tmp_path / "run")[:7], "--split", str(split)]) == 2
    assert "fold 0: class(es) ['class_1'] have no training slide" in capsys.readouterr().err


def _kill_when(path_test, process, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path_test():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.05)
    process.kill()
    return False


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_to_the_same_fold_results(cohort, tmp_path):
    features, labels = cohort
    args = _train_args(features, labels, tmp_path / "whole", "--model", "tcssa")
    args[args.index("--epochs") + 1] = "4"
    assert main(args) == 0

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "tcssa", *args]
    cmd[cmd.index(str(tmp_path / "whole"))] = str(killed)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = killed / "fold_1" / "metrics.jsonl"
    # killed in fold 1 once its first epoch is logged: fold 0 done, fold 1 part-way through epoch 2
    assert _kill_when(lambda: log.is_file() and log.read_text().count("\n") >= 1, process)
    assert not (killed / "fold_1" / "result.json").exists()

    resumed = [*args, "--resume"]
    resumed[resumed.index(str(tmp_path / "whole"))] = str(killed)
    assert main(resumed) == 0
    drop_time = lambda rows: [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows]
    assert drop_time(_rows(killed / "summary.csv")) == drop_time(_rows(tmp_path / "whole" / "summary.csv"))
    for fold in range(3):
        name = f"fold_{fold}_predictions.csv"
        assert (killed / name).read_text() == (tmp_path / "whole" / name).read_text()


@pytest.mark.slow
def test_torchrun_with_two_processes_matches_one_process(cohort, tmp_path):
    features, labels = cohort
    config = tmp_path / "deterministic.yaml"  # no dropout: the two runs draw their noise differently
    config.write_text("model: mean\nmodel_options: {head_dropout: 0.0}\n")
    args = _train_args(features, labels, tmp_path / "one", "--config", str(config), "--device", "cpu")
    assert main(args) == 0
    two = [str(tmp_path / "two") if a == str(tmp_path / "one") else a for a in args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "tcssa"]
    result = subprocess.run([*torchrun, *two], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
    for fold in range(3):
        one = _rows(tmp_path / "one" / f"fold_{fold}_predictions.csv")
        two_rows = _rows(tmp_path / "two" / f"fold_{fold}_predictions.csv")
        assert [r["slide_id"] for r in one] == [r["slide_id"] for r in two_rows]
        for a, b in zip(one, two_rows, strict=True):
            assert float(a["p_1"]) == pytest.approx(float(b["p_1"]), abs=1e-5)
