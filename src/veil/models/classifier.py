"""Classifier g: the rest of VGG16-BN after the obfuscator, plus its head (paper Figure 2b)."""

from __future__ import annotations

from torch import nn

from veil.models.obfuscator import VGG16_BLOCKS, scaled, vgg_block


class Classifier(nn.Module):
    """g(feature map) -> logits. The CIFAR form of VGG16's head: 512-512-classes, with dropout."""

    def __init__(self, num_classes: int, width: float = 1.0, split: int = 2, dropout: float = 0.5, in_channels: int = 0):
        super().__init__()
        c = in_channels or scaled(VGG16_BLOCKS[split - 1][-1], width)  # a bottleneck's k channels, else the cut's
        layers: list[nn.Module] = []
        for channels in VGG16_BLOCKS[split:]:
            block, c = vgg_block(c, channels, width)
            layers += block
        self.features = nn.Sequential(*layers)
        hidden = scaled(512, width)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),  # 1x1 already for 32x32 inputs; lets other sizes through
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(c, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )
        self.num_classes = num_classes

    def forward(self, features):  # noqa: ANN001, ANN201
        return self.head(self.features(features))
