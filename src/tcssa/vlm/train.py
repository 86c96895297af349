"""Two-stage SlideLM training (``tcssa vqa train --stage 1|2``).

Stage 1, caption pretraining: the projector trains; the compressor is loaded from a MIL checkpoint
(frozen) or trained jointly with its routing loss; the language model is frozen.
Stage 2, instruction tuning: LoRA (peft; r 16, alpha 32, dropout 0.05 on every attention and MLP
projection) and the projector train; the compressor stays as stage 1 left it unless asked to train.

One code path for one CPU, one GPU and several GPUs or nodes: Accelerate places the model and the
batches, wraps the model in DDP when launched with ``torchrun`` or ``accelerate launch``, shards the
data and autocasts to bf16 on GPUs. The frozen base LM is held in bf16 on GPUs, fp32 on CPU.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from tcssa.io.runs import append_metrics_log
from tcssa.io.slidelm import load_compressor, write_train_config
from tcssa.vlm.checkpoint import load_base_lm, load_run, save_run
from tcssa.vlm.config import SlideLMTrainConfig
from tcssa.vlm.data import TrainCollator
from tcssa.vlm.language_models import resolve_lm
from tcssa.vlm.model import SlideLM, SlideLMConfig

log = logging.getLogger(__name__)


def lm_dtype(precision: str) -> torch.dtype:
    use_bf16 = precision == "bf16" or (precision == "auto" and torch.cuda.is_available())
    return torch.bfloat16 if use_bf16 else torch.float32


def build_stage1_model(
    lm_path: str | Path,
    slide_tokens: str = "slots",
    num_tokens: int = 32,
    feature_dim: int | None = None,
    projector_hidden: int = 2048,
    mil_checkpoint: str | Path | None = None,
    precision: str = "auto",
    seed: int = 0,
) -> tuple[SlideLM, object, dict]:
    """A fresh SlideLM around the LM folder; returns (model, tokenizer, run info)."""
    lm, tokenizer = load_base_lm(lm_path, lm_dtype(precision))
    compressor = None
    info: dict = {"lm": str(Path(lm_path).resolve()), "compressor_source": None}
    if mil_checkpoint is not None:
        if slide_tokens != "slots":
            raise ValueError(
                f"a MIL checkpoint gives a compressor, which slide_tokens={slide_tokens!r} lacks"
            )
        compressor = load_compressor(mil_checkpoint)
        num_tokens = compressor.num_slots
        if feature_dim is not None and feature_dim != compressor.dim:
            raise ValueError(f"features are {feature_dim}-d but the MIL compressor takes {compressor.dim}-d")
        feature_dim = compressor.dim
        info["compressor_source"] = str(Path(mil_checkpoint).resolve())
    if feature_dim is None:
        raise ValueError("feature_dim is needed when no MIL checkpoint gives it")
    config = SlideLMConfig(
        feature_dim=feature_dim,
        lm_hidden=lm.config.hidden_size,
        slide_tokens=slide_tokens,
        num_tokens=num_tokens,
        projector_hidden=projector_hidden,
        compressor={} if compressor is None else _compressor_options(compressor),
    )
    torch.manual_seed(seed)
    return SlideLM(lm, config, compressor), tokenizer, info


def _compressor_options(compressor) -> dict:
    cfg = asdict(compressor.config)
    return {k: cfg[k] for k in ("top_k", "expert_hidden", "expert_dropout", "noise_std")}


def add_lora(model: SlideLM, config: SlideLMTrainConfig) -> SlideLM:
    from peft import LoraConfig, get_peft_model  # the optional vlm extra

    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_targets,
        task_type="CAUSAL_LM",
    )
    model.lm = get_peft_model(model.lm, lora)
    return model


def set_trainable(model: SlideLM, config: SlideLMTrainConfig, compressor_from_mil: bool) -> dict[str, int]:
    """Freeze / unfreeze per stage; returns trainable parameter counts per part."""
    train_compressor = config.train_compressor
    if train_compressor is None:
        train_compressor = config.stage == 1 and not compressor_from_mil
    for name, param in model.lm.named_parameters():
        param.requires_grad_(config.stage == 2 and "lora_" in name)
    for param in model.projector.parameters():
        param.requires_grad_(True)
    if model.compressor is not None:
        for param in model.compressor.parameters():
            param.requires_grad_(bool(train_compressor))
    parts = {"projector": model.projector, "lm": model.lm}
    if model.compressor is not None:
        parts["compressor"] = model.compressor
    return {
        name: sum(p.numel() for p in part.parameters() if p.requires_grad) for name, part in parts.items()
    }


def train_stage(
    model: SlideLM,
    tokenizer,
    dataset,
    config: SlideLMTrainConfig,
    out_dir: str | Path,
    info: dict,
) -> dict:
    """Train ``model`` on ``dataset`` (a ConversationDataset) for one stage and save the run folder."""
    out_dir = Path(out_dir)
    mixed = "bf16" if lm_dtype(config.precision) == torch.bfloat16 else "no"
    # cpu=True on a machine without CUDA lets torchrun / accelerate launch start CPU processes (gloo);
    # with CUDA, Accelerate picks one GPU per process.
    accelerator = Accelerator(
        mixed_precision=mixed,
        gradient_accumulation_steps=config.grad_accum,
        cpu=not torch.cuda.is_available(),
    )
    set_seed(config.seed)
    compressor_from_mil = info.get("compressor_source") is not None
    counts = set_trainable(model, config, compressor_from_mil)
    if model.compressor is not None and model.compressor_trains:
        info["compressor_source"] = None  # it changes now: the run must save it
        model.compressor.float()
    model.projector.float()
    if config.gradient_checkpointing:
        _set_checkpointing(model.lm, True)
        model.lm.config.use_cache = False
    collator = TrainCollator(model.config, tokenizer.pad_token_id, config.max_length)
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=True,
        collate_fn=collator,
        num_workers=config.num_workers,
        generator=generator,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: every parameter is frozen")
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    losses_of, optimizer, loader = accelerator.prepare(_TrainingLosses(model), optimizer, loader)
    # The schedule counts optimizer steps of this process (the prepared loader is this rank's shard);
    # it is stepped by hand on each real optimizer step, not handed to Accelerate.
    total_steps = max(1, math.ceil(len(loader) / config.grad_accum * config.epochs))
    warmup = max(1, int(config.warmup_ratio * total_steps))

    def schedule(step: int) -> float:  # linear warm-up, then cosine decay to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, schedule)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_train_config(out_dir, {**asdict(config), "trainable_parameters": counts, **info})
    step, start, history = 0, time.perf_counter(), []
    losses_of.train()
    bar = tqdm(
        total=total_steps,
        desc=f"stage {config.stage}",
        disable=not (config.progress and accelerator.is_main_process),
    )
    running = {"loss": 0.0, "lm_loss": 0.0, "aux_loss": 0.0, "n": 0}
    epoch = 0
    while step < total_steps:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for batch in loader:
            with accelerator.accumulate(losses_of):
                losses, aux_loss = losses_of(batch)
                loss = sum(losses.values())
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            running["loss"] += float(loss.detach())
            running["lm_loss"] += float(losses["lm"].detach())
            running["aux_loss"] += float(aux_loss.detach())  # unweighted, as the compressor reports it
            running["n"] += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            if step % config.log_every == 0 or step == total_steps:
                n = running.pop("n")
                record = {"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0]}
                record.update({k: v / n for k, v in running.items()})
                record["seconds"] = round(time.perf_counter() - start, 2)
                history.append(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}")
                if accelerator.is_main_process:
                    append_metrics_log(out_dir, record)
                running = {"loss": 0.0, "lm_loss": 0.0, "aux_loss": 0.0, "n": 0}
            if step >= total_steps:
                break
        epoch += 1
    bar.close()
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(losses_of).model.eval()
    if config.gradient_checkpointing:
        _set_checkpointing(unwrapped.lm, False)
    if accelerator.is_main_process:
        save_run(unwrapped, out_dir, {**info, "stage": config.stage})
    accelerator.wait_for_everyone()
    return {"steps": step, "seconds": time.perf_counter() - start, "history": history, "trainable": counts}


class _TrainingLosses(torch.nn.Module):
    """``SlideLM.compute_loss`` as the forward of a module, for Accelerate to wrap: DDP synchronises the
    gradients of what runs through the forward of the module it wraps only. It returns the named
    losses and the unweighted routing loss (for the log), not the logits: Accelerate's bf16 autocast
    would copy every bf16 tensor the forward returns (B x L x vocabulary logits) to float32."""

    def __init__(self, model: SlideLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        out, losses = self.model.compute_loss(batch)
        return losses, out.aux_loss


def _set_checkpointing(lm, enable: bool) -> None:
    """Activation (gradient) checkpointing, non-reentrant so that frozen layers and LoRA work with it.
    transformers 5 renamed the methods; older versions have only the gradient_* names."""
    if hasattr(lm, "activation_checkpointing_enable"):
        if enable:
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.activation_checkpointing_disable()
    elif enable:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_disable()


def prepare_stage(
    stage: int,
    lm: str | Path | None = None,
    init: str | Path | None = None,
    slide_tokens: str = "slots",
    num_tokens: int = 32,
    feature_dim: int | None = None,
    projector_hidden: int = 2048,
    mil_checkpoint: str | Path | None = None,
    train_config: SlideLMTrainConfig | None = None,
):
    """The model a stage starts from: stage 1 from an LM folder (+ MIL compressor), stage 2 from a stage-1
    run folder with LoRA added. Returns (model, tokenizer, info)."""
    config = train_config or SlideLMTrainConfig(stage=stage)
    if stage == 1:
        if init is not None:
            model, tokenizer, info = load_run(init, lm_dtype(config.precision))
        else:
            model, tokenizer, info = build_stage1_model(
                resolve_lm(lm),
                slide_tokens,
                num_tokens,
                feature_dim,
                projector_hidden,
                mil_checkpoint,
                config.precision,
            )
        return model, tokenizer, info
    if init is None:
        raise ValueError("stage 2 starts from a stage-1 run folder: pass --init RUN")
    model, tokenizer, info = load_run(init, lm_dtype(config.precision), trainable_lora=True)
    if info.get("lora_dir") is None:
        model = add_lora(model, config)
    info = {k: v for k, v in info.items() if k not in ("slidelm", "lora_dir", "compressor_file", "stage")}
    info["init"] = str(Path(init).resolve())
    return model, tokenizer, info
