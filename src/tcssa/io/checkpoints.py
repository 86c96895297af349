"""Checkpoints: model weights as safetensors with a JSON config beside them, written atomically
(``tcssa.io.files.atomic_output``).

Two kinds of files:
- a model checkpoint (``model.safetensors`` + ``model_config.json``): what
  ``tcssa eval`` and ``tcssa compress`` load; the config names the model, its
  dimensions, options and class names, so the model can be rebuilt.
- a training state (``resume.safetensors``): everything needed to continue a
  fold after the last complete epoch (model, optimizer, scheduler, epoch,
  best so far, history). Nested state dicts are flattened: tensors go into the
  safetensors body, the rest into a JSON skeleton kept in its metadata, so the
  state is one file and loading it runs no pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from tcssa.io.files import atomic_output, read_json, write_json

MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"
_TENSOR_REF = "__tensor__"


# --------------------------------------------------------------------- models
def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state on the CPU, ready for safetensors."""
    # clone(): safetensors refuses tensors that share storage (tied weights, views).
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_model(folder: str | Path, model: nn.Module, config: dict[str, Any]) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/model_config.json``; returns the weights path."""
    folder = Path(folder)
    tensors = state_tensors(model)
    with atomic_output(folder / MODEL_WEIGHTS) as partial:
        save_file(tensors, str(partial), metadata={"format": "pt"})
    write_json(folder / MODEL_CONFIG, config)
    return folder / MODEL_WEIGHTS


def resolve_checkpoint(checkpoint: str | Path) -> tuple[Path, Path]:
    """(weights, config) of a checkpoint given as its folder or its ``.safetensors`` file."""
    checkpoint = Path(checkpoint)
    weights = checkpoint / MODEL_WEIGHTS if checkpoint.is_dir() else checkpoint
    config = weights.parent / MODEL_CONFIG
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint weights not found: {weights}")
    if not config.is_file():
        raise FileNotFoundError(f"checkpoint config not found beside the weights: {config}")
    return weights, config


#: Whole-number entries of ``model_config.json``'s "model" object, with their smallest valid value.
_MODEL_ENTRIES = {"in_dim": 1, "num_classes": 1, "num_slots": 1}


def read_model_config(path: str | Path) -> dict[str, Any]:
    """``model_config.json`` of a checkpoint, checked: an error names the file and the bad entry.

    It must be an object with ``model`` (``name`` text; ``in_dim``, ``num_classes``, ``num_slots``
    whole numbers; ``seed`` a whole number when present) and ``class_names`` (a list of
    ``num_classes`` texts).
    """
    config = read_json(path)
    where = f"checkpoint config {path}"
    if not isinstance(config, dict):
        raise ValueError(
            f"{where}: expected a JSON object with 'model' and 'class_names', got {type(config).__name__} "
            f"{_short(config)}; is the checkpoint complete?"
        )
    model = config.get("model")
    if not isinstance(model, dict) or "class_names" not in config:
        raise ValueError(f"{where}: not a tcssa model config (needs 'model' and 'class_names')")
    if not isinstance(model.get("name"), str):
        raise ValueError(f"{where}: model.name must be a model name (text), got {_short(model.get('name'))}")
    for key, minimum in _MODEL_ENTRIES.items():
        value = model.get(key)
        if key == "num_slots" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{where}: model.{key} must be a whole number >= {minimum}, got {_short(value)}")
    if "seed" in model and (isinstance(model["seed"], bool) or not isinstance(model["seed"], int)):
        raise ValueError(f"{where}: model.seed must be a whole number, got {_short(model['seed'])}")
    names = config["class_names"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{where}: class_names must be a list of class names, got {_short(names)}")
    if len(names) != model["num_classes"]:
        raise ValueError(
            f"{where}: {len(names)} class_names {names} for a model of num_classes={model['num_classes']}"
        )
    return config


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_EXPERT_LAYOUT_MARKER = "experts.layout_version"


def upgrade_expert_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with TC-SSA experts saved in the earlier (out, in) layout transposed to (in, out).

    Checkpoints saved before ``SlotExperts.LAYOUT_VERSION`` 2 have no ``experts.layout_version``
    beside their stacked ``experts.w1``/``w2``; with D = H the shapes alone cannot tell the two
    layouts apart, so the marker decides. Current checkpoints come back unchanged.
    """
    upgraded = dict(state)
    for key in state:
        if not key.endswith("experts.w1"):
            continue
        prefix = key[: -len("experts.w1")]
        if prefix + _EXPERT_LAYOUT_MARKER in state:
            continue
        for name in ("w1", "w2"):
            if prefix + "experts." + name in upgraded:
                upgraded[prefix + "experts." + name] = upgraded[prefix + "experts." + name].transpose(1, 2)
        upgraded[prefix + _EXPERT_LAYOUT_MARKER] = torch.tensor(2)
    return upgraded


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a damaged or unreadable file is a ValueError naming it."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err


