"""The patch-encoder contract every encoder of ``tcssa.wsi.encoders`` follows.

A ``PatchEncoder`` is a frozen torch module that turns tiles into features:

- ``preprocess(tiles)``: B x H x W x 3 uint8 (any H, W) -> B x 3 x S x S float, resized to
  ``input_size`` with antialiasing and normalised the way the model was trained;
- ``forward(images)``: the preprocessed batch -> B x ``dim`` features;
- ``extras(images)``: named per-tile outputs beside the features (default none), e.g. capricorn's
  9 PathMNIST class probabilities, with their column names in ``extra_names``;
- ``encode(tiles, precision=...)``: all of it at once under ``torch.inference_mode``, on the
  device the encoder sits on (``place``), returning float32 CPU tensors. On a GPU the batch is
  channels-last and, with ``precision="auto"``, run under bfloat16 (or float16) autocast; on the
  CPU it stays float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PRECISIONS = ("auto", "float32", "bfloat16", "float16")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def as_tile_batch(tiles: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``tiles`` as a B x H x W x 3 uint8 tensor (one H x W x 3 tile becomes a batch of one)."""
    batch = torch.from_numpy(np.ascontiguousarray(tiles)) if isinstance(tiles, np.ndarray) else tiles
    if batch.ndim == 3:
        batch = batch.unsqueeze(0)
    if batch.ndim != 4 or batch.shape[-1] != 3 or batch.dtype != torch.uint8:
        raise ValueError(
            f"tiles must be B x H x W x 3 uint8 RGB, got shape {tuple(batch.shape)} dtype {batch.dtype}"
        )
    return batch


def resize_tiles(tiles: torch.Tensor, size: int) -> torch.Tensor:
    """B x H x W x 3 uint8 -> B x 3 x size x size float in [0, 1] (bilinear, antialiased when shrinking)."""
    images = as_tile_batch(tiles).permute(0, 3, 1, 2).float().div_(255.0)
    if images.shape[-2:] != (size, size):
        images = F.interpolate(
            images, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    return images


@dataclass
class EncodedBatch:
    features: torch.Tensor  # B x dim float32, CPU
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> B x k float32, CPU


class PatchEncoder(nn.Module):
    """Base class: subclasses set ``name``, ``dim``, ``input_size`` and implement ``forward``."""

    name: str = "patch-encoder"
    dim: int = 0
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    #: extra output name -> its column names, e.g. {"pathmnist_probs": ("adipose", ...)}
    extra_names: dict[str, tuple[str, ...]] = {}  # subclasses replace it, never mutate it

    def preprocess(self, tiles: torch.Tensor | np.ndarray) -> torch.Tensor:
        images = resize_tiles(as_tile_batch(tiles).to(self.device), self.input_size)
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        return (images - mean) / std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement forward(images) -> B x dim")

    def extras(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def features_and_extras(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Features and extras of one batch; encoders whose extras come from the same pass override it."""
        return self(images), self.extras(images) if self.extra_names else {}

    @property
    def device(self) -> torch.device:
        first = next(self.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    def place(self, device: str | torch.device, *, channels_last: bool | None = None) -> PatchEncoder:
        """Move to ``device`` in eval mode; channels-last memory (faster convolutions) by default on a GPU."""
        device = torch.device(device)
        self.to(device).eval()
        if channels_last is None:
            channels_last = device.type == "cuda"
        if channels_last:
            self.to(memory_format=torch.channels_last)
        self._channels_last = channels_last
        return self

    def autocast_dtype(self, precision: str) -> torch.dtype | None:
        """The autocast dtype ``encode`` uses for ``precision`` on this encoder's device (None: float32)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if self.device.type != "cuda" or precision == "float32":
            return None  # CPU inference stays float32: bfloat16 is emulated (slow) on most CPUs
        if precision == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if precision == "bfloat16" else torch.float16

    @torch.inference_mode()
    def encode(self, tiles: torch.Tensor | np.ndarray, *, precision: str = "auto") -> EncodedBatch:
        """Tiles (B x H x W x 3 uint8) -> features and extras, float32 on the CPU."""
        dtype = self.autocast_dtype(precision)
        images = self.preprocess(tiles)
        if getattr(self, "_channels_last", False):
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            features, extras = self.features_and_extras(images)
        return EncodedBatch(
            features.float().cpu(), {key: value.float().cpu() for key, value in extras.items()}
        )
