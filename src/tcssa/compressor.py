"""TC-SSA: Token Compression via Semantic Slot Aggregation (docs/METHOD.md).

All N patch features of a slide (B x N x D, with an optional B x N mask, True
for real patches) become K slot tokens (B x K x D):

1. gate logits            z_j = W_g x_j + b
2. exploration noise      z~_j = z_j + eps, eps ~ N(0, sigma^2), training only
3. routing probabilities  P_j = softmax(z~_j)
4. top-2 assignment       P~_jk = m_jk P_jk (m_jk = 1 for the two largest, NOT renormalised)
5. slot aggregation       c_k = sum_j P~_jk x_j / (sum_j P~_jk + 1e-9)
6. slot experts           y_k = c_k + LayerNorm_k(W2_k Dropout(GELU(W1_k c_k)))

plus the auxiliary routing loss of ``tcssa.routing_loss``. Padded patches take
no part in routing, aggregation, slot counts or any loss mean.

Implementation choices (measured, see docs/RESULTS.md, "Speed and memory"): the
top-2 weights are scattered into a dense B x N x K matrix and aggregated with one
batched matmul, which on CPU beats index_add and torch.sparse; steps 5 and the
routing loss are computed from per-slide sums, so a slide streamed from disk a
chunk at a time (``compress_h5``) gives the same tokens in bounded memory; the K
experts are stacked weights applied with one batched matmul, so a batch of slides
reads them once. No B x N x K x D temporary is ever formed.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tcssa import reference_layout, routing_loss

AGGREGATION_EPS = 1e-9
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, as in the published code


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


@dataclass
class _Routing:
    """Steps 1-4 for a batch (or a chunk of one slide)."""

    lse: Tensor  # B x N logsumexp_k z~_jk, for the z-loss (the B x N x K logits need not be kept)
    probs: Tensor  # B x N x K routing probabilities P
    topk_weight: Tensor  # B x N x top_k truncated weights P~ (0 at padded patches)
    topk_index: Tensor  # B x N x top_k slot indices


@dataclass
class _SlotSums:
    """Per-slide sums over real patches: all that steps 5-6 and the routing loss need."""

    slot_sum: Tensor  # B x K x D  sum_j P~_jk x_j
    slot_mass: Tensor  # B x K     sum_j P~_jk
    slot_counts: Tensor  # B x K   top-k assignments per slot (long)
    prob_sum: Tensor  # B x K      sum_j P_jk (for Pbar)
    lse_sum: Tensor  # B           sum_j logsumexp_k z~_jk (for the z-loss)
    num_real: Tensor  # B          real patches

    def __iadd__(self, other: _SlotSums) -> _SlotSums:  # more patches of the same slides
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    @staticmethod
    def cat(parts: Sequence[_SlotSums]) -> _SlotSums:  # more slides
        return _SlotSums(
            *(torch.cat([getattr(p, name) for p in parts]) for name in _SlotSums.__dataclass_fields__)
        )


class SlotExperts(nn.Module):
    """K independent residual MLP experts, stored stacked and applied in one batched pass.

    Expert k: y_k = c_k + LayerNorm_k(W2_k Dropout(GELU(W1_k c_k))). The weights are
    stored (in, out), the transpose of nn.Linear's layout, so that ``c @ W`` has its
    weight gradient come out in the weight's own layout: autograd then need not copy
    2 x K x H x D gradients into place every training step (measured, docs/RESULTS.md).
    ``TCSSA.reference_state_dict`` converts to and from the published per-expert layout.
    """

    def __init__(self, num_slots: int, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.dropout = dropout
        self.w1 = nn.Parameter(torch.empty(num_slots, dim, hidden))  # W1_k^T
        self.b1 = nn.Parameter(torch.empty(num_slots, hidden))
        self.w2 = nn.Parameter(torch.empty(num_slots, hidden, dim))  # W2_k^T
        self.b2 = nn.Parameter(torch.empty(num_slots, dim))
        self.ln_weight = nn.Parameter(torch.ones(num_slots, dim))
        self.ln_bias = nn.Parameter(torch.zeros(num_slots, dim))
        # Saved with the weights, so that a checkpoint of the earlier (out, in) layout, which has
        # the same shapes when D = H, is recognised and transposed on loading.
        self.register_buffer("layout_version", torch.tensor(self.LAYOUT_VERSION))
        self.reset_parameters()

    LAYOUT_VERSION = 2  # 1 (no marker): w1, w2 stored (out, in); 2: (in, out)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        marker = prefix + "layout_version"
        if marker not in state_dict:  # saved before the (in, out) layout
            for name in ("w1", "w2"):
                if prefix + name in state_dict:
                    state_dict[prefix + name] = state_dict[prefix + name].transpose(1, 2)
            state_dict[marker] = torch.tensor(self.LAYOUT_VERSION)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def hidden(self) -> int:
        return self.w1.shape[-1]

    def reset_parameters(self) -> None:
        # nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), expert by expert, drawn
        # in nn.Linear's (out, in) order so that a seed gives the same experts in either layout.
        with torch.no_grad():
            for weight, bias in ((self.w1, self.b1), (self.w2, self.b2)):
                num_slots, fan_in, fan_out = weight.shape
                bound = 1.0 / math.sqrt(fan_in)
                drawn = torch.empty(num_slots, fan_out, fan_in).uniform_(-bound, bound)
                weight.copy_(drawn.transpose(1, 2))
                nn.init.uniform_(bias, -bound, bound)
        nn.init.ones_(self.ln_weight)
        nn.init.zeros_(self.ln_bias)

    def forward(self, slots: Tensor) -> Tensor:
        c = slots.transpose(0, 1)  # K x B x D: the slot is the batch dim of bmm
        h = torch.baddbmm(self.b1.unsqueeze(1), c, self.w1)
        h = F.dropout(F.gelu(h), self.dropout, self.training)
        out = torch.baddbmm(self.b2.unsqueeze(1), h, self.w2).transpose(0, 1)  # B x K x D
        out = F.layer_norm(out, out.shape[-1:], eps=LAYER_NORM_EPS)
        return slots + out * self.ln_weight + self.ln_bias


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

    @classmethod
    def from_config(cls, config: TCSSAConfig) -> TCSSA:
        return cls(**asdict(config))

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, mask: Tensor | None = None) -> CompressorOutput:
        x, mask = self._check_input(x, mask)
        routing = self._route(x, mask)
        sums = self._sum_slide(x, mask, routing)
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
            routing = self._route(x, None, where=f" of {source}", patch_offset=offset)
            part = self._sum_slide(x, None, routing)
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
                sums.append(self._sum_slide(x, None, self._route(x, None, where=f" of slide {i}")))
            tokens.append(self._finish(_SlotSums.cat(sums))[1])
        return torch.cat(tokens) if tokens else self.gate.weight.new_zeros(0, self.num_slots, self.dim)

    def compress_h5(
        self, path, chunk_size: int = 16_384, *, keep_probs: bool = False, progress: bool = False
    ) -> CompressorOutput:
        """Compress the ``features`` of one TRIDENT/CLAM h5 file, read ``chunk_size`` patches at a time.

        Eval mode only. Peak memory is the model plus about one chunk (in the model's dtype),
        whatever N is; float16 features on disk go straight to the model's dtype, chunk by chunk.
        """
        from tcssa.streaming import iter_h5_chunks

        chunks = iter_h5_chunks(path, chunk_size, dtype=self.gate.weight.dtype, progress=progress)
        return self.compress_chunks(chunks, keep_probs=keep_probs, source=str(path))

    def _route(self, x: Tensor, mask: Tensor | None, where: str = "", patch_offset: int = 0) -> _Routing:
        """Steps 1-4 for B x N x D features (mask None: every patch is real)."""
        logits = self.gate(x)  # 1. z_j = W_g x_j + b
        self._check_finite(logits, where, patch_offset)
        if self.training and self.noise_std > 0:  # 2. exploration noise, training only
            logits = logits + torch.randn_like(logits) * self.noise_std
        probs = logits.softmax(dim=-1)  # 3. P_j
        # 4. P~ = m * P, not renormalised
        topk_weight, topk_index = _top2(probs) if self.top_k == 2 else probs.topk(self.top_k, dim=-1)
        # logsumexp_k z~_jk for the z-loss, without another pass over N x K: the top slot has
        # P = exp(z_max - lse), so lse = z_max - log P_max (and P_max >= 1/K keeps the log tame).
        lse = logits.gather(-1, topk_index[..., :1]).squeeze(-1) - topk_weight[..., 0].log()
        if mask is not None:  # padded patches get weight 0 (and index -1 in the output)
            topk_weight = topk_weight * mask.unsqueeze(-1)
        return _Routing(lse, probs, topk_weight, topk_index)

    def _sum_slide(self, x: Tensor, mask: Tensor | None, routing: _Routing) -> _SlotSums:
        """The sums over patches that step 5 and the routing loss need.

        Sums, not means, so that a slide streamed in chunks (``compress_h5``) adds up to
        exactly what the whole slide in memory gives. They are kept in float32 (float64 for a
        float64 model) whatever the model's dtype: in bfloat16 a sum over N = 100,001 patches
        would be rounded to a multiple of 512 (the patch count itself becomes 99,840), and the
        routing-loss terms, small differences of such sums, would be lost. The sums are B x K (x D),
        so this costs nothing next to the B x N x K routing.
        """
        probs, index = routing.probs, routing.topk_index
        acc = routing_loss.accumulation_dtype(probs.dtype)
        weights = torch.zeros_like(probs).scatter_(-1, index, routing.topk_weight)  # P~, B x N x K
        lse = routing.lse
        # Counting from indices (not from weights > 0) so that an underflowed P still counts.
        real_assignments = torch.ones_like(index) if mask is None else mask.unsqueeze(-1).expand_as(index)
        slot_counts = torch.zeros(probs.shape[0], self.num_slots, dtype=torch.long, device=probs.device)
        slot_counts.scatter_add_(1, index.flatten(1), real_assignments.flatten(1).long())
        if mask is None:
            prob_sum, lse_sum = probs.sum(dim=1, dtype=acc), lse.sum(dim=-1, dtype=acc)
            num_real = torch.full_like(lse_sum, probs.shape[1])
        else:
            real = mask.to(acc)
            if probs.dtype == acc:  # one matmul
                prob_sum = torch.einsum("bnk,bn->bk", probs, real)
            else:  # zero the padded patches in the model's dtype (exact), add up in float32
                prob_sum = (probs * mask.unsqueeze(-1)).sum(dim=1, dtype=acc)
            lse_sum, num_real = (lse.to(acc) * real).sum(dim=-1), real.sum(dim=-1)
        return _SlotSums(
            # sum_j P~_jk x_j, B x K x D: the matmul in the model's dtype, kept in float32 so that
            # streamed chunks add up without a rounding per chunk
            slot_sum=(weights.transpose(1, 2) @ x).to(acc),
            slot_mass=weights.sum(dim=1, dtype=acc),  # sum_j P~_jk, B x K
            slot_counts=slot_counts,
            prob_sum=prob_sum,
            lse_sum=lse_sum,
            num_real=num_real,
        )

    def _finish(self, sums: _SlotSums) -> tuple[Tensor, Tensor, dict[str, Tensor], Tensor]:
        """Steps 5-6 and the routing loss from the sums: (slots, tokens, losses, aux_loss)."""
        # 5. c_k = sum_j P~_jk x_j / (sum_j P~_jk + 1e-9); an empty slot gives c_k = 0.
        slots = sums.slot_sum / (sums.slot_mass.unsqueeze(-1) + AGGREGATION_EPS)
        slots = slots.to(self.gate.weight.dtype)  # the sums are float32; the experts run in the model's dtype
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
            _warn_once_if_cpu_lacks_bfloat16()
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

    @staticmethod
    def _check_finite(logits: Tensor, where: str = "", patch_offset: int = 0) -> None:
        # NaN or Inf in any feature always makes its gate logits non-finite, so checking the
        # B x N x K logits catches bad features at 1/D of the cost of scanning B x N x D; one sum
        # decides, and only a failure pays for finding the patch.
        if bool(torch.isfinite(logits.sum())):
            return
        finite = torch.isfinite(logits).all(dim=-1)
        if not bool(finite.all()):  # (the sum alone may overflow on huge but finite logits)
            bad = (~finite).nonzero()
            b, n = bad[0].tolist()
            n += patch_offset
            raise ValueError(
                f"features{where} contain NaN or Inf (or overflow the gate): {len(bad)} patch(es), "
                f"first at batch index {b}, patch {n}. Padded positions must hold finite values too."
            )

    # ------------------------------------------------- published-code layout (tcssa.reference_layout)
    def reference_state_dict(self, prefix: str = "") -> dict[str, Tensor]:
        """This compressor's weights in the published code's layout (``gate.*``, ``experts.{k}.net.*``)."""
        return reference_layout.export_weights(self, prefix)

    def load_reference_state_dict(self, state_dict: dict) -> TCSSA:
        """Load a checkpoint saved by the published TC-SSA code into this module; returns ``self``.

        Accepts the bare compressor keys, keys under a prefix such as ``compressor.``, and a
        training checkpoint that wraps them in ``model_state_dict`` or ``state_dict``.
        """
        reference_layout.load_weights(self, state_dict)
        return self

    @classmethod
    def from_reference_state_dict(cls, state_dict: dict, **config) -> TCSSA:
        """Build a TCSSA with D, K and H read off a published-code checkpoint, then load it."""
        num_slots, hidden, dim = reference_layout.read_weights(state_dict)["w1"].shape
        model = cls(dim, num_slots=num_slots, expert_hidden=hidden, **config)
        return model.load_reference_state_dict(state_dict)


def cpu_has_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX, as oneDNN sees it);
    True when this torch cannot tell (then nobody is warned wrongly)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return True


#: How the warning below begins (``tcssa bench`` filters it out: measuring bfloat16 is its point).
BFLOAT16_EMULATED_WARNING = "TCSSA is running in bfloat16 on a CPU without bfloat16 instructions"


@functools.cache
def _warn_once_if_cpu_lacks_bfloat16() -> None:
    # Without the instructions torch emulates bfloat16 products: `tcssa bench` measured the
    # bfloat16 forward at 0.30x the float32 speed on such a CPU (docs/RESULTS.md), a trap for
    # anyone who chose bfloat16 to go faster. Memory is still halved, so it stays allowed.
    if not cpu_has_bfloat16():
        warnings.warn(
            f"{BFLOAT16_EMULATED_WARNING} (no AVX512-BF16/AMX): torch emulates them, so this is "
            "about 3x slower than float32 here (it still halves memory). "
            "For speed on this machine use float32.",
            RuntimeWarning,
            stacklevel=3,  # the TCSSA method that was called
        )


def _top2(probs: Tensor) -> tuple[Tensor, Tensor]:
    """``probs.topk(2, dim=-1)`` as two max passes, about twice as fast on CPU (docs/RESULTS.md)."""
    first, first_index = probs.max(dim=-1, keepdim=True)
    second, second_index = probs.scatter(-1, first_index, -1.0).max(dim=-1, keepdim=True)  # P >= 0
    return torch.cat([first, second], dim=-1), torch.cat([first_index, second_index], dim=-1)
