"""TransMIL (Shao et al., NeurIPS 2021) with mask-aware Nystrom attention (Xiong et al., AAAI 2021).

Per slide: patch features -> Linear(D, 512) + ReLU -> the sequence is padded
to a square s x s grid (s = ceil(sqrt(n))) by repeating its first patches ->
a class token is prepended -> Nystrom-attention layer -> PPEG (depthwise 7x7,
5x5 and 3x3 convolutions over the s x s grid, added to it) -> second layer
-> LayerNorm -> linear classifier on the class token.

Batching without changing any slide's result (the published implementations
do not guarantee this: their landmarks are segment means over the padded
sequence and the pseudo-inverse is scaled by a batch-wide maximum):
- real patches are first moved to the front of the sequence in their order;
- each slide's landmarks are the means of m near-equal segments of its own
  real tokens (a slide shorter than m gets one landmark per token, which
  makes the approximation exact);
- the iterative pseudo-inverse is scaled per slide and head;
- batch padding is masked in every softmax, zeroed before the depthwise
  value convolution, and each slide's grid is laid out in its own s x s
  window of a zero-filled grid, so the convolutions see the zero border a
  slide alone would see.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tcssa.mil.base import MILModel, compact


def iterative_pinv(matrix: Tensor, iterations: int = 6) -> Tensor:
    """Moore-Penrose pseudo-inverse of each square matrix in ``matrix`` (... x m x m) by iteration.

    Z_0 = A^T / (max column sum * max row sum of |A|), then
    Z <- 1/4 Z (13 I - A Z (15 I - A Z (7 I - A Z))). The scale is taken per
    matrix, so a matrix's pseudo-inverse does not depend on its batch. Rows and
    columns of zeros stay zero throughout (an absent landmark).
    """
    absolute = matrix.abs()
    scale = absolute.sum(dim=-2).amax(dim=-1) * absolute.sum(dim=-1).amax(dim=-1)
    z = matrix.transpose(-1, -2) / scale[..., None, None].clamp(min=torch.finfo(matrix.dtype).tiny)
    identity = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    for _ in range(iterations):
        az = matrix @ z
        z = 0.25 * z @ (13 * identity - az @ (15 * identity - az @ (7 * identity - az)))
    return z


class NystromAttention(nn.Module):
    """Multi-head Nystrom self-attention over prefix-masked sequences, with a depthwise value convolution."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        num_landmarks: int = 256,
        pinv_iterations: int = 6,
        residual_kernel: int = 33,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"transmil: dim {dim} must be divisible by heads {heads}")
        if num_landmarks < 1 or pinv_iterations < 1:
            raise ValueError("transmil: num_landmarks and pinv_iterations must be >= 1")
        if residual_kernel < 1 or residual_kernel % 2 == 0:
            raise ValueError(f"transmil: residual_kernel must be odd and >= 1, got {residual_kernel}")
        self.heads = heads
        self.head_dim = dim // heads
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        # One kernel per head, sliding along the sequence (shared across the head's channels).
        self.value_conv = nn.Conv2d(
            heads, heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0), groups=heads, bias=False
        )

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """``x`` B x L x dim with ``mask`` B x L True on a prefix of each row; padded rows come back 0."""
        batch, length, _ = x.shape
        q, k, v = (
            t.reshape(batch, length, self.heads, self.head_dim).transpose(1, 2)
            for t in self.to_qkv(x).chunk(3, dim=-1)
        )
        # Padded positions: their queries' outputs are dropped, their keys masked in every softmax;
        # their values are zeroed so that the value convolution sees what a slide alone sees.
        v = v * mask.to(x.dtype)[:, None, :, None]
        q = q * self.head_dim**-0.5

        # Landmarks: the means of m segments of each slide's n real tokens; segment j holds tokens
        # ceil(j n / m) .. ceil((j + 1) n / m) - 1 (n >= m), or token j alone (n < m, then exact).
        # Segment sums are differences of float64 prefix sums over the real prefix: padding is
        # never read, and the result is deterministic on every device.
        m = self.num_landmarks
        n = mask.sum(dim=1, keepdim=True)  # B x 1
        j = torch.arange(m + 1, device=x.device).unsqueeze(0)
        bounds = torch.where(n >= m, (j * n + m - 1) // m, torch.minimum(j, n))  # B x (m + 1)
        counts = (bounds[:, 1:] - bounds[:, :-1]).to(x.dtype)  # B x m
        present = counts > 0
        divisor = counts.clamp(min=1)[:, None, :, None]
        q_land = self._segment_sums(q, bounds) / divisor
        k_land = self._segment_sums(k, bounds) / divisor

        big_negative = torch.finfo(x.dtype).min
        present_col = present[:, None, None, :]  # B x 1 x 1 x m
        present_row = present[:, None, :, None].to(x.dtype)  # B x 1 x m x 1
        kernel_1 = (q @ k_land.transpose(-1, -2)).masked_fill(~present_col, big_negative).softmax(-1)
        kernel_2 = (q_land @ k_land.transpose(-1, -2)).masked_fill(~present_col, big_negative).softmax(-1)
        kernel_2 = kernel_2 * present_row * present_col.to(x.dtype)
        kernel_3 = (
            (q_land @ k.transpose(-1, -2)).masked_fill(~mask[:, None, None, :], big_negative).softmax(-1)
        )
        kernel_3 = kernel_3 * present_row
        # Right to left: L x m x d products only, never an L x m x m one.
        out = kernel_1 @ (iterative_pinv(kernel_2, self.pinv_iterations) @ (kernel_3 @ v))
        out = out + self.value_conv(v)  # v is 0 at padding, as a slide alone sees past its end
        out = out.transpose(1, 2).reshape(batch, length, -1)
        return self.to_out(out) * mask.unsqueeze(-1).to(x.dtype)

    @staticmethod
    def _segment_sums(values: Tensor, bounds: Tensor) -> Tensor:
        """Sums of ``values`` (B x h x L x d) over positions bounds[j] .. bounds[j + 1] - 1: B x h x m x d."""
        prefix = F.pad(values.double().cumsum(dim=2), (0, 0, 1, 0))  # prefix[t] = sum of the first t
        index = bounds[:, None, :, None].expand(-1, values.shape[1], -1, values.shape[-1])
        ends = prefix.gather(2, index)
        return (ends[:, :, 1:] - ends[:, :, :-1]).to(values.dtype)


class TransLayer(nn.Module):
    """x + NystromAttention(LayerNorm(x))."""

    def __init__(self, dim: int, **attention: int | float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = NystromAttention(dim, **attention)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return x + self.attention(self.norm(x), mask)


class PPEG(nn.Module):
    """Pyramid position encoding generator: grid + DWConv7(grid) + DWConv5(grid) + DWConv3(grid)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(dim, dim, size, padding=size // 2, groups=dim) for size in (7, 5, 3)
        )

    def forward(self, tokens: Tensor, side: Tensor, mask: Tensor) -> Tensor:
        """``tokens``: B x L x dim patch tokens (no class token); slide b fills an s_b x s_b grid by rows."""
        batch, length, dim = tokens.shape
        grid_side = int(side.max())
        position = torch.arange(length, device=tokens.device).unsqueeze(0)
        cell = (position // side.unsqueeze(1)) * grid_side + position % side.unsqueeze(1)
        cell = cell.masked_fill(~mask, grid_side * grid_side)  # padding goes to a dropped cell
        index = cell.unsqueeze(1).expand(-1, dim, -1)  # B x dim x L
        grid = tokens.new_zeros(batch, dim, grid_side * grid_side + 1)
        grid = grid.scatter(2, index, tokens.transpose(1, 2))[..., :-1]
        grid = grid.reshape(batch, dim, grid_side, grid_side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        grid = F.pad(grid.reshape(batch, dim, -1), (0, 1))
        return grid.gather(2, index).transpose(1, 2) * mask.unsqueeze(-1).to(tokens.dtype)


class TransMIL(MILModel):
    """TransMIL: two Nystrom-attention layers with a PPEG between them; the class token is classified."""

    name = "transmil"

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        dim: int = 512,
        heads: int = 8,
        num_landmarks: int = 256,
        pinv_iterations: int = 6,
        residual_kernel: int = 33,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(in_dim, num_classes)
        attention = dict(
            heads=heads,
            num_landmarks=num_landmarks,
            pinv_iterations=pinv_iterations,
            residual_kernel=residual_kernel,
            dropout=dropout,
        )
        self.project = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.layer1 = TransLayer(dim, **attention)
        self.ppeg = PPEG(dim)
        self.layer2 = TransLayer(dim, **attention)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, coords: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        x, mask, _ = self.check_input(x, mask, coords)
        x, mask = compact(x, mask)
        h = self.project(x)
        batch = h.shape[0]

        # Square padding per slide: s = ceil(sqrt(n)), grid position p holds patch p, or patch p - n
        # past the end (s^2 - n <= n, so the first patches are repeated once at most).
        count = mask.sum(dim=1)
        side = torch.sqrt(count.double()).ceil().long()
        side = side - ((side - 1) ** 2 >= count).long()  # guard against sqrt rounding up
        side = side + (side**2 < count).long()  # ... or down
        length = int((side**2).max())
        position = torch.arange(length, device=h.device).unsqueeze(0)
        source = torch.where(position < count.unsqueeze(1), position, position - count.unsqueeze(1))
        in_grid = position < (side**2).unsqueeze(1)
        source = source.clamp(min=0, max=h.shape[1] - 1).masked_fill(~in_grid, 0)
        patches = h.gather(1, source.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        patches = patches * in_grid.unsqueeze(-1).to(h.dtype)

        seq = torch.cat([self.cls_token.expand(batch, -1, -1).to(h.dtype), patches], dim=1)
        seq_mask = torch.cat([in_grid.new_ones(batch, 1), in_grid], dim=1)
        seq = self.layer1(seq, seq_mask)
        seq = torch.cat([seq[:, :1], self.ppeg(seq[:, 1:], side, in_grid)], dim=1)
        seq = self.layer2(seq, seq_mask)
        return self.classifier(self.norm(seq[:, 0])), {}
