import json
import re

import pytest
import torch
from torch import nn

from tcssa.io.checkpoints import (
    load_training_state,
    load_weights,
    resolve_checkpoint,
    save_model,
    save_training_state,
)
from tcssa.io.files import atomic_output
from tcssa.train.config import TrainConfig


def test_model_round_trip_with_config_beside_it(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    path = save_model(tmp_path / "fold_0", model, {"model": "tiny", "in_dim": 4})
    weights, config = resolve_checkpoint(tmp_path / "fold_0")
    assert weights == path and json.loads(config.read_text())["model"] == "tiny"
    assert resolve_checkpoint(path) == (weights, config)
    other = load_weights(nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)), weights)
    assert torch.equal(other[0].weight, model[0].weight)
    with pytest.raises(ValueError, match="does not fit this model"):
        load_weights(nn.Linear(4, 3), weights)
    with pytest.raises(ValueError, match=r"shapes differ \(0.weight \(3, 4\) vs \(3, 5\)"):
        load_weights(nn.Sequential(nn.Linear(5, 3), nn.LayerNorm(3)), weights)
    with pytest.raises(FileNotFoundError, match="checkpoint weights not found"):
        resolve_checkpoint(tmp_path / "nowhere")


def test_training_state_round_trip_keeps_optimizer_and_scheduler(tmp_path):
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    scheduler.step(0.5)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "progress": {"epoch": 3, "best_val_loss": float("inf"), "history": [{"auc": 0.5}]},
    }
    save_training_state(tmp_path / "state.safetensors", state)
    loaded = load_training_state(tmp_path / "state.safetensors")
    assert loaded["progress"] == state["progress"]
    fresh = torch.optim.AdamW(nn.Linear(3, 2).parameters(), lr=1e-3)
    fresh.load_state_dict(loaded["optimizer"])
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(fresh.state_dict()["state"][0][key], optimizer.state_dict()["state"][0][key])
    assert fresh.param_groups[0]["betas"] == (0.9, 0.999)
    assert loaded["scheduler"] == scheduler.state_dict()


def test_atomic_output_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")

    with pytest.raises(OSError), atomic_output(target) as partial:
        partial.write_text("half")
        raise OSError("disk full")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_config_yaml_and_overrides(tmp_path):
    config = TrainConfig()
    assert (config.lr, config.weight_decay, config.epochs, config.early_stopping_patience) == (
        1e-4,
        1e-5,
        20,
        5,
    )
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 7\nbatch-size: 4\nmodel_options: {aux_weight: 0.2}\n")
    loaded = TrainConfig.from_yaml(path)
    assert (loaded.epochs, loaded.batch_size, loaded.model_options) == (7, 4, {"aux_weight": 0.2})
    assert loaded.override(epochs=3, seed=None).epochs == 3
    assert json.loads(loaded.to_json())["batch_size"] == 4
    path.write_text("epoch: 7\n")
    with pytest.raises(ValueError, match=r"unknown training option\(s\) \['epoch'\]"):
        TrainConfig.from_yaml(path)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        config.override(batch_size=0)


# ------------------------------------------------------------------ damaged checkpoints
def _tiny_checkpoint(folder):
    from tcssa.mil import build_model

    model = build_model("mean", 4, 2, num_slots=2)
    save_model(folder, model, {"model": model.config, "class_names": ["a", "b"], "fold": 0})
    return folder


def _edit_config(folder, edit):
    path = folder / "model_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    return path


def test_a_checkpoint_loads_when_sound(tmp_path):
    from tcssa.train.runs import load_checkpoint

    model, config = load_checkpoint(_tiny_checkpoint(tmp_path / "ok"))
    assert config["class_names"] == ["a", "b"] and model.in_dim == 4


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda c: c["model"].update(in_dim="4"), "model.in_dim must be a whole number >= 1, got '4'"),
        (lambda c: c["model"].pop("num_classes"), "model.num_classes must be a whole number >= 1, got None"),
        (lambda c: c["model"].update(name=7), "model.name must be a model name (text), got 7"),
        (lambda c: c.update(class_names="ab"), "class_names must be a list of class names, got 'ab'"),
        (lambda c: c.update(class_names=["a"]), "1 class_names ['a'] for a model of num_classes=2"),
        (
            lambda c: c["model"].update(bogus=1),
            "cannot rebuild the model from it (model 'mean' has no option",
        ),
        (lambda c: c.pop("model"), "not a tcssa model config (needs 'model' and 'class_names')"),
    ],
)
def test_a_damaged_model_config_is_an_error_naming_the_file_and_the_entry(tmp_path, edit, message):
    from tcssa.train.runs import load_checkpoint

    path = _edit_config(_tiny_checkpoint(tmp_path / "ck"), edit)
    with pytest.raises(ValueError) as info:
        load_checkpoint(tmp_path / "ck")
    assert str(info.value).startswith(f"checkpoint config {path}: {message}")


@pytest.mark.parametrize("text,what", [("null", "got NoneType None"), ("[1, 2]", "got list [1, 2]")])
def test_a_model_config_that_is_not_an_object_names_the_file(tmp_path, text, what):
    from tcssa.train.runs import load_checkpoint

    folder = _tiny_checkpoint(tmp_path / "ck")
    (folder / "model_config.json").write_text(text)
    with pytest.raises(ValueError, match=rf"model_config.json: expected a JSON object .*{re.escape(what)}"):
        load_checkpoint(folder)
    (folder / "model_config.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=r"model_config.json: not a JSON text file"):
        load_checkpoint(folder)


def test_weights_with_nan_are_blamed_on_the_checkpoint_not_the_labels(tmp_path):
    from safetensors.torch import load_file, save_file

    from tcssa.train.runs import load_checkpoint

    folder = _tiny_checkpoint(tmp_path / "ck")
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    first = sorted(state)[0]
    state[first] = state[first] * float("nan")
    save_file(state, str(weights))
    expected = (
        f"{weights}: the checkpoint's weights contain NaN or Inf (1 of {len(state)} tensors, e.g. {first})"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_checkpoint(folder)
    weights.write_bytes(weights.read_bytes()[:40])  # truncated
    with pytest.raises(ValueError, match=rf"{re.escape(str(weights))}: not a readable safetensors file"):
        load_checkpoint(folder)


def test_a_full_disk_while_writing_names_the_file_not_the_temporary_one(tmp_path, monkeypatch):
    import errno

    from safetensors import SafetensorError

    import tcssa.io.checkpoints as checkpoint

    with pytest.raises(OSError) as info, atomic_output(tmp_path / "a.json"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "a.json")

    def full_safetensors(tensors, filename, metadata=None):  # how safetensors reports it
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full_safetensors)
    with pytest.raises(OSError) as info:
        save_model(tmp_path / "fold_0", nn.Linear(2, 2), {})
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(tmp_path / "fold_0" / "model.safetensors")
    assert list((tmp_path / "fold_0").iterdir()) == []  # no temporary file left behind
