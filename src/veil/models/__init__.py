"""The three networks: obfuscator f, classifier g, reconstructors r (Table 1)."""

import torch
from torch import nn

from veil.models.classifier import Classifier
from veil.models.obfuscator import BOTTLENECKS, Obfuscator, build_obfuscator, client_cost, cut_channels, feature_shape
from veil.models.reconstructors import RECONSTRUCTORS, build_reconstructor

__all__ = [
    "BOTTLENECKS", "Obfuscator", "Classifier", "RECONSTRUCTORS", "build_obfuscator", "build_reconstructor", "build_networks", "client_cost",
    "cut_channels", "feature_shape", "init_xavier",
]


def init_xavier(module):  # noqa: ANN001, ANN201
    """Xavier (Glorot) uniform weights, zero biases, BatchNorm at identity (Algorithm 1).
    The same weights whatever the memory layout: a channels-last weight is drawn in the contiguous order."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            drawn = nn.init.xavier_uniform_(torch.empty(m.weight.shape, dtype=m.weight.dtype, device=m.weight.device))
            with torch.no_grad():
                m.weight.copy_(drawn)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


def build_networks(model_cfg, channels: int, num_classes: int, image_size: int = 32, tail=None, seed: int = 0) -> dict:  # noqa: ANN001
    """Obfuscator, classifier and training reconstructor for a ModelConfig, Xavier-initialised.
    `tail`: a defence's layer appended to the obfuscator (veil.defences.obfuscator_layer);
    `seed`: draws a fixed bottleneck projection (model.bottleneck = orthogonal)."""
    obfuscator = init_xavier(build_obfuscator(model_cfg, channels, seed, tail))
    classifier = init_xavier(Classifier(num_classes, model_cfg.width, model_cfg.split, model_cfg.dropout, obfuscator.out_channels))
    reconstructor = init_xavier(build_reconstructor(model_cfg.reconstructor, obfuscator.out_channels, channels, model_cfg.width, model_cfg.split))
    return {"obfuscator": obfuscator, "classifier": classifier, "reconstructor": reconstructor}
