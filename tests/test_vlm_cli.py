"""The `tcssa vqa` commands end to end on a tiny question file, tiny features and the tiny offline LM."""

import csv
import json
import shlex

import pytest
import torch
from safetensors.torch import load_file, save_file

from tcssa.cli import main
from tcssa.io.features import write_h5
from tcssa.io.slidelm import load_compressor
from tcssa.method.compressor import TCSSA
from tcssa.vlm.checkpoint import load_run

D = 8


def vqa(command: str) -> int:
    """Run ``tcssa vqa <command>`` (the paths in these tests hold no spaces)."""
    return main(["vqa", *shlex.split(command)])


HEADER = [
    "ID",
    "Slide",
    "Tumor",
    "Broad Category",
    "Narrow Category",
    "Question",
    "A",
    "B",
    "C",
    "D",
    "Answer",
]


def write_questions(path, slide_ids, missing=()):
    with open(path, "w", newline="", encoding="utf-8-sig") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        for i, slide in enumerate([*slide_ids, *missing]):
            broad = "Diagnosis" if i % 2 else "Microscopy"
            writer.writerow(
                [
                    i + 1,
                    f"feats/{slide}.h5",
                    "X",
                    broad,
                    "Grading",
                    "Which grade?",
                    "G1",
                    "G2",
                    "G3",
                    "",
                    "ABC"[i % 3],
                ]
            )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    features = root / "features"
    features.mkdir()
    gen = torch.Generator().manual_seed(0)
    slides = [f"TCGA-{i:02d}" for i in range(6)]
    for i, slide in enumerate(slides):
        write_h5(features / f"{slide}.h5", torch.randn(10 + i, D, generator=gen))
    write_questions(root / "train.csv", slides)
    write_questions(root / "test.csv", slides[:4], missing=["TCGA-99"])
    assert vqa(f"init-lm --text {root}/train.csv --out {root}/lm --hidden 32 --layers 1 --vocab 300") == 0
    return root


@pytest.fixture(scope="module")
def trained(workspace):
    """The workspace with a stage-1 run in s1 and a stage-2 run from it in s2. A fixture, not the work
    of one test, so that every test that evaluates a run also passes when it runs alone."""
    root = workspace
    common = f"--data {root}/train.csv --features {root}/features --num-tokens 4 --projector-hidden 16"
    assert vqa(f"train --stage 1 --lm {root}/lm --out {root}/s1 --batch-size 3 {common}") == 0
    stage2 = f"train --stage 2 --init {root}/s1 --out {root}/s2 --batch-size 3 --gradient-checkpointing"
    assert vqa(f"{stage2} {common}") == 0
    return root


def test_train_both_stages_and_evaluate(trained, capsys):
    root = trained
    assert (root / "s1" / "compressor.safetensors").is_file()  # trained jointly: saved
    assert not (root / "s1" / "lora").exists()
    assert not any(p.name.startswith("model") for p in (root / "s1").iterdir())  # no LM weights copied
    assert (root / "s2" / "lora" / "adapter_model.safetensors").is_file()
    config = json.loads((root / "s2" / "train_config.json").read_text())
    assert config["lora_r"] == 16 and config["lora_alpha"] == 32 and config["lora_dropout"] == 0.05
    assert config["trainable_parameters"]["compressor"] == 0 and config["trainable_parameters"]["lm"] > 0
    adapter = json.loads((root / "s2" / "lora" / "adapter_config.json").read_text())
    targets = {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    capsys.readouterr()

    out = root / "eval"
    evaluate = f"eval --run {root}/s2 --questions {root}/test.csv --features {root}/features --out {out}"
    assert vqa(f"{evaluate} --mode both --prior-from {root}/train.csv") == 0
    assert "1 slide(s) have no features" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "accuracy.csv")))
    overall = {r["method"]: r for r in rows if r["level"] == "overall"}
    prior = "prior: always A (most frequent in train)"
    assert set(overall) == {"s2 loglik (letter)", "s2 generate", prior, "prior: uniform random"}
    for row in overall.values():
        assert row["n"] == "5"  # the question without features stays in the denominator
    assert overall["s2 loglik (letter)"]["n_missing"] == "1"
    assert float(overall["prior: uniform random"]["accuracy"]) == pytest.approx(1 / 3, abs=1e-4)
    assert {r["category"] for r in rows if r["level"] == "broad"} == {"Microscopy", "Diagnosis"}
    predictions = list(csv.DictReader(open(out / "predictions_loglik.csv")))
    missing = [p for p in predictions if p["slide_id"] == "TCGA-99"]
    assert missing[0]["status"] == "missing_features" and missing[0]["correct"] == "False"
    assert all(p["prediction"] in "ABC" and p["prediction"] for p in predictions if p["status"] == "ok")
    assert (out / "missing_slides.txt").read_text() == "TCGA-99\n"

    # Deterministic: the run reloads to the same scores.
    first = (out / "predictions_loglik.csv").read_text()
    assert vqa(f"{evaluate} --mode loglik") == 0
    assert (out / "predictions_loglik.csv").read_text() == first


