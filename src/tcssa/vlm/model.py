"""SlideLM: slide tokens -> MLP projector -> any Hugging Face causal language model.

The prompt's ``<image>`` span (see ``tcssa.vlm.prompts``) is filled with the projected slide tokens
through ``inputs_embeds``. Three ways to make the slide tokens, all through the same projector:

- ``slots``: the K TC-SSA slot tokens (every patch feeds its top-2 slots),
- ``random-k``: K patch features sampled at random (all of them when a slide has fewer than K),
- ``mean``: one mean-pooled token,
- ``blind``: no slide token at all (the slide span is empty), the slide-blind baseline.

Padding is handled by masks everywhere: padded patches take no part in the slide tokens, padded text
positions take no part in attention or the loss, and position ids count real tokens only, so a
padded batch gives each sample the result it gets alone, with left padding (generation, scoring) or
right padding (training).
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tcssa.method.compressor import TCSSA, TCSSAConfig
from tcssa.method.routing_loss import AUX_LOSS_WEIGHT
from tcssa.vlm.config import SLIDE_TOKEN_VARIANTS
from tcssa.vlm.prompts import IGNORE_INDEX, EncodedSample


@dataclass(frozen=True)
class SlideLMConfig:
    """The slide side of a SlideLM (the language model is configured by its own folder)."""

    feature_dim: int
    lm_hidden: int
    slide_tokens: str = "slots"
    num_tokens: int = 32  # K: slots, or patches sampled by random-k
    projector_hidden: int = 2048
    aux_loss_weight: float = AUX_LOSS_WEIGHT
    compressor: dict = field(default_factory=dict)  # TCSSAConfig fields other than dim / num_slots

    def __post_init__(self) -> None:
        if self.slide_tokens not in SLIDE_TOKEN_VARIANTS:
            raise ValueError(f"slide_tokens must be one of {SLIDE_TOKEN_VARIANTS}, got {self.slide_tokens!r}")
        for name in ("feature_dim", "lm_hidden", "num_tokens", "projector_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"SlideLM {name} must be >= 1, got {getattr(self, name)}")

    def compressor_config(self) -> TCSSAConfig:
        return TCSSAConfig(dim=self.feature_dim, num_slots=self.num_tokens, **self.compressor)

    def num_slide_tokens(self, num_patches: int) -> int:
        """How many tokens a slide of ``num_patches`` real patches becomes."""
        if self.slide_tokens == "mean":
            return 1
        if self.slide_tokens == "blind":
            return 0
        if self.slide_tokens == "random-k":
            return min(self.num_tokens, num_patches)
        return self.num_tokens

    def to_dict(self) -> dict:
        return asdict(self)


class Projector(nn.Sequential):
    """Slide token (D) -> LM embedding: Linear(D, 2048) -> GELU -> Linear(2048, hidden)."""

    def __init__(self, feature_dim: int, hidden: int, lm_hidden: int) -> None:
        super().__init__(nn.Linear(feature_dim, hidden), nn.GELU(), nn.Linear(hidden, lm_hidden))


@dataclass
class SlideLMBatch:
    """A padded batch. ``sample_seeds`` fix random-k's patch draw per slide in eval mode."""

    input_ids: Tensor  # B x L long
    attention_mask: Tensor  # B x L long, 1 = real token
    image_mask: Tensor  # B x L bool, True = a slide-token position
    features: Tensor  # B x N x D
    feature_mask: Tensor  # B x N bool
    sample_seeds: Tensor  # B long
    labels: Tensor | None = None  # B x L long, IGNORE_INDEX where not supervised
    slide_rows: Tensor | None = None  # B long: row -> slide in ``features`` (when slides are shared)
    slide_ids: list[str] = field(default_factory=list)

    def to(self, device, non_blocking: bool = False) -> SlideLMBatch:
        """Move every tensor (Accelerate calls this to place a batch)."""
        moved = {
            name: getattr(self, name).to(device, non_blocking=non_blocking)
            for name in (
                "input_ids",
                "attention_mask",
                "image_mask",
                "features",
                "feature_mask",
                "sample_seeds",
            )
        }
        optional = {
            name: None
            if getattr(self, name) is None
            else getattr(self, name).to(device, non_blocking=non_blocking)
            for name in ("labels", "slide_rows")
        }
        return SlideLMBatch(**moved, **optional, slide_ids=self.slide_ids)

    def model_inputs(self) -> dict[str, Tensor]:
        """The tensors ``SlideLM.forward`` takes (all but the labels, which ``compute_loss`` adds)."""
        inputs = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "image_mask": self.image_mask,
            "features": self.features,
            "feature_mask": self.feature_mask,
            "sample_seeds": self.sample_seeds,
        }
        if self.slide_rows is not None:
            inputs["slide_rows"] = self.slide_rows
        return inputs


