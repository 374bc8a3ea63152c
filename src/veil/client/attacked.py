"""A client file as the obfuscator an attack sees (`veil attack RUN --client FILE`): what a store made on the
device holds is what the attackers are given, e.g. the codes of an int8 client.

Forward: images in [0, 1] -> the client's output (uint8 input: the images rounded to 0..255, as a device reads
them), in f's own scale (codes / (2^b - 1), float16 widened). onnxruntime gives no gradients, so an attacker that
needs them (the white-box inversion) takes those of the run's PyTorch obfuscator, the client's source:
straight-through, the value the client's, the gradient the source's.
"""

from __future__ import annotations

import torch
from torch import nn

from veil.client.onnxfile import Client


class ClientObfuscator(nn.Module):
    def __init__(self, client: Client, source: nn.Module):
        super().__init__()
        self.client, self.source = client, source  # source: the run's obfuscator, for gradients only
        self.levels = 2 ** client.meta["veil_features"].get("bits", 0) - 1
        self.uint8_input = client.meta["veil_input"] == "uint8"

    def run_client(self, x: torch.Tensor) -> torch.Tensor:
        batch = (x.detach() * 255).round().clamp(0, 255).to(torch.uint8) if self.uint8_input else x.detach().float()
        out = self.client.run(batch.cpu().contiguous()).to(torch.float32)
        return (out / self.levels if self.levels > 0 else out).to(x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = self.run_client(x)
        if not (torch.is_grad_enabled() and x.requires_grad):
            return value
        surrogate = self.source(x)
        return surrogate + (value - surrogate).detach()
