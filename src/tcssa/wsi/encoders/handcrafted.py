"""handcrafted: a fast, fixed colour and texture descriptor. WEAK: a baseline and a smoke test.

No learned weights: it needs no download and runs about 15x faster than capricorn-densenet121 on a
CPU (about 100 against 6.6 tiles/s at batch 32 on 2 cores), so it is the encoder for trying the
pipeline end to end, for tests, and as the floor that a real encoder must beat. It is not a
pathology foundation model and should not be reported as one.

Per tile (resized to 224 x 224), 86 numbers, deterministic:

- RGB mean and standard deviation (6);
- HSV: a 12-bin hue histogram weighted by saturation, 8-bin saturation and value histograms (28);
- H&E colour deconvolution (Ruifrok and Johnston's stain vectors on optical density): for
  haematoxylin, eosin and the residual, mean, standard deviation and the 10/50/90th percentiles
  (of every 16th pixel) (15);
- the tissue share: pixels whose optical density sums over 0.15 (1);
- grey-level gradients (Sobel): mean and standard deviation of the magnitude, an 8-bin magnitude
  histogram and an 8-bin orientation histogram weighted by magnitude (18);
- a rotation-invariant local-binary-pattern count: for each pixel, how many of its 8 neighbours are
  brighter, as a 9-bin histogram, at full and at half resolution (18).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tcssa.wsi.encoders.base import PatchEncoder, as_tile_batch, resize_tiles

NAME = "handcrafted"
HUE_BINS, SATURATION_BINS, VALUE_BINS = 12, 8, 8
GRADIENT_BINS = 8
NEIGHBOUR_BINS = 9  # 0..8 brighter neighbours
TISSUE_OD = 0.15
#: Ruifrok & Johnston (2001) H&E-DAB stain vectors in optical density (rows: haematoxylin, eosin, residual)
STAIN_VECTORS = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))
DIM = 6 + (HUE_BINS + SATURATION_BINS + VALUE_BINS) + 15 + 1 + (2 + 2 * GRADIENT_BINS) + 2 * NEIGHBOUR_BINS


def _histogram(values: torch.Tensor, bins: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """B x P values in [0, 1] -> B x bins, normalised to sum to 1 (equal bins; 1.0 falls in the last)."""
    index = (values * bins).long().clamp_(0, bins - 1)
    weights = torch.ones_like(values) if weights is None else weights
    counts = torch.zeros(values.shape[0], bins, dtype=values.dtype, device=values.device)
    counts.scatter_add_(1, index, weights)
    return counts / counts.sum(dim=1, keepdim=True).clamp_min(1e-8)


def _hsv(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, g, b = images.unbind(1)
    value, _ = images.max(dim=1)
    low, _ = images.min(dim=1)
    chroma = value - low
    saturation = torch.where(value > 0, chroma / value.clamp_min(1e-8), torch.zeros_like(value))
    safe = chroma.clamp_min(1e-8)
    hue = torch.where(
        value == r, ((g - b) / safe) % 6, torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4)
    )
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue))
    return hue, saturation, value


def _gray(images: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor((0.299, 0.587, 0.114), device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def _sobel(gray: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sobel derivatives (/8) of B x 1 x H x W, each B x (H-2) x (W-2); by slicing, as a one-channel
    convolution was 10x slower on the CPU."""
    g = gray[:, 0]
    left, right = g[:, :, :-2], g[:, :, 2:]
    horizontal = right - left  # B x H x (W-2)
    across = (horizontal[:, :-2] + 2 * horizontal[:, 1:-1] + horizontal[:, 2:]) / 8
    top, bottom = g[:, :-2], g[:, 2:]
    vertical = bottom - top  # B x (H-2) x W
    down = (vertical[:, :, :-2] + 2 * vertical[:, :, 1:-1] + vertical[:, :, 2:]) / 8
    return across, down


def _brighter_neighbours(gray: torch.Tensor) -> torch.Tensor:
    """B x 1 x H x W -> B x (H-2)(W-2): how many of the 8 neighbours exceed the centre by > 1/255."""
    centre = gray[:, :, 1:-1, 1:-1]
    height, width = gray.shape[-2:]
    count = torch.zeros_like(centre)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            if dy == 1 and dx == 1:
                continue
            count += (gray[:, :, dy : dy + height - 2, dx : dx + width - 2] > centre + 1 / 255).float()
    return count.flatten(1) / (NEIGHBOUR_BINS - 1)  # 0..1, so bin k holds exactly k neighbours


class HandcraftedEncoder(PatchEncoder):
    """Colour, stain and texture statistics (weak; see the module docstring): 86-d, no weights."""

    name = NAME
    dim = DIM
    input_size = 224

    def __init__(self):
        super().__init__()
        stains = torch.tensor(STAIN_VECTORS)
        stains = stains / stains.norm(dim=1, keepdim=True)
        self.register_buffer("unmix", torch.linalg.inv(stains), persistent=False)
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.unmix.device

    def preprocess(self, tiles) -> torch.Tensor:
        return resize_tiles(as_tile_batch(tiles).to(self.device), self.input_size)  # RGB in [0, 1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        batch = images.shape[0]
        pixels = images.flatten(2)
        parts = [pixels.mean(dim=2), pixels.std(dim=2)]

        hue, saturation, value = (channel.flatten(1) for channel in _hsv(images))
        parts += [
            _histogram(hue, HUE_BINS, weights=saturation + 1e-6),
            _histogram(saturation, SATURATION_BINS),
            _histogram(value, VALUE_BINS),
        ]

        density = -torch.log10((pixels * 255 + 1) / 256)  # B x 3 x P, optical density
        stains = torch.einsum("bcp,cs->bsp", density, self.unmix)
        # percentiles from every 16th pixel: sorting all of them was a third of the descriptor's time
        levels = torch.tensor((0.1, 0.5, 0.9), device=images.device)
        quantiles = torch.quantile(stains[:, :, ::16], levels, dim=2)
        parts += [stains.mean(dim=2), stains.std(dim=2), quantiles.permute(1, 2, 0).reshape(batch, 9)]
        parts.append((density.sum(dim=1) > TISSUE_OD).float().mean(dim=1, keepdim=True))

        gray = _gray(images)
        across, down = _sobel(gray)
        magnitude = torch.hypot(across, down).flatten(1)  # 20x faster here than norm over the channel axis
        angle = torch.atan2(down, across).flatten(1) % math.pi / math.pi
        parts += [
            magnitude.mean(dim=1, keepdim=True),
            magnitude.std(dim=1, keepdim=True),
            _histogram(magnitude.clamp(max=1.0), GRADIENT_BINS),
            _histogram(angle, GRADIENT_BINS, weights=magnitude + 1e-6),
        ]

        for scale_gray in (gray, F.avg_pool2d(gray, 2)):
            parts.append(_histogram(_brighter_neighbours(scale_gray), NEIGHBOUR_BINS))
        return torch.cat(parts, dim=1)