def slide_seed(slide_id: str) -> int:
    """A stable per-slide seed (the same in every process and every run)."""
    return zlib.crc32(slide_id.encode("utf-8"))


def collate(
    samples: list[EncodedSample],
    features: list[Tensor],
    slide_ids: list[str],
    pad_id: int,
    padding_side: str = "right",
    slide_rows: list[int] | None = None,
) -> SlideLMBatch:
    """Pad token sequences (right for training, left for generation and scoring) and patch features.

    ``slide_rows`` lets several sequences share one slide (sequence i uses ``features[slide_rows[i]]``),
    so that scoring the options of a question compresses its slide once.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be left or right, got {padding_side!r}")
    if not samples or len(features) != len(slide_ids):
        raise ValueError("collate needs samples, and one slide id per feature tensor")
    if slide_rows is None and len(samples) != len(features):
        raise ValueError("collate needs one feature tensor per sample (or slide_rows)")
    batch, width = len(samples), max(len(s.input_ids) for s in samples)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention = torch.zeros(batch, width, dtype=torch.long)
    image_mask = torch.zeros(batch, width, dtype=torch.bool)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        span = slice(width - n, width) if padding_side == "left" else slice(0, n)
        input_ids[row, span] = torch.tensor(sample.input_ids)
        attention[row, span] = 1
        image_mask[row, span] = torch.tensor(sample.image_mask)
        labels[row, span] = torch.tensor(sample.labels)
    dim = features[0].shape[-1]
    num_patches = max(f.shape[0] for f in features)
    padded = torch.zeros(len(features), num_patches, dim, dtype=features[0].dtype)
    feature_mask = torch.zeros(len(features), num_patches, dtype=torch.bool)
    for row, slide in enumerate(features):
        if slide.dim() != 2 or slide.shape[-1] != dim:
            raise ValueError(
                f"slide {slide_ids[row]!r}: features of shape {tuple(slide.shape)}, expected N x {dim}"
            )
        padded[row, : slide.shape[0]] = slide
        feature_mask[row, : slide.shape[0]] = True
    return SlideLMBatch(
        input_ids=input_ids,
        attention_mask=attention,
        image_mask=image_mask,
        features=padded,
        feature_mask=feature_mask,
        sample_seeds=torch.tensor([slide_seed(s) for s in slide_ids], dtype=torch.long),
        labels=labels if any(label != IGNORE_INDEX for s in samples for label in s.labels) else None,
        slide_rows=None if slide_rows is None else torch.tensor(slide_rows, dtype=torch.long),
        slide_ids=list(slide_ids),
    )


def position_ids_from(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only, so left and right padding give the same positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class SlideLMOutput:
    logits: Tensor
    aux_loss: Tensor  # compressor routing loss L_aux (unweighted), 0 unless the compressor trains


class SlideLM(nn.Module):
    """Compressor (or another slide-token rule) + projector + causal LM."""

    def __init__(self, lm: nn.Module, config: SlideLMConfig, compressor: TCSSA | None = None) -> None:
        super().__init__()
        self.config = config
        self.lm = lm
        if config.slide_tokens == "slots":
            compressor = compressor or TCSSA.from_config(config.compressor_config())
            if (compressor.dim, compressor.num_slots) != (config.feature_dim, config.num_tokens):
                raise ValueError(
                    f"compressor has D={compressor.dim}, K={compressor.num_slots}; the SlideLM config asks "
                    f"for D={config.feature_dim}, K={config.num_tokens}"
                )
            self.compressor = compressor
        elif compressor is not None:
            raise ValueError(f"slide_tokens={config.slide_tokens!r} uses no compressor, but one was given")
        else:
            self.compressor = None
        self.projector = Projector(config.feature_dim, config.projector_hidden, config.lm_hidden)

    # ------------------------------------------------------------------ slide tokens
    @property
    def compressor_trains(self) -> bool:
        return self.compressor is not None and any(p.requires_grad for p in self.compressor.parameters())

    def train(self, mode: bool = True) -> SlideLM:
        super().train(mode)
        if self.compressor is not None and not self.compressor_trains:
            self.compressor.eval()  # a frozen compressor routes without exploration noise
        return self

    def slide_tokens(
        self, features: Tensor, feature_mask: Tensor, sample_seeds: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """B x N x D patch features -> (B x T x D tokens, B x T token mask, routing aux loss)."""
        if features.shape[-1] != self.config.feature_dim:
            raise ValueError(
                f"SlideLM expects {self.config.feature_dim}-d patch features, got {features.shape[-1]}-d"
            )
        dtype = self.projector[0].weight.dtype
        features = features.to(dtype)
        batch = features.shape[0]
        aux = features.new_zeros(())
        if self.config.slide_tokens == "slots":
            out = self.compressor(features, feature_mask)
            token_mask = torch.ones(out.tokens.shape[:2], dtype=torch.bool, device=features.device)
            return out.tokens, token_mask, out.aux_loss
        if self.config.slide_tokens == "blind":
            empty = features.new_zeros(batch, 0, features.shape[-1])
            return empty, torch.zeros(batch, 0, dtype=torch.bool, device=features.device), aux
        real = feature_mask.to(dtype).unsqueeze(-1)
        if self.config.slide_tokens == "mean":
            if bool((feature_mask.sum(1) == 0).any()):
                raise ValueError("a slide in the batch has no real patch (feature mask all False)")
            pooled = (features * real).sum(1) / real.sum(1)
            return pooled.unsqueeze(1), torch.ones(batch, 1, dtype=torch.bool, device=features.device), aux
        # random-k: K real patches per slide; in eval the draw is fixed by the slide's seed.
        k = self.config.num_tokens
        tokens = features.new_zeros(batch, k, features.shape[-1])
        token_mask = torch.zeros(batch, k, dtype=torch.bool, device=features.device)
        for row in range(batch):
            real_index = feature_mask[row].nonzero().flatten()
            if self.training or sample_seeds is None:
                order = torch.randperm(len(real_index), device="cpu")
            else:
                generator = torch.Generator().manual_seed(int(sample_seeds[row]))
                order = torch.randperm(len(real_index), generator=generator)
            chosen = real_index[order[:k].to(real_index.device).sort().values]
            tokens[row, : len(chosen)] = features[row, chosen]
            token_mask[row, : len(chosen)] = True
        return tokens, token_mask, aux

    def inputs_embeds(
        self,
        input_ids: Tensor,
        image_mask: Tensor,
        features: Tensor,
        feature_mask: Tensor,
        sample_seeds: Tensor | None = None,
        slide_rows: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Token embeddings with the projected slide tokens written into the slide span."""
        tokens, token_mask, aux = self.slide_tokens(features, feature_mask, sample_seeds)
        projected = self.projector(tokens)
        if slide_rows is not None:
            projected, token_mask = projected[slide_rows], token_mask[slide_rows]
        embedding = self.lm.get_input_embeddings()
        embeds = embedding(input_ids.masked_fill(image_mask, 0))
        per_row_span = image_mask.sum(1)
        per_row_tokens = token_mask.sum(1)
        if not torch.equal(per_row_span.cpu(), per_row_tokens.cpu()):
            raise ValueError(
                f"slide-token spans in the prompts ({per_row_span.tolist()}) do not match the slide tokens "
                f"({per_row_tokens.tolist()}); was the batch built for another slide_tokens variant?"
            )
        # Row-major order on both sides: the j-th span position of a row gets that row's j-th token.
        embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), projected[token_mask].to(embeds.dtype))
        return embeds, aux

    # ------------------------------------------------------------------ language model
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        image_mask: Tensor,
        features: Tensor,
        feature_mask: Tensor,
        sample_seeds: Tensor | None = None,
        slide_rows: Tensor | None = None,
        logits_to_keep: int | Tensor = 0,
    ) -> SlideLMOutput:
        """The LM's logits (of the last ``logits_to_keep`` positions, 0: all; or of the positions a 1-d
        index tensor names) and the routing loss."""
        embeds, aux = self.inputs_embeds(
            input_ids, image_mask, features, feature_mask, sample_seeds, slide_rows
        )
        out = self.lm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids_from(attention_mask),
            use_cache=False,
            logits_to_keep=logits_to_keep,
        )
        return SlideLMOutput(logits=out.logits, aux_loss=aux)

    def compute_loss(self, batch: SlideLMBatch) -> tuple[SlideLMOutput, dict[str, Tensor]]:
        """``forward``'s output on a labelled batch and the named training losses: ``lm``, the mean
        next-token cross-entropy over the supervised positions, and ``aux``, the routing loss times
        ``aux_loss_weight``. The training objective is their sum."""
        if batch.labels is None:
            raise ValueError("compute_loss needs a batch with labels (a training batch)")
        # Logits only where a supervised token is predicted: the vocabulary projection of every other
        # position (49k x 576 multiply-adds per position for SmolLM2) would be computed and thrown away.
        positions = supervised_positions(batch.labels)
        out = self(**batch.model_inputs(), logits_to_keep=positions)
        lm_loss = causal_lm_loss(out.logits, batch.labels, positions)
        return out, {"lm": lm_loss, "aux": self.config.aux_loss_weight * out.aux_loss}

    @torch.no_grad()
    def continuation_logprobs(self, batch: SlideLMBatch, lengths: list[int]) -> Tensor:
        """Sum of log-probabilities of the last ``lengths[i]`` tokens of each (left-padded) sequence."""
        if not bool(batch.attention_mask[:, -1].all()):
            raise ValueError("scoring needs left-padded sequences (the continuation at the end of each row)")
        keep = max(lengths) + 1
        out = self.forward(**batch.model_inputs(), logits_to_keep=keep)
        logprobs = out.logits.float().log_softmax(-1)  # B x keep x V: position t predicts token t+1
        targets = batch.input_ids[:, -keep + 1 :]
        picked = logprobs[:, :-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # B x (keep - 1)
        scored = torch.arange(keep - 1, device=picked.device).unsqueeze(0) >= (
            keep - 1 - torch.tensor(lengths, device=picked.device).unsqueeze(1)
        )
        return (picked * scored).sum(-1)

    @torch.no_grad()
    def generate(self, batch: SlideLMBatch, max_new_tokens: int = 16, **generate_kwargs) -> Tensor:
        """Greedy continuation of left-padded prompts; returns the new token ids (B x <= max_new_tokens)."""
        if not bool(batch.attention_mask[:, -1].all()):
            raise ValueError("generation needs left-padded prompts")
        embeds, _ = self.inputs_embeds(
            batch.input_ids,
            batch.image_mask,
            batch.features,
            batch.feature_mask,
            batch.sample_seeds,
            batch.slide_rows,
        )
        options = {"do_sample": False, "max_new_tokens": max_new_tokens, **generate_kwargs}
        return self.lm.generate(inputs_embeds=embeds, attention_mask=batch.attention_mask, **options)


def supervised_positions(labels: Tensor) -> Tensor:
    """The sequence positions whose next token is supervised in some row of the batch (1-d, sorted)."""
    targets = labels[:, 1:]
    if not bool((targets != IGNORE_INDEX).any()):
        raise ValueError("a training batch has no supervised token (every label is ignored)")
    return (targets != IGNORE_INDEX).any(0).nonzero().flatten()


def causal_lm_loss(logits: Tensor, labels: Tensor, positions: Tensor | None = None) -> Tensor:
    """Mean next-token cross-entropy over supervised positions (labels != IGNORE_INDEX).

    ``logits``: B x L x V for every position, or B x P x V for the ``positions`` given (those of
    ``supervised_positions``); both give the same loss.
    """
    if positions is None:
        positions = supervised_positions(labels)
        logits = logits[:, positions]
    if logits.shape[1] != len(positions):
        raise ValueError(f"{logits.shape[1]} logit positions for {len(positions)} supervised positions")
    targets = labels[:, positions + 1]
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )
