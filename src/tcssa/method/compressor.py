"""TC-SSA: Token Compression via Semantic Slot Aggregation (docs/METHOD.md), assembled.

All N patch features of a slide (B x N x D, with an optional B x N mask, True
for real patches) become K slot tokens (B x K x D). Each step has its own file:

    steps 1-4  gate, noise, softmax, top-2    tcssa.method.routing
    step 5     slot aggregation               tcssa.method.aggregation
    step 6     slot experts                   tcssa.method.experts
    L_aux      the auxiliary routing loss     tcssa.method.routing_loss

Padded patches take no part in routing, aggregation, slot counts or any loss
mean. Step 5 and the routing loss are computed from per-slide sums, so a slide
fed a chunk at a time (``compress_chunks``; from an h5 file: ``tcssa.io.chunks``)
gives the same tokens in bounded memory; the K experts are stacked weights
applied with one batched matmul, so a batch of slides reads them once. No
B x N x K x D temporary is ever formed. This package reads and writes no file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from tcssa import runtime
from tcssa.method import mixed, routing_loss
from tcssa.method.aggregation import SlotSums, count_assignments, slot_means, sum_slots
from tcssa.method.experts import SlotExperts
from tcssa.method.routing import Routing, route


@dataclass(frozen=True)
class TCSSAConfig:
    """Hyperparameters of the compressor; defaults from docs/METHOD.md."""

    dim: int
    num_slots: int = 32
    top_k: int = 2
    expert_hidden: int = 512
    expert_dropout: float = 0.25
    noise_std: float = 0.1

    def __post_init__(self) -> None:
        for name in ("dim", "num_slots", "top_k", "expert_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"TCSSA {name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.expert_dropout < 1.0:
            raise ValueError(f"TCSSA expert_dropout must be in [0, 1), got {self.expert_dropout}")
        if self.noise_std < 0:
            raise ValueError(f"TCSSA noise_std must be >= 0, got {self.noise_std}")


@dataclass
class CompressorOutput:
    """What one forward pass returns.

    ``topk_index`` is -1 and ``topk_weight`` 0 at padded patches. In eval mode
    ``aux_loss`` is 0; ``losses`` always holds the three terms (averaged over
    the slides of the batch), as diagnostics in eval and as training terms.
    ``probs`` is None from the streaming paths unless asked for (``keep_probs``).
    """

    tokens: Tensor  # B x K x D slot tokens y_k
    aux_loss: Tensor  # scalar L_aux (0 in eval)
    losses: dict[str, Tensor]  # "switch", "entropy", "z": scalars
    topk_index: Tensor  # B x N x top_k slot of each assignment (long)
    topk_weight: Tensor  # B x N x top_k truncated weight P~ (not renormalised)
    slot_counts: Tensor  # B x K real patches assigned to each slot (long)
    probs: Tensor | None = field(repr=False)  # B x N x K routing probabilities P (None: not kept)
    slots: Tensor = field(repr=False)  # B x K x D aggregated c_k, before the experts


class TCSSA(nn.Module):
    """Compress B x N x D patch features into B x K x D semantic slot tokens."""

    def __init__(
        self,
        dim: int,
        num_slots: int = 32,
        top_k: int = 2,
        expert_hidden: int = 512,
        expert_dropout: float = 0.25,
        noise_std: float = 0.1,
    ) -> None:
        super().__init__()
        self.config = TCSSAConfig(dim, num_slots, top_k, expert_hidden, expert_dropout, noise_std)
        self.dim = dim
        self.num_slots = num_slots
        self.top_k = min(top_k, num_slots)
        self.noise_std = noise_std
        self.gate = nn.Linear(dim, num_slots)
        self.experts = SlotExperts(num_slots, dim, expert_hidden, expert_dropout)
        # How the two large products run (``set_mixed_precision``); not saved with the weights.
        self.mixed_precision: str | None = None
        self.tie_margin = mixed.DEFAULT_TIE_MARGIN

    @classmethod
    def from_config(cls, config: TCSSAConfig) -> TCSSA:
        return cls(**asdict(config))

    def set_mixed_precision(self, mode: str | None, tie_margin: float | None = None) -> TCSSA:
        """Run the gate and aggregation products of a float32 model in bfloat16 (``"bf16-gate"``:
        near-ties of the top-2 choice redone in float32; ``"bf16-aggregate"``: the gate in float32),
        or not (None). Every path follows it; see ``tcssa.method.mixed``. Returns the model."""
        mixed.check_mode(mode)
        if mode is not None and self.gate.weight.dtype != torch.float32:
            raise ValueError(f"mixed precision is for a float32 model, this one is {self.gate.weight.dtype}")
        if tie_margin is not None:
            if tie_margin < 0:
                raise ValueError(f"tie_margin must be >= 0, got {tie_margin}")
            self.tie_margin = float(tie_margin)
        self.mixed_precision = mode
        return self

    # ------------------------------------------------------------------ forward
    def forward(
        self, x: Tensor, mask: Tensor | None = None, logit_offset: Tensor | None = None
    ) -> CompressorOutput:
        """``logit_offset`` (B x N x K, default None: the paper's gate) is added to the gate logits
        (``tcssa.method.routing.route``)."""
        x, mask = self._check_input(x, mask)
        if logit_offset is not None and tuple(logit_offset.shape) != (*x.shape[:2], self.num_slots):
            raise ValueError(
                f"logit_offset must be B x N x K = {(*x.shape[:2], self.num_slots)}, "
                f"got {tuple(logit_offset.shape)}"
            )
        low = self._low(x)
        routing = self._route(x, mask, logit_offset=logit_offset, x_low=low)
        sums = self._sum_slide(x, mask, routing, low)
        slots, tokens, losses, aux = self._finish(sums)
        index = routing.topk_index
        return CompressorOutput(
            tokens=tokens,
            aux_loss=aux,
            losses=losses,
            topk_index=index if mask is None else index.masked_fill(~mask.unsqueeze(-1), -1),
            topk_weight=routing.topk_weight,
            slot_counts=sums.slot_counts,
            probs=routing.probs,
            slots=slots,
        )

    @torch.no_grad()
    def slot_counts(
        self, x: Tensor, mask: Tensor | None = None, logit_offset: Tensor | None = None
    ) -> Tensor:
        """B x K patches assigned to each slot, as ``forward(x, mask).slot_counts``, from steps 1-4
        only: the per-epoch slot-use log needs no aggregation or experts."""
        x, mask = self._check_input(x, mask)
        routing = self._route(x, mask, logit_offset=logit_offset)
        return count_assignments(routing.topk_index, mask, self.num_slots)

    # ---------------------------------------------------------- streaming
    @torch.inference_mode()
    def compress_chunks(
        self, chunks: Iterable[Tensor], *, keep_probs: bool = False, source: str = "the slide"
    ) -> CompressorOutput:
        """Compress ONE slide given as consecutive chunks of its patches (each n_i x D), in eval mode.

        Memory holds one chunk, the K x D sums and the N x top_k assignments, never the
        whole slide; the tokens equal the in-memory forward's (up to float summation order).
        """
        if self.training:
            raise ValueError("compress_chunks/compress_h5 stream in eval mode only: call model.eval() first")
        sums, indices, weights, probs, offset = None, [], [], [], 0
        for chunk in chunks:
            x, _ = self._check_input(chunk, None)
            if x.shape[0] != 1:
                raise ValueError(f"{source}: a chunk must be n x D (one slide), not {tuple(x.shape)}")
            low = self._low(x)
            routing = self._route(x, None, where=f" of {source}", patch_offset=offset, x_low=low)
            part = self._sum_slide(x, None, routing, low)
            if sums is None:
                sums = part
            else:
                sums += part
            indices.append(routing.topk_index)
            weights.append(routing.topk_weight)
            if keep_probs:
                probs.append(routing.probs)
            offset += x.shape[1]
        if sums is None:
            raise ValueError(f"{source} has no patches (N = 0)")
        slots, tokens, losses, aux = self._finish(sums)
        return CompressorOutput(
            tokens=tokens,
            aux_loss=aux,
            losses=losses,
            topk_index=torch.cat(indices, dim=1),
            topk_weight=torch.cat(weights, dim=1),
            slot_counts=sums.slot_counts,
            probs=torch.cat(probs, dim=1) if keep_probs else None,
            slots=slots,
        )

    @torch.inference_mode()
    def compress_slides(self, slides: Sequence[Tensor], batch_size: int = 32) -> Tensor:
        """The tokens of each n_i x D slide of a cohort, in eval mode: len(slides) x K x D.

        Routing and the sums of step 5 run slide by slide, so no slide is padded or copied;
        the experts then run once per ``batch_size`` slides, reading their weights once per
        batch instead of once per slide. The same tokens as ``forward`` on each slide alone.
        """
        if self.training:
            raise ValueError("compress_slides runs in eval mode only: call model.eval() first")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        tokens = []
        for start in range(0, len(slides), batch_size):
            sums = []
            for i, slide in enumerate(slides[start : start + batch_size], start):
                x, _ = self._check_input(slide, None)
                if x.shape[0] != 1:
                    raise ValueError(
                        f"slide {i}: expected n x D patches of one slide, got {tuple(slide.shape)}"
                    )
                low = self._low(x)
                routing = self._route(x, None, where=f" of slide {i}", x_low=low)
                sums.append(self._sum_slide(x, None, routing, low))
            tokens.append(self._finish(SlotSums.cat(sums))[1])
        return torch.cat(tokens) if tokens else self.gate.weight.new_zeros(0, self.num_slots, self.dim)

    def forward_slides(
        self,
        slides: Sequence[Tensor] | Tensor,
        lengths: Sequence[int] | None = None,
        *,
        keep_probs: bool = False,
    ) -> CompressorOutput:
        """A batch of slides without padding, in training or eval mode (autograd as ``forward``).

        ``slides``: a list of n_i x D slides, or one packed N_total x D tensor (the slides one after
        another) with their ``lengths``. Routing runs per patch (for a list: slide by slide, so
        nothing is copied; packed: one gate product over all patches), step 5 and the routing loss
        come from per-(slide, slot) sums over each slide's own rows, and the experts run once over
        the B x K slot tokens. Per slide, tokens, losses and gradients equal ``forward`` on that
        slide alone (or on a padded, masked batch) to float tolerance; the loss terms are averaged
        over the slides, as ``forward`` averages over a batch.

        Returns a ``CompressorOutput`` whose ``tokens`` and ``slot_counts`` are B x K (x D), but
        whose ``topk_index`` and ``topk_weight`` are packed, N_total x top_k (the slides' patches
        in order; ``lengths`` splits them back), and ``probs`` is N_total x K or None.
        """
        parts = self._packed_parts(slides, lengths)
        sums, indices, weights, probs = [], [], [], []
        for i, (x, low, routing) in enumerate(parts):
            if routing is None:
                low = self._low(x)
                routing = self._route(x, None, where=f" of slide {i}", x_low=low)
            sums.append(self._sum_slide(x, None, routing, low))
            indices.append(routing.topk_index[0])
            weights.append(routing.topk_weight[0])
            if keep_probs:
                probs.append(routing.probs[0])
        slots, tokens, losses, aux = self._finish(SlotSums.cat(sums))
        return CompressorOutput(
            tokens=tokens,
            aux_loss=aux,
            losses=losses,
            topk_index=torch.cat(indices),
            topk_weight=torch.cat(weights),
            slot_counts=torch.cat([s.slot_counts for s in sums]),
            probs=torch.cat(probs) if keep_probs else None,
            slots=slots,
        )

    def _packed_parts(
        self, slides: Sequence[Tensor] | Tensor, lengths: Sequence[int] | None
    ) -> list[tuple[Tensor, Tensor | None, Routing | None]]:
        """(1 x n_i x D slide, its bfloat16 copy or None, its routing or None: route it) for each
        slide of ``forward_slides``."""
        if isinstance(slides, Tensor):
            if lengths is None:
                raise ValueError("forward_slides: a packed N_total x D tensor needs the slides' lengths")
            if slides.dim() != 2:
                raise ValueError(
                    f"forward_slides: packed slides must be N_total x D, got {tuple(slides.shape)}"
                )
            lengths = [int(n) for n in lengths]
            if not lengths or min(lengths) < 1 or sum(lengths) != slides.shape[0]:
                raise ValueError(
                    f"forward_slides: lengths must be >= 1 each and add up to the {slides.shape[0]} packed "
                    f"patches, got {lengths}"
                )
            x, _ = self._check_input(slides, None)
            low = self._low(x)
            routing = self._route(x, None, where=" of the packed slides", x_low=low)
            parts, start = [], 0
            for n in lengths:
                rows = slice(start, start + n)
                part = Routing(*(getattr(routing, f)[:, rows] for f in Routing.__dataclass_fields__))
                parts.append((x[:, rows], None if low is None else low[:, rows], part))
                start += n
            return parts
        if lengths is not None:
            raise ValueError("forward_slides: lengths go with a packed tensor, not with a list of slides")
        if len(slides) == 0:
            raise ValueError("forward_slides: no slides")
        parts = []
        for i, slide in enumerate(slides):
            x, _ = self._check_input(slide, None)
            if x.shape[0] != 1:
                raise ValueError(f"slide {i}: expected n x D patches of one slide, got {tuple(slide.shape)}")
            parts.append((x, None, None))
        return parts

    def _low(self, x: Tensor) -> Tensor | None:
        """``x`` in bfloat16 for the mixed-precision products, or None (``set_mixed_precision``)."""
        if self.mixed_precision is None:
            return None
        if x.device.type == "cpu":
            runtime.warn_once_if_cpu_lacks_bfloat16()
        return x.bfloat16()

    def _route(
        self,
        x: Tensor,
        mask: Tensor | None,
        where: str = "",
        patch_offset: int = 0,
        logit_offset: Tensor | None = None,
        x_low: Tensor | None = None,
    ) -> Routing:
        """Steps 1-4 (``tcssa.method.routing``); with ``x_low`` and ``"bf16-gate"``, step 1 in
        bfloat16 (``tcssa.method.mixed``)."""
        logits = None
        if x_low is not None and self.mixed_precision == "bf16-gate":
            logits = mixed.gate_logits(self.gate, x, x_low, self.tie_margin)
        return route(
            self.gate,
            x,
            mask,
            top_k=self.top_k,
            noise_std=self.noise_std,
            training=self.training,
            where=where,
            patch_offset=patch_offset,
            logit_offset=logit_offset,
            logits=logits,
        )

    def _sum_slide(
        self, x: Tensor, mask: Tensor | None, routing: Routing, x_low: Tensor | None = None
    ) -> SlotSums:
        """The per-slide sums of step 5 and the routing loss (``tcssa.method.aggregation``)."""
        return sum_slots(x, mask, routing, self.num_slots, x_low)

    def _finish(self, sums: SlotSums) -> tuple[Tensor, Tensor, dict[str, Tensor], Tensor]:
        """Steps 5-6 and the routing loss from the sums: (slots, tokens, losses, aux_loss)."""
        slots = slot_means(sums, self.gate.weight.dtype)  # 5. c_k = sum_j P~_jk x_j / (sum_j P~_jk + 1e-9)
        tokens = self.experts(slots)  # 6. y_k = c_k + LN(W2 Dropout(GELU(W1 c_k)))

        # In float32 (the sums' dtype) whatever the model's dtype; so are the loss terms returned.
        num_real = sums.num_real.unsqueeze(-1)  # B x 1
        mean_prob = sums.prob_sum / num_real  # Pbar_i
        assign_share = sums.slot_counts.to(mean_prob.dtype) / num_real  # f_i
        mean_lse = sums.lse_sum / sums.num_real
        losses = {
            "switch": routing_loss.switch_loss(mean_prob, assign_share).mean(),
            "entropy": routing_loss.entropy_loss(mean_prob).mean(),
            # routing_loss.z_loss, taken from per-slide sums so that streamed chunks add up.
            "z": (routing_loss.Z_LOSS_SCALE * mean_lse.square()).mean(),
        }
        if self.training:
            aux = routing_loss.aux_loss(losses["switch"], losses["entropy"], losses["z"])
        else:
            aux = losses["switch"].new_zeros(())
        return slots, tokens, losses, aux

    # ------------------------------------------------------------ input checks
    def _check_input(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if not isinstance(x, Tensor):
            raise ValueError(f"TCSSA expects a torch.Tensor of patch features, got {type(x).__name__}")
        if x.dim() == 2:
            x = x.unsqueeze(0)
            if mask is not None and mask.dim() == 1:
                mask = mask.unsqueeze(0)
        if x.dim() != 3:
            raise ValueError(
                f"TCSSA expects features of shape B x N x D or N x D, got shape {tuple(x.shape)}"
            )
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"TCSSA was built for feature dimension D={self.dim}, got features of dimension "
                f"{x.shape[-1]} (shape {tuple(x.shape)}); was the slide encoded with another encoder?"
            )
        if x.shape[1] == 0:
            raise ValueError("TCSSA got a slide with no patches (N = 0)")
        if not x.is_floating_point():
            raise ValueError(f"TCSSA expects floating-point features, got dtype {x.dtype}")
        if x.dtype != self.gate.weight.dtype:
            x = x.to(self.gate.weight.dtype)
        if x.dtype == torch.bfloat16 and x.device.type == "cpu":
            runtime.warn_once_if_cpu_lacks_bfloat16()
        if mask is not None:  # None stays None: every patch is real, and the masking work is skipped
            if tuple(mask.shape) != tuple(x.shape[:2]):
                raise ValueError(
                    f"mask must have shape B x N = {tuple(x.shape[:2])}, got {tuple(mask.shape)}"
                )
            mask = mask.to(device=x.device, dtype=torch.bool)
            empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
            if empty:
                raise ValueError(f"slide(s) at batch index {empty} have no real patch (mask all False)")
        return x, mask
