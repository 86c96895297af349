"""A SlideLM run folder on disk, and the TC-SSA compressor a SlideLM takes from a MIL checkpoint.

Only what was trained is saved; the base language model stays in its own folder and is named:

    RUN/slidelm.json            base LM folder, tokenizer folder, SlideLMConfig, stage, where the
                                compressor comes from, LoRA settings
    RUN/projector.safetensors   always
    RUN/compressor.safetensors  when the compressor was trained (or initialised randomly); a compressor
                                taken unchanged from a MIL checkpoint is named by its path instead
    RUN/lora/                   stage 2: the peft adapter (adapter_config.json, adapter_model.safetensors),
                                written by peft
    RUN/train_config.json, RUN/metrics.jsonl   written by training

Building the SlideLM from these files is ``tcssa.vlm.checkpoint``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from tcssa.io.checkpoints import (
    MODEL_CONFIG,
    MODEL_WEIGHTS,
    read_tensors,
    state_tensors,
    upgrade_expert_layout,
)
from tcssa.io.files import atomic_output, read_json, write_text
from tcssa.io.published import from_published
from tcssa.method.compressor import TCSSA

SLIDELM_FILE = "slidelm.json"
PROJECTOR_FILE = "projector.safetensors"
COMPRESSOR_FILE = "compressor.safetensors"
LORA_DIR = "lora"
TRAIN_CONFIG_FILE = "train_config.json"


# ------------------------------------------------------------------------------- run folder
def write_run_files(
    out_dir: Path,
    info: dict,
    slidelm_config: dict,
    projector: nn.Module,
    compressor: nn.Module | None,
    with_lora: bool,
) -> None:
    """``projector.safetensors``, ``compressor.safetensors`` (when ``compressor`` is given) and
    ``slidelm.json``: ``info`` naming the compressor file, the LoRA folder (``with_lora``: the
    adapter saved in ``LORA_DIR``) and the SlideLMConfig ``slidelm_config``."""
    _save_tensors(out_dir / PROJECTOR_FILE, projector)
    info = dict(info)
    if compressor is not None:
        _save_tensors(out_dir / COMPRESSOR_FILE, compressor)
        info["compressor_file"] = COMPRESSOR_FILE
    if with_lora:
        info["lora_dir"] = LORA_DIR
    info["slidelm"] = slidelm_config
    write_text(out_dir / SLIDELM_FILE, json.dumps(info, indent=2))


def _save_tensors(path: Path, module: nn.Module) -> None:
    tensors = state_tensors(module)
    with atomic_output(path) as partial:
        save_file(tensors, str(partial))


def read_run_info(run_dir: str | Path) -> dict:
    """``slidelm.json`` of a run folder, checked: an error names the file and what is wrong."""
    path = Path(run_dir) / SLIDELM_FILE
    if not path.is_file():
        raise FileNotFoundError(f"not a SlideLM run folder (no {SLIDELM_FILE}): {run_dir}")
    info = read_json(path, hint="is the run complete?")
    if not isinstance(info, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(info).__name__}; is the run complete?")
    for key in ("lm", "slidelm"):
        if key not in info:
            raise ValueError(f"{path}: no {key!r} entry; not a run written by `tcssa vqa train`")
    if not isinstance(info["lm"], str) or not isinstance(info["slidelm"], dict):
        raise ValueError(f"{path}: 'lm' must be a folder path and 'slidelm' an object of settings")
    return info


def read_run_tensors(path: Path) -> dict[str, torch.Tensor]:
    """One saved part of a run folder (projector or compressor)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; the run folder is incomplete")
    return read_tensors(path)


# ------------------------------------------------------------------------------- compressor
def load_compressor(path: str | Path, **overrides) -> TCSSA:
    """A TC-SSA compressor from a MIL checkpoint.

    ``tcssa train``'s ``fold_k/`` folder or its ``model.safetensors`` (the ``tcssa`` model's state:
    compressor keys under ``compressor.``; top-k, dropout and noise read from ``model_config.json``
    beside it when present), or a ``.pt``/``.pth`` checkpoint of the published code (``gate.*``,
    ``experts.{k}.net.*``).
    """
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"MIL checkpoint not found: {path}")
    if path.suffix in (".pt", ".pth", ".bin"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        return from_published(state, **overrides)
    state = read_tensors(path)
    prefix = "compressor."
    weights = upgrade_expert_layout({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    if "gate.weight" not in weights or "experts.b1" not in weights:
        raise ValueError(
            f"{path}: no TC-SSA compressor in this checkpoint (expected keys compressor.gate.weight and "
            f"compressor.experts.b1; is it the checkpoint of a 'tcssa' model?)"
        )
    num_slots, dim = weights["gate.weight"].shape
    hidden = weights["experts.b1"].shape[1]  # K x H, whatever layout the stacked weights use
    options = {}
    config_file = path.parent / MODEL_CONFIG
    if config_file.is_file():
        saved = _read_compressor_config(config_file)
        name = saved.get("name", "tcssa")
        if not name.startswith("tcssa"):  # tcssa and its variants (tcssa-kmeans, ...) have one
            raise ValueError(f"{path}: a {name!r} MIL model has no TC-SSA compressor")
        if saved.get("center"):
            raise ValueError(
                f"{path}: a slide-centred {name!r} model (center=true) routes each slide minus its mean "
                "patch; the slide-language model feeds its compressor uncentred features. Train the "
                "MIL model without center for use here."
            )
        if saved.get("spatial"):
            raise ValueError(
                f"{path}: a {name!r} model with spatial=true routes with the patch coordinates and adds "
                "their summary to its tokens; the slide-language model feeds its compressor features "
                "alone. Train the MIL model without spatial for use here."
            )
        options = _saved_compressor_options(saved, config_file)
    compressor = TCSSA(dim, num_slots=num_slots, expert_hidden=hidden, **{**options, **overrides})
    try:
        compressor.load_state_dict(weights, strict=True)
    except RuntimeError as err:  # missing, unexpected or misshapen tensors
        raise ValueError(
            f"{path}: the compressor weights do not fit a TC-SSA of their own shape ({err})"
        ) from err
    broken = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise ValueError(f"{path}: non-finite values in {', '.join(broken)}; the checkpoint is damaged")
    return compressor


def _read_compressor_config(config_file: Path) -> dict:
    """The model part of a ``model_config.json``: tcssa train's ``{"model": {...}, ...}`` or the bare
    model config. Only what the compressor needs is checked (it needs no class names)."""
    config = read_json(config_file, hint="is the checkpoint complete?")
    if not isinstance(config, dict):
        raise ValueError(
            f"{config_file}: expected a JSON object, got {type(config).__name__}; is the checkpoint complete?"
        )
    saved = config.get("model", config)
    if not isinstance(saved, dict):
        raise ValueError(f"{config_file}: 'model' must be an object, got {type(saved).__name__}")
    if "name" in saved and not isinstance(saved["name"], str):
        raise ValueError(f"{config_file}: model.name must be a model name (text), got {saved['name']!r}")
    for key in ("in_dim", "num_slots"):
        value = saved.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{config_file}: model.{key} must be a whole number >= 1, got {value!r}")
    return saved


def _saved_compressor_options(saved: dict, config_file: Path) -> dict:
    """top_k, expert_dropout and noise_std of a MIL model config, each checked by type and range."""
    options = {}
    if "top_k" in saved:
        top_k = saved["top_k"]
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"{config_file}: model.top_k must be a whole number >= 1, got {top_k!r}")
        options["top_k"] = top_k
    for key in ("expert_dropout", "noise_std"):
        if key in saved:
            value = saved[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e3:
                raise ValueError(f"{config_file}: model.{key} must be a number >= 0, got {value!r}")
            options[key] = float(value)
    return options


def write_train_config(run_dir: Path, config: dict[str, Any]) -> None:
    """``RUN/train_config.json``: the stage's training options and trainable parameter counts."""
    write_text(Path(run_dir) / TRAIN_CONFIG_FILE, json.dumps(config, indent=2))
