"""What a SlideLM run folder holds, and how a SlideLM is rebuilt from one.

Only what was trained is saved; the base language model stays in its own folder and is named:

    RUN/slidelm.json            base LM folder, tokenizer folder, SlideLMConfig, stage, where the
                                compressor comes from, LoRA settings
    RUN/projector.safetensors   always
    RUN/compressor.safetensors  when the compressor was trained (or initialised randomly); a compressor
                                taken unchanged from a MIL checkpoint is named by its path instead
    RUN/lora/                   stage 2: the peft adapter (adapter_config.json, adapter_model.safetensors)
    RUN/train_config.json, RUN/metrics.jsonl   written by training
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tcssa.io.checkpoints import upgrade_expert_layout
from tcssa.io.published import from_published
from tcssa.method.compressor import TCSSA
from tcssa.vlm.model import SlideLM, SlideLMConfig

SLIDELM_FILE = "slidelm.json"
PROJECTOR_FILE = "projector.safetensors"
COMPRESSOR_FILE = "compressor.safetensors"
LORA_DIR = "lora"


def load_compressor(path: str | Path, **overrides) -> TCSSA:
    """A TC-SSA compressor from a MIL checkpoint.

    ``tcssa train``'s ``fold_k/`` folder or its ``model.safetensors`` (the ``tcssa`` model's state:
    compressor keys under ``compressor.``; top-k, dropout and noise read from ``model_config.json``
    beside it when present), or a ``.pt``/``.pth`` checkpoint of the published code (``gate.*``,
    ``experts.{k}.net.*``).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"MIL checkpoint not found: {path}")
    if path.suffix in (".pt", ".pth", ".bin"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        return from_published(state, **overrides)
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error type for a damaged header
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
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
    config_file = path.parent / "model_config.json"
    if config_file.is_file():
        saved = _read_compressor_config(config_file)
        if saved.get("name", "tcssa") != "tcssa":
            raise ValueError(f"{path}: a {saved['name']!r} MIL model has no TC-SSA compressor")
        options = _compressor_options(saved, config_file)
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
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_file}: not readable JSON ({err}); is the checkpoint complete?") from err
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


def _compressor_options(saved: dict, config_file: Path) -> dict:
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


def save_run(model: SlideLM, out_dir: str | Path, info: dict) -> Path:
    """Save the trained parts of ``model`` and ``slidelm.json`` (``info``: lm, tokenizer, stage, ...)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(_cpu_state(model.projector), str(out_dir / PROJECTOR_FILE))
    info = dict(info)
    if model.compressor is not None and info.get("compressor_source") is None:
        save_file(_cpu_state(model.compressor), str(out_dir / COMPRESSOR_FILE))
        info["compressor_file"] = COMPRESSOR_FILE
    if _is_peft(model.lm):
        model.lm.save_pretrained(str(out_dir / LORA_DIR))
        info["lora_dir"] = LORA_DIR
    info["slidelm"] = model.config.to_dict()
    (out_dir / SLIDELM_FILE).write_text(json.dumps(info, indent=2))
    return out_dir


def read_run_info(run_dir: str | Path) -> dict:
    """``slidelm.json`` of a run folder, checked: an error names the file and what is wrong."""
    path = Path(run_dir) / SLIDELM_FILE
    if not path.is_file():
        raise FileNotFoundError(f"not a SlideLM run folder (no {SLIDELM_FILE}): {run_dir}")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not readable JSON ({err}); is the run complete?") from err
    if not isinstance(info, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(info).__name__}; is the run complete?")
    for key in ("lm", "slidelm"):
        if key not in info:
            raise ValueError(f"{path}: no {key!r} entry; not a run written by `tcssa vqa train`")
    if not isinstance(info["lm"], str) or not isinstance(info["slidelm"], dict):
        raise ValueError(f"{path}: 'lm' must be a folder path and 'slidelm' an object of settings")
    return info


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; the run folder is incomplete")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error type for a damaged file
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err


def load_base_lm(lm_path: str | Path, dtype: torch.dtype | None = None):
    """The causal LM and tokenizer of a local folder (no download is ever attempted)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm_path = Path(lm_path)
    if not (lm_path / "config.json").is_file():
        raise FileNotFoundError(f"no language model folder (config.json) at {lm_path}")
    lm = AutoModelForCausalLM.from_pretrained(lm_path, dtype=dtype or torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(lm_path, local_files_only=True)
    if tokenizer.pad_token_id is None:  # many instruct tokenizers ship without one
        tokenizer.pad_token = tokenizer.eos_token
    return lm, tokenizer


def load_run(run_dir: str | Path, dtype: torch.dtype | None = None, trainable_lora: bool = False):
    """(SlideLM, tokenizer, info) from a run folder: base LM from its folder, then the saved parts."""
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    lm, tokenizer = load_base_lm(info["lm"], dtype)
    try:
        config = SlideLMConfig(**info["slidelm"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{run_dir / SLIDELM_FILE}: its 'slidelm' settings are not valid ({err})") from err
    compressor = None
    if config.slide_tokens == "slots":
        if info.get("compressor_file"):
            compressor = TCSSA.from_config(config.compressor_config())
            compressor.load_state_dict(_load_tensors(run_dir / info["compressor_file"]), strict=True)
        elif info.get("compressor_source"):
            compressor = load_compressor(info["compressor_source"])
        else:
            raise ValueError(f"{run_dir}: a slots SlideLM run names no compressor")
    if info.get("lora_dir"):
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, str(run_dir / info["lora_dir"]), is_trainable=trainable_lora)
    model = SlideLM(lm, config, compressor)
    model.projector.load_state_dict(_load_tensors(run_dir / PROJECTOR_FILE), strict=True)
    return model.eval(), tokenizer, info


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def _is_peft(module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(module, PeftModel)
