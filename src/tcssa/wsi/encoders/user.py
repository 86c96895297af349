"""Your own encoder, named ``module:callable`` (e.g. ``my_lab.encoders:build``).

The contract. ``module`` is imported (it must be importable: installed, or on ``PYTHONPATH``) and
``callable`` (a dotted attribute path inside it) is called with no argument, or with
``weights=<path>`` when ``--weights`` is given. It returns either

- a ``tcssa.wsi.encoders.PatchEncoder`` (``name``, ``dim``, ``input_size``, ``preprocess``,
  ``forward``, optional ``extras``/``extra_names``), used as it is; or
- a triple ``(module, dim, preprocess)``: an ``nn.Module`` mapping B x 3 x S x S images to B x dim
  features, the feature width, and a function mapping B x H x W x 3 uint8 tiles (a torch tensor on
  the module's device) to the module's B x 3 x S x S float input (resizing and normalising).

Either way the encoder is checked once on a blank 256 x 256 tile: ``preprocess`` must give a
1 x 3 x S x S float tensor and ``forward`` a 1 x dim one, so a broken contract fails at build time
with a message naming the callable, not halfway through a slide.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from tcssa.wsi.encoders.base import PatchEncoder, as_tile_batch

PROBE_TILE = 256


class ModuleEncoder(PatchEncoder):
    """A user's (module, dim, preprocess) triple as a PatchEncoder."""

    def __init__(
        self, name: str, module: nn.Module, dim: int, preprocess: Callable[[torch.Tensor], torch.Tensor]
    ):
        super().__init__()
        self.name, self.dim = name, int(dim)
        self.module = module.eval()
        self._preprocess = preprocess
        self.input_size = 0  # set from the probe: what preprocess gives

    def preprocess(self, tiles) -> torch.Tensor:
        return self._preprocess(as_tile_batch(tiles).to(self.device))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images)


def _resolve(spec: str) -> Callable:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"a user encoder is named 'module:callable', got {spec!r}")
    try:
        target = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(f"encoder {spec}: cannot import module {module_name!r} ({err})") from err
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"encoder {spec}: {module_name} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"encoder {spec}: {attribute} is a {type(target).__name__}, not a callable")
    return target


def _probe(spec: str, encoder: PatchEncoder) -> PatchEncoder:
    tile = torch.full((1, PROBE_TILE, PROBE_TILE, 3), 200, dtype=torch.uint8)
    with torch.inference_mode():
        images = encoder.preprocess(tile)
        if not (isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[:2] == (1, 3)):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(
                f"encoder {spec}: preprocess must return 1 x 3 x S x S for one tile, got {shape}"
            )
        if not images.is_floating_point():
            raise ValueError(f"encoder {spec}: preprocess must return float images, got {images.dtype}")
        features = encoder(images)
    if not isinstance(features, torch.Tensor) or tuple(features.shape) != (1, encoder.dim):
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(
            f"encoder {spec}: forward must return 1 x dim={encoder.dim} for one tile, got {shape}"
        )
    if not encoder.input_size:
        encoder.input_size = int(images.shape[-1])
    return encoder


def build_user_encoder(spec: str, weights: str | Path | None = None) -> PatchEncoder:
    """The encoder ``module:callable`` returns (see the module docstring for the contract)."""
    factory = _resolve(spec)
    result = factory() if weights is None else factory(weights=Path(weights))
    if isinstance(result, PatchEncoder):
        encoder = result
    elif isinstance(result, tuple) and len(result) == 3 and isinstance(result[0], nn.Module):
        module, dim, preprocess = result
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1 or not callable(preprocess):
            raise ValueError(f"encoder {spec}: the triple must be (nn.Module, dim >= 1, preprocess callable)")
        encoder = ModuleEncoder(spec, module, dim, preprocess)
    else:
        raise ValueError(
            f"encoder {spec}: the callable must return a PatchEncoder or (nn.Module, dim, preprocess), "
            f"got {type(result).__name__}"
        )
    return _probe(spec, encoder.eval())
