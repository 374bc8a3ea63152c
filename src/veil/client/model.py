"""ClientModel: a run's obfuscator ending in exactly what `veil obfuscate --run` stores.

In: N x C x S x S images, uint8 0..255 (`uint8`) or float32 in [0, 1] (`float`), channels first as every
store and run in Veil. Out: a quantising obfuscator's integer codes round(sigmoid(norm(h)) * (2^b - 1)) in
the store's integer type, or the feature map as float16. The quantiser is written out here rather than
called: its straight-through form y + (q - y) is for training, and the codes are what leaves the device.
"""

from __future__ import annotations

import torch
from torch import nn

from veil.defences.noise import GaussianNoise
from veil.errors import ClientError
from veil.models.obfuscator import Quantise, code_dtype, quantised_bits

INPUTS = ("uint8", "float")


def deterministic_layers(obfuscator: nn.Module, where: str) -> list[nn.Module]:
    """The obfuscator's layers, less a noise layer that adds nothing; a noise layer that is on is refused:
    its draws cannot be reproduced on the device, so no store it makes could be checked against PyTorch's."""
    layers = []
    for m in obfuscator:
        if isinstance(m, GaussianNoise):
            if m.on:
                raise ClientError(f"{where}: its obfuscator draws noise (the noise defence, sigma {float(m.sigma):g}); "
                                 f"only a deterministic obfuscator can be exported")
            continue
        layers.append(m)
    return layers


class ClientModel(nn.Module):
    def __init__(self, obfuscator: nn.Module, input_kind: str = "uint8", where: str = "the run"):
        super().__init__()
        if input_kind not in INPUTS:
            raise ClientError(f"--input must be one of {', '.join(INPUTS)}, got '{input_kind}'")
        layers = deterministic_layers(obfuscator, where)
        self.bits = quantised_bits(nn.Sequential(*layers))
        self.quantise: Quantise | None = layers[-1] if self.bits else None
        self.body = nn.Sequential(*(layers[:-1] if self.bits else layers))
        self.input_kind = input_kind
        self.out_dtype = getattr(torch, code_dtype(self.bits))  # the store's type: float16, uint8, int16 or int32
        self.eval()

    def scaled(self, x: torch.Tensor) -> torch.Tensor:
        """What is rounded to give the codes (sigmoid(norm(h)) * (2^b - 1)), or the float feature map."""
        h = self.body(x.to(torch.float32) / 255 if self.input_kind == "uint8" else x)
        return torch.sigmoid(self.quantise.norm(h)) * self.quantise.levels if self.quantise is not None else h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.scaled(x)
        return (torch.round(y) if self.quantise is not None else y).to(self.out_dtype)