def load_weights(model: nn.Module, weights: str | Path) -> nn.Module:
    """Load a ``model.safetensors`` into ``model`` (strict: every key must match; all values finite)."""
    state = upgrade_expert_layout(read_tensors(weights))
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise ValueError(
            f"{weights}: the checkpoint's weights contain NaN or Inf ({len(broken)} of {len(state)} "
            f"tensors, e.g. {', '.join(broken[:3])}); the file is damaged or was saved from a diverged "
            "model: use another checkpoint"
        )
    own = model.state_dict()
    reshaped = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if reshaped:
        details = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in reshaped[:3])
        raise ValueError(
            f"{weights} does not fit this model: tensor shapes differ ({details}); was it saved for "
            "another architecture, or by a tcssa version with another weight layout?"
        )
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{weights} does not fit this model: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return model


# ------------------------------------------------------------ training state
def flatten_state(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested structure into a JSON-able skeleton and a flat {name: tensor} dict."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = value.detach().to("cpu").contiguous().clone()
            return {_TENSOR_REF: name}
        if isinstance(value, dict):
            # JSON keys are strings; remember int keys (optimizer state is keyed by param index).
            return {
                "__dict__": [[k, walk(v)] for k, v in value.items()],
            }
        if isinstance(value, (list, tuple)):
            return {"__list__": [walk(v) for v in value], "tuple": isinstance(value, tuple)}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot store a {type(value).__name__} in a training state")

    return walk(state), tensors


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            if _TENSOR_REF in value:
                return tensors[value[_TENSOR_REF]]
            if "__dict__" in value:
                return {k: walk(v) for k, v in value["__dict__"]}
            if "__list__" in value:
                items = [walk(v) for v in value["__list__"]]
                return tuple(items) if value["tuple"] else items
        return value

    return walk(skeleton)


def save_training_state(path: str | Path, state: dict[str, Any]) -> None:
    skeleton, tensors = flatten_state(state)
    metadata = {"tcssa_training_state": json.dumps(skeleton)}
    with atomic_output(path) as partial:
        save_file(tensors, str(partial), metadata=metadata)


def load_training_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable training state ({err})") from err
    if "tcssa_training_state" not in metadata:
        raise ValueError(f"{path}: a safetensors file, but not a tcssa training state")
    return unflatten_state(json.loads(metadata["tcssa_training_state"]), tensors)


# ------------------------------------------------------- third-party weights
#: Keys under which published checkpoints nest their state dict.
_NESTED_STATE_KEYS = ("state_dict", "model", "module")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A published model's weights: a ``.safetensors`` file, or a ``.bin``/``.pt``/``.pth`` state dict
    (loaded with ``weights_only=True``, so it cannot run code; one ``state_dict``/``model`` level of
    nesting is unwrapped). A missing or unreadable file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    if path.suffix == ".safetensors":
        return read_tensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and unsupported-type errors all mean the same to the user
        raise ValueError(f"{path}: not a readable torch state dict ({type(err).__name__}: {err})") from err
    for key in _NESTED_STATE_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    return state
