"""Published pathology encoders built from a LOCAL weight file: resnet50-trunc, uni, uni2, conch.

Nothing is downloaded: the weights of UNI, UNI2-h and CONCH are gated on Hugging Face (accept the
terms there, then download the file once). Pass the file with ``weights=`` (``--weights``), or put it
where ``expected_weight_path(name)`` says (``$TCSSA_CACHE/weights/<name>/<file>``).

- ``resnet50-trunc``: timm ``resnet50`` up to layer3, average-pooled (as TRIDENT and CLAM); 1024-d;
  224 px, ImageNet normalisation; timm/resnet50.tv_in1k ``model.safetensors``.
- ``uni``: timm ViT-L/16 (``vit_large_patch16_224``, LayerScale 1e-5), class token; 1024-d; 224 px,
  ImageNet; MahmoodLab/UNI ``pytorch_model.bin``.
- ``uni2``: timm ViT-H/14 (``vit_giant_patch14_224`` sized 1536 wide x 24 deep, SwiGLU, 8 register
  tokens), class token; 1536-d; 224 px, ImageNet; MahmoodLab/UNI2-h ``pytorch_model.bin``.
- ``conch``: CONCH ViT-B/16 (``conch.open_clip_custom``, the CONCH repository's open_clip), the image
  embedding before the contrastive projection; 512-d; 448 px, OpenAI CLIP normalisation;
  MahmoodLab/CONCH ``pytorch_model.bin``.

timm needs torchvision, and CONCH needs its own package (which needs timm): when the library cannot be
imported the error names it and how to install it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tcssa.io.checkpoints import read_state_dict
from tcssa.runtime import cache_root
from tcssa.wsi.encoders.base import IMAGENET_MEAN, IMAGENET_STD, PatchEncoder

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TIMM_INSTALL = "pip install timm torchvision (the `encoders` extra: pip install 'tcssa[encoders]')"
CONCH_INSTALL = "pip install git+https://github.com/mahmoodlab/CONCH.git (it also needs timm and torchvision)"


@dataclass(frozen=True)
class PretrainedSpec:
    name: str
    dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    library: str  # the module to import
    install: str  # how to get it
    weight_file: str  # the file name the publisher uses
    source: str  # where to download it


SPECS = {
    spec.name: spec
    for spec in (
        PretrainedSpec(
            "resnet50-trunc", 1024, 224, IMAGENET_MEAN, IMAGENET_STD, "timm", TIMM_INSTALL,
            "model.safetensors", "https://huggingface.co/timm/resnet50.tv_in1k",
        ),
        PretrainedSpec(
            "uni", 1024, 224, IMAGENET_MEAN, IMAGENET_STD, "timm", TIMM_INSTALL,
            "pytorch_model.bin", "https://huggingface.co/MahmoodLab/UNI (gated: accept the terms first)",
        ),
        PretrainedSpec(
            "uni2", 1536, 224, IMAGENET_MEAN, IMAGENET_STD, "timm", TIMM_INSTALL,
            "pytorch_model.bin", "https://huggingface.co/MahmoodLab/UNI2-h (gated: accept the terms first)",
        ),
        PretrainedSpec(
            "conch", 512, 448, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "conch.open_clip_custom", CONCH_INSTALL,
            "pytorch_model.bin", "https://huggingface.co/MahmoodLab/CONCH (gated: accept the terms first)",
        ),
    )
}  # fmt: skip
PRETRAINED_NAMES = tuple(SPECS)


def expected_weight_path(name: str) -> Path:
    """Where ``name``'s weight file is looked for when none is given."""
    return cache_root() / "weights" / name / SPECS[name].weight_file


def import_library(name: str) -> Any:
    """The library that builds ``name``; an ImportError naming it and how to install it otherwise."""
    spec = SPECS[name]
    try:
        return importlib.import_module(spec.library)
    except Exception as err:  # timm fails with torchvision's own errors too, not only ImportError
        raise ImportError(
            f"encoder {name} needs the `{spec.library.split('.')[0]}` package, which cannot be imported "
            f"here ({type(err).__name__}: {err}); install it: {spec.install}"
        ) from err


def create_architecture(name: str) -> nn.Module:
    """``name``'s network with random weights, as its publisher builds it (needs the library)."""
    library = import_library(name)
    if name == "resnet50-trunc":
        return library.create_model("resnet50", pretrained=False, num_classes=0)
    if name == "uni":
        return library.create_model(
            "vit_large_patch16_224", pretrained=False, img_size=224, patch_size=16, init_values=1e-5,
            num_classes=0, dynamic_img_size=True,
        )  # fmt: skip
    if name == "uni2":
        return library.create_model(
            "vit_giant_patch14_224", pretrained=False, img_size=224, patch_size=14, depth=24, num_heads=24,
            init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True,
            mlp_layer=library.layers.SwiGLUPacked, act_layer=nn.SiLU, reg_tokens=8, dynamic_img_size=True,
        )  # fmt: skip
    raise ValueError(f"encoder {name}: its library builds it from the weight file only (no random stand-in)")


class PretrainedEncoder(PatchEncoder):
    """A published encoder around the library's module; ``forward`` gives its slide-level-ready feature."""

    def __init__(self, spec: PretrainedSpec, model: nn.Module):
        super().__init__()
        self.name, self.dim, self.input_size = spec.name, spec.dim, spec.input_size
        self.mean, self.std = spec.mean, spec.std
        if spec.name == "resnet50-trunc":
            model.layer4 = nn.Identity()  # TRIDENT/CLAM's truncation: the 1024-d output of layer3
            model.fc = nn.Identity()
        self.model = model.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.name == "resnet50-trunc":
            m = self.model
            x = m.maxpool(m.act1(m.bn1(m.conv1(images))))
            return m.layer3(m.layer2(m.layer1(x))).mean(dim=(2, 3))
        if self.name == "conch":
            return self.model.encode_image(images, proj_contrast=False, normalize=False)
        return self.model(images)


def build_pretrained(name: str, weights: str | Path | None = None) -> PretrainedEncoder:
    """``name`` (one of PRETRAINED_NAMES) with the weights of ``weights`` (or the expected file)."""
    spec = SPECS[name]
    path = Path(weights).expanduser() if weights is not None else expected_weight_path(name)
    if not path.is_file():
        given = "the file given" if weights is not None else "no --weights given, so the expected file"
        raise FileNotFoundError(
            f"encoder {name} needs its weight file: {given} {path} does not exist. Download "
            f"{spec.weight_file} from {spec.source}, then pass --weights FILE or put it at "
            f"{expected_weight_path(name)}"
        )
    if name == "conch":
        library = import_library(name)
        model, _ = library.create_model_from_pretrained("conch_ViT-B-16", checkpoint_path=str(path))
        return PretrainedEncoder(spec, model)
    model = create_architecture(name)
    state = {
        k: v
        for k, v in read_state_dict(path).items()
        if not (name == "resnet50-trunc" and k.startswith("fc."))
    }
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path} does not hold {name} weights: {str(err)[:500]}") from err
    return PretrainedEncoder(spec, model)
