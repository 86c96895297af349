"""DenseNet-BC in torch, laid out like ``keras.applications.DenseNet121`` so Keras weights load 1:1.

torchvision's DenseNet is not usable here (no CPU wheel for this torch), and Keras differs from it
in details that change the numbers: BatchNorm epsilon 1.001e-5, and zero padding applied as its own
layer before 'valid' convolutions and pooling. Both are reproduced exactly (explicit ``F.pad``),
so a converted Keras model gives Keras's outputs to float32 rounding.

Layout (DenseNet121: growth 32, blocks 6/12/24/16, bottleneck 4 x growth, compression 0.5):
stem ``conv1`` (pad 3, 7x7 stride 2, BN, ReLU, pad 1, 3x3 max-pool stride 2); each dense layer
``conv{s}_block{j}``: BN, ReLU, 1x1 conv to 4 x growth, BN, ReLU, 3x3 conv to growth, concatenated
to its input; each transition ``pool{s}``: BN, ReLU, 1x1 conv halving the channels, 2x2 average
pool; then BN ``bn`` and ReLU. ``forward`` returns the global-average-pooled feature (1024-d).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DenseNetConfig:
    block_config: tuple[int, ...] = (6, 12, 24, 16)
    growth_rate: int = 32
    num_init_features: int = 64
    bottleneck_factor: int = 4
    compression: float = 0.5
    bn_eps: float = 1.001e-5  # Keras applications' value (torch's default is 1e-5)

    @property
    def num_features(self) -> int:
        channels = self.num_init_features
        for i, layers in enumerate(self.block_config):
            channels += layers * self.growth_rate
            if i < len(self.block_config) - 1:
                channels = int(channels * self.compression)
        return channels


class DenseLayer(nn.Module):
    def __init__(self, in_channels: int, config: DenseNetConfig):
        super().__init__()
        inner = config.bottleneck_factor * config.growth_rate
        self.norm0 = nn.BatchNorm2d(in_channels, eps=config.bn_eps)
        self.conv1 = nn.Conv2d(in_channels, inner, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(inner, eps=config.bn_eps)
        self.conv2 = nn.Conv2d(inner, config.growth_rate, 3, padding=1, bias=False)  # Keras 'same', stride 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.conv1(F.relu(self.norm0(x)))
        new = self.conv2(F.relu(self.norm1(new)))
        return torch.cat([x, new], dim=1)


class Transition(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, config: DenseNetConfig):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels, eps=config.bn_eps)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.norm(x))), 2, stride=2)


class DenseNet(nn.Module):
    def __init__(self, config: DenseNetConfig | None = None):
        super().__init__()
        self.config = config = config or DenseNetConfig()
        self.conv1 = nn.Conv2d(3, config.num_init_features, 7, stride=2, bias=False)
        self.norm1 = nn.BatchNorm2d(config.num_init_features, eps=config.bn_eps)
        channels = config.num_init_features
        self.blocks = nn.ModuleList()
        self.transitions = nn.ModuleList()
        for i, num_layers in enumerate(config.block_config):
            block = nn.ModuleList()
            for _ in range(num_layers):
                block.append(DenseLayer(channels, config))
                channels += config.growth_rate
            self.blocks.append(block)
            if i < len(config.block_config) - 1:
                reduced = int(channels * config.compression)
                self.transitions.append(Transition(channels, reduced, config))
                channels = reduced
        self.norm_final = nn.BatchNorm2d(channels, eps=config.bn_eps)
        self.num_features = channels

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W -> B x 1024 x H/32 x W/32 (Keras's ``relu`` output)."""
        x = self.conv1(F.pad(images, (3, 3, 3, 3)))  # Keras ZeroPadding2D(3) + 'valid' conv
        x = F.relu(self.norm1(x))
        # Keras pads with zeros before a 'valid' max-pool; after the ReLU every value is >= 0, but
        # the zeros are kept as Keras has them rather than relying on that.
        x = F.max_pool2d(F.pad(x, (1, 1, 1, 1)), 3, stride=2)
        for i, block in enumerate(self.blocks):
            for layer in block:
                x = layer(x)
            if i < len(self.transitions):
                x = self.transitions[i](x)
        return F.relu(self.norm_final(x))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.feature_map(images).mean(dim=(2, 3))


def keras_layer_names(config: DenseNetConfig) -> dict[str, str]:
    """torch module path -> the ``keras.applications.DenseNet`` layer name holding its weights."""
    names = {"conv1": "conv1_conv", "norm1": "conv1_bn", "norm_final": "bn"}
    for s, num_layers in enumerate(config.block_config):
        stage = s + 2  # Keras numbers the stages conv2..conv5 after the stem conv1
        for j in range(num_layers):
            keras = f"conv{stage}_block{j + 1}"
            torch_path = f"blocks.{s}.{j}"
            names[f"{torch_path}.norm0"] = f"{keras}_0_bn"
            names[f"{torch_path}.conv1"] = f"{keras}_1_conv"
            names[f"{torch_path}.norm1"] = f"{keras}_1_bn"
            names[f"{torch_path}.conv2"] = f"{keras}_2_conv"
        if s < len(config.block_config) - 1:
            names[f"transitions.{s}.norm"] = f"pool{stage}_bn"
            names[f"transitions.{s}.conv"] = f"pool{stage}_conv"
    return names
