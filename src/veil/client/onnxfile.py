"""The client file: a ClientModel as ONNX, with what a store needs to know about it as metadata.

    veil_format            veil-client, veil_format_version 1, veil_version
    veil_fingerprint       the fingerprint a store made with it records: the run's obfuscator's (fingerprint()),
                           or for an int8 client one of its own (its codes are not the float client's)
    veil_source_fingerprint  the run's obfuscator's, either way
    veil_graph_sha256      sha256 of the graph (nodes and weights): an altered graph no longer matches and is refused
    veil_obfuscator        JSON: in_channels, width, split, image_size, out_channels, feature_bits (as a store's manifest)
    veil_features          JSON: shape (C x H x W), dtype (the store's), bits
    veil_input             uint8 (0..255) or float ([0, 1] float32); always N x C x S x S, channels first
    veil_precision         fp32 or int8
    veil_data, veil_seed   the run's data settings less every path, and its seed: with them `veil obfuscate --client`
                           draws a dataset's splits (cifar10:test) exactly as the run did

One input, `images`, and one output, `features`, both with a dynamic batch. Reading runs nothing of the file
but onnxruntime's graph (no pickle, no Python code); a file that keeps its weights outside itself is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from veil.client.model import ClientModel
from veil.errors import ClientError
from veil.io import atomic_write_bytes
from veil.models.obfuscator import feature_shape, identity
from veil.version import __version__

FORMAT, FORMAT_VERSION = "veil-client", 1
OPSET = 18
INPUT, OUTPUT = "images", "features"
PRECISIONS = ("fp32", "int8")
REQUIRED = ("veil_format", "veil_format_version", "veil_version", "veil_fingerprint", "veil_source_fingerprint", "veil_graph_sha256",
            "veil_obfuscator", "veil_features", "veil_input", "veil_precision", "veil_data", "veil_seed")
PATHS = ("data_dir", "path", "cache_dir")  # data settings that may name a user's files: never written to a client


def to_onnx(model: ClientModel, in_channels: int, image_size: int) -> onnx.ModelProto:
    """The ClientModel through PyTorch's exporter (dynamo), batch dimension dynamic."""
    example = torch.zeros(2, in_channels, image_size, image_size, dtype=torch.uint8 if model.input_kind == "uint8" else torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT], output_names=[OUTPUT],
                                    dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, verbose=False, report=False)
    buffer = io.BytesIO()
    program.save(buffer)
    return onnx.load_from_string(buffer.getvalue())


def graph_digest(proto: onnx.ModelProto) -> str:
    return hashlib.sha256(proto.graph.SerializeToString(deterministic=True)).hexdigest()


def client_metadata(run, model: ClientModel, precision: str, fingerprint: str, source_fingerprint: str) -> dict[str, str]:  # noqa: ANN001
    """The metadata of a client of `run` (a veil.rundir.Run)."""
    cfg, size, o = run.config, run.config.data.image_size, run.obfuscator
    features = {"shape": list(feature_shape(o.in_channels, size, o.width, o.split, o.out_channels)), "dtype": str(model.out_dtype).removeprefix("torch."),
                **({"bits": model.bits} if model.bits else {})}
    obfuscator = {k: v for k, v in identity(o, size).items() if k != "fingerprint"}  # a store's manifest says the same
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in PATHS}
    return {"veil_format": FORMAT, "veil_format_version": str(FORMAT_VERSION), "veil_version": __version__, "veil_fingerprint": fingerprint,
            "veil_source_fingerprint": source_fingerprint, "veil_obfuscator": json.dumps(obfuscator), "veil_features": json.dumps(features),
            "veil_input": model.input_kind, "veil_precision": precision, "veil_data": json.dumps(data), "veil_seed": str(cfg.seed)}


def write_client(proto: onnx.ModelProto, metadata: dict[str, str], out: str | Path) -> int:
    """Metadata (with the graph's digest) into the model, written under a temporary name and renamed. Returns bytes."""
    del proto.metadata_props[:]
    for key, value in {**metadata, "veil_graph_sha256": graph_digest(proto)}.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name, proto.producer_version = "veil", __version__
    data = proto.SerializeToString()
    atomic_write_bytes(out, data)
    return len(data)


@dataclass
class Client:
    """A checked client file, ready to run."""

    path: Path
    meta: dict  # the veil_* metadata, JSON fields parsed
    session: ort.InferenceSession

    @property
    def fingerprint(self) -> str:
        return self.meta["veil_fingerprint"]

    def run(self, images: torch.Tensor) -> torch.Tensor:
        """N x C x S x S images -> what the store keeps. uint8 images go to either kind of client (a float-input one gets
        them divided by 255); float images in [0, 1] only to a float-input one."""
        if self.meta["veil_input"] == "uint8":
            if images.dtype != torch.uint8:
                raise ClientError(f"{self.path}: takes uint8 images 0..255, got {images.dtype}")
            x = images.numpy()
        else:
            x = (images.to(torch.float32) / 255 if images.dtype == torch.uint8 else images.to(torch.float32)).numpy()
        return torch.from_numpy(np.ascontiguousarray(self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(x)})[0]))


def read_client(path: str | Path, threads: int = 0) -> Client:
    """A client file, checked: Veil's metadata all there, the graph as it was written. threads: onnxruntime's
    intra-op threads (0: its default, every core)."""
    path = Path(path)
    if not path.is_file():
        raise ClientError(f"client file not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's decode errors have many types
        raise ClientError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        raise ClientError(f"{path}: keeps its weights in other files; a Veil client holds them itself")
    props = {p.key: p.value for p in proto.metadata_props}
    if props.get("veil_format") != FORMAT:
        raise ClientError(f"{path}: not a Veil client (no veil_format '{FORMAT}' in its metadata); make one with veil export RUN --out FILE")
    missing = [k for k in REQUIRED if k not in props]
    if missing:
        raise ClientError(f"{path}: metadata lacks {', '.join(missing)}; export it again with veil export")
    if props["veil_format_version"] != str(FORMAT_VERSION):
        raise ClientError(f"{path}: client format version {props['veil_format_version']}, this Veil reads version {FORMAT_VERSION}")
    for key in ("veil_fingerprint", "veil_source_fingerprint"):
        value = props[key]
        if len(value) != 64 or any(ch not in "0123456789abcdef" for ch in value):
            raise ClientError(f"{path}: {key} is not a sha256 fingerprint (got {value[:80]!r})")
    if graph_digest(proto) != props["veil_graph_sha256"]:
        raise ClientError(f"{path}: its graph or weights were changed after export (veil_graph_sha256 does not match); "
                          f"a store made with it could not be trusted to hold {props['veil_fingerprint'][:12]}'s codes")
    meta = dict(props)
    try:
        for key in ("veil_obfuscator", "veil_features", "veil_data"):
            meta[key] = json.loads(props[key])
        meta["veil_seed"] = int(props["veil_seed"])
    except ValueError as e:
        raise ClientError(f"{path}: damaged metadata ({e})") from None
    if meta["veil_input"] not in ("uint8", "float") or meta["veil_precision"] not in PRECISIONS:
        raise ClientError(f"{path}: veil_input '{meta['veil_input']}' / veil_precision '{meta['veil_precision']}' unknown")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only
    try:
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types
        raise ClientError(f"{path}: onnxruntime cannot load it ({e})") from None
    return Client(path, meta, session)
