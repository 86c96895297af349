"""Rebuilding a SlideLM from a run folder and saving the trained parts of one.

The folder's files (slidelm.json, projector.safetensors, compressor.safetensors, lora/) and the
compressor taken from a MIL checkpoint are ``tcssa.io.slidelm``; this module assembles the model
from what it reads.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tcssa.io.slidelm import (
    LORA_DIR,
    PROJECTOR_FILE,
    SLIDELM_FILE,
    load_compressor,
    read_run_info,
    read_run_tensors,
    write_run_files,
)
from tcssa.method.compressor import TCSSA
from tcssa.vlm.model import SlideLM, SlideLMConfig


def save_run(model: SlideLM, out_dir: str | Path, info: dict) -> Path:
    """Save the trained parts of ``model`` and ``slidelm.json`` (``info``: lm, tokenizer, stage, ...)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with_lora = _is_peft(model.lm)
    if with_lora:
        model.lm.save_pretrained(str(out_dir / LORA_DIR))
    trained_compressor = model.compressor if info.get("compressor_source") is None else None
    write_run_files(out_dir, info, model.config.to_dict(), model.projector, trained_compressor, with_lora)
    return out_dir


def load_base_lm(lm_path: str | Path, dtype: torch.dtype | None = None):
    """The causal LM and tokenizer of a local folder (no download is ever attempted)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # the optional vlm extra

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
            compressor.load_state_dict(read_run_tensors(run_dir / info["compressor_file"]), strict=True)
        elif info.get("compressor_source"):
            compressor = load_compressor(info["compressor_source"])
        else:
            raise ValueError(f"{run_dir}: a slots SlideLM run names no compressor")
    if info.get("lora_dir"):
        from peft import PeftModel  # the optional vlm extra

        lm = PeftModel.from_pretrained(lm, str(run_dir / info["lora_dir"]), is_trainable=trainable_lora)
    model = SlideLM(lm, config, compressor)
    model.projector.load_state_dict(read_run_tensors(run_dir / PROJECTOR_FILE), strict=True)
    return model.eval(), tokenizer, info


def _is_peft(module) -> bool:
    try:
        from peft import PeftModel  # the optional vlm extra
    except ImportError:
        return False
    return isinstance(module, PeftModel)
