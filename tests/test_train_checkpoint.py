import json

import pytest
import torch
from torch import nn

from tcssa.train.checkpoint import (
    atomic_write,
    load_training_state,
    load_weights,
    resolve_checkpoint,
    save_model,
    save_training_state,
)
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


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, broken)
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
