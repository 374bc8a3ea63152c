"""An int8 client: onnxruntime's static quantisation (QDQ, weights per channel), calibrated on defender images.

Weights and activations of the convolutions become int8; what the client outputs (codes or float16) does not
change type, so a store made with it is read like any other. Its codes are not the float client's: the file
carries a fingerprint of its own (the source's, the precision and the graph), so the two never mix in one store.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from veil.client.onnxfile import INPUT, graph_digest


class Batches(CalibrationDataReader):
    """Calibration images, one batch per call, as the client takes them (uint8 or float)."""

    def __init__(self, images: torch.Tensor, batch_size: int, uint8_input: bool):
        self.batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
        self.uint8_input = uint8_input

    def get_next(self) -> dict | None:
        if not self.batches:
            return None
        x = self.batches.pop(0)
        return {INPUT: (x if self.uint8_input else x.to(torch.float32) / 255).numpy()}


def quantise(proto: onnx.ModelProto, calibration: torch.Tensor, uint8_input: bool, batch_size: int = 64) -> onnx.ModelProto:
    """The float client -> its int8 twin, calibrated on `calibration` (uint8 images)."""
    with tempfile.TemporaryDirectory(prefix="veil-int8-") as tmp:
        src, pre, out = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        onnx.save(proto, src)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out), Batches(calibration, batch_size, uint8_input), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        return onnx.load(str(out))


def int8_fingerprint(source_fingerprint: str, proto: onnx.ModelProto) -> str:
    """The fingerprint a store made with an int8 client records: its codes are its own."""
    return hashlib.sha256(f"{source_fingerprint}:int8:{graph_digest(proto)}".encode()).hexdigest()