def test_stage1_with_a_mil_checkpoint_keeps_it_by_reference(workspace, tmp_path):
    root = workspace
    torch.manual_seed(0)
    compressor = TCSSA(D, num_slots=4, expert_hidden=6)
    state = {f"compressor.{k}": v for k, v in compressor.state_dict().items()}
    state["head.net.0.weight"] = torch.zeros(2, D)
    checkpoint = tmp_path / "model.safetensors"
    save_file(state, str(checkpoint))
    # tcssa train's layout: fold_k/model.safetensors + model_config.json {"model": build_model config}
    config = {"model": {"name": "tcssa", "in_dim": D, "num_slots": 4, "expert_dropout": 0.1}, "fold": 0}
    (tmp_path / "model_config.json").write_text(json.dumps(config))
    loaded = load_compressor(tmp_path)  # the fold folder
    assert (loaded.num_slots, loaded.dim, loaded.config.expert_dropout) == (4, D, 0.1)
    (tmp_path / "model_config.json").write_text(json.dumps(config["model"]))  # the bare model config
    assert load_compressor(tmp_path).config.expert_dropout == 0.1
    (tmp_path / "model_config.json").write_text(json.dumps(config))
    data = f"--data {root}/train.csv --features {root}/features --projector-hidden 16"
    assert (
        vqa(f"train --stage 1 --lm {root}/lm {data} --out {tmp_path}/run --mil-checkpoint {checkpoint}") == 0
    )
    assert not (tmp_path / "run" / "compressor.safetensors").exists()  # frozen: referenced, not copied
    model, _, info = load_run(tmp_path / "run")
    assert info["compressor_source"].endswith("model.safetensors")
    assert torch.equal(model.compressor.gate.weight, compressor.gate.weight)
    projector = load_file(str(tmp_path / "run" / "projector.safetensors"))
    assert set(projector) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    save_file({"gate.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="no TC-SSA compressor"):
        load_compressor(tmp_path / "other.safetensors")


def test_cli_errors_are_clear(workspace, capsys):
    root = workspace
    where = f"--features {root}/features --out {root}/x"
    assert vqa(f"train --stage 2 --data {root}/train.csv {where}") == 2
    assert "stage 2 starts from a stage-1 run folder" in capsys.readouterr().err
    write_questions(root / "gone.csv", ["TCGA-00", "TCGA-77"])
    assert vqa(f"train --stage 1 --lm {root}/lm --data {root}/gone.csv {where}") == 2
    assert "TCGA-77" in capsys.readouterr().err
    assert vqa(f"eval --run {root}/nope --questions {root}/test.csv {where}") == 2
    assert "not a SlideLM run folder" in capsys.readouterr().err


@pytest.mark.slow
def test_stage2_under_torchrun_shards_the_data(workspace, tmp_path):
    """Two CPU processes (gloo): each trains on half of the samples, rank 0 alone writes the run."""
    import subprocess
    import sys

    root = workspace
    common = f"--data {root}/train.csv --features {root}/features --num-tokens 4 --projector-hidden 16"
    assert vqa(f"train --stage 1 --lm {root}/lm --out {tmp_path}/s1 --batch-size 2 {common}") == 0
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "tcssa", "vqa"]
    stage2 = f"train --stage 2 --init {tmp_path}/s1 --out {tmp_path}/s2 --batch-size 1 {common}"
    command = [*launcher, *shlex.split(stage2)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "s2" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 3  # 6 samples / 2 processes / batch 1, one epoch
    assert (tmp_path / "s2" / "lora" / "adapter_model.safetensors").is_file()


def test_eval_refuses_to_run_as_several_processes(trained, monkeypatch, capsys):
    root = trained
    monkeypatch.setenv("WORLD_SIZE", "2")
    where = f"--questions {root}/test.csv --features {root}/features --out {root}/x"
    assert vqa(f"eval --run {root}/s1 {where}") == 2
    assert "runs as one process" in capsys.readouterr().err


def test_wsi_vqa_case_ids_reach_slide_features_through_a_slide_map(trained):
    root = trained
    records = [
        {"Id": "TCGA-AA-0001", "Question": "grade?", "Choice": ["G1", "G2", "G3"], "Answer": "G2."},
        {"Id": "TCGA-AA-0002", "Question": "grade?", "Choice": ["G1", "G2", "G3"], "Answer": "G3"},
        {"Id": "TCGA-AA-0002", "Question": "vital status?", "Answer": "Alive"},  # open: left out
    ]
    (root / "wsi.json").write_text(json.dumps(records))
    (root / "map.csv").write_text("key,slide_id\nTCGA-AA-0001,TCGA-00\nTCGA-AA-0002,TCGA-01\n")
    out = root / "wsi_eval"
    where = f"--questions {root}/wsi.json --features {root}/features --mode loglik"
    assert vqa(f"eval --run {root}/s2 {where} --out {out} --slide-map {root}/map.csv") == 0
    summary = json.loads((out / "eval_summary.json").read_text())
    assert summary["n_questions"] == 2 and summary["n_open_left_out"] == 1
    assert summary["n_questions_missing_features"] == 0
    assert vqa(f"eval --run {root}/s2 {where} --out {out}") == 0  # without the map: both missing
    assert json.loads((out / "eval_summary.json").read_text())["n_questions_missing_features"] == 2


def test_damaged_mil_checkpoints_and_run_folders_name_the_file(tmp_path):
    compressor = TCSSA(D, num_slots=4, expert_hidden=6)
    state = {f"compressor.{k}": v for k, v in compressor.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    config_file = tmp_path / "model_config.json"
    good = {"name": "tcssa", "in_dim": D, "num_slots": 4}
    for bad, match in (
        (None, "expected a JSON object"),
        ({"model": {**good, "in_dim": "32"}, "class_names": ["a", "b"]}, r"model\.in_dim must be a whole"),
        ({"model": {**good, "top_k": "2"}, "class_names": ["a", "b"]}, r"model\.top_k must be a whole"),
        ({"model": {**good, "noise_std": None}, "class_names": ["a", "b"]}, r"model\.noise_std must be"),
    ):
        config_file.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match) as err:
            load_compressor(tmp_path)
        assert "model_config.json" in str(err.value)
    config_file.unlink()
    state["compressor.gate.weight"][0, 0] = float("nan")
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.safetensors: non-finite values in gate\.weight"):
        load_compressor(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        load_compressor(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    for text, match in (
        ("null", "expected a JSON object"),
        ("{", "not readable JSON"),
        ('{"lm": "x"}', "no 'slidelm'"),
    ):
        (run / "slidelm.json").write_text(text)
        with pytest.raises(ValueError, match=match) as err:
            load_run(run)
        assert "slidelm.json" in str(err.value)


def test_a_variant_checkpoint_gives_its_compressor_and_a_centred_one_is_refused(tmp_path):
    from tcssa.io.checkpoints import save_model
    from tcssa.mil import build_model

    for name, refused in (("tcssa-kmeans-attn", False), ("tcssa-centred-kmeans", True)):
        folder = tmp_path / name
        model = build_model(name, D, 2, num_slots=4, expert_hidden=6)
        save_model(folder, model, {"model": model.config, "fold": 0})
        if refused:
            with pytest.raises(ValueError, match="center=true"):
                load_compressor(folder)
        else:
            loaded = load_compressor(folder)
            assert torch.equal(loaded.gate.weight, model.compressor.gate.weight)


def test_blind_evaluation_needs_no_features_and_reports_per_category(workspace, tmp_path):
    root = workspace
    out = tmp_path / "blind"
    assert vqa(f"blind --lm {root}/lm --questions {root}/test.csv --out {out} --score both") == 0
    rows = list(csv.DictReader(open(out / "accuracy.csv")))
    methods = {r["method"] for r in rows}
    assert {"lm slide-blind (letter log-likelihood)", "lm slide-blind (text log-likelihood)"} <= methods
    overall = [r for r in rows if r["category"] == "overall"]
    # every question is answered, the one whose slide has no features too: the LM never sees a slide
    assert len({r["n"] for r in overall}) == 1 and all(r["n_missing"] == "0" for r in overall)
    predictions = list(csv.DictReader(open(out / "predictions_blind_text.csv")))
    assert len(predictions) == int(overall[0]["n"]) and all(p["prediction"] for p in predictions)
    sampled = tmp_path / "sampled"
    assert vqa(f"blind --lm {root}/lm --questions {root}/test.csv --out {sampled} --sample 2") == 0
    assert len(list(csv.DictReader(open(sampled / "predictions_blind_letter.csv")))) == 2
