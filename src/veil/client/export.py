"""`veil export RUN --out client.onnx`: the run's final obfuscator alone, for the device, checked against PyTorch.

After writing the file it is read back as `veil obfuscate --client` reads it, and run on the users' images
(the run's test split) beside PyTorch: OUT.parity.json keeps the comparison (parity.py), and an int8 client's
agreement with the float obfuscator.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from veil.client import int8
from veil.client.model import ClientModel
from veil.client.onnxfile import OPSET, client_metadata, read_client, to_onnx, write_client
from veil.client.parity import compare
from veil.data import load_splits
from veil.errors import ClientError
from veil.io import atomic_write_json
from veil.models.obfuscator import fingerprint
from veil.rundir import load_run


def parity_path(out: str | Path) -> Path:
    return Path(f"{out}.parity.json")


def export_client(run_dir: str | Path, out: str | Path, input_kind: str = "uint8", precision: str = "fp32", calibration: int = 512,
                  check: int = 0, batch_size: int = 500, log=print) -> dict:  # noqa: ANN001
    """Write the client of `run_dir` to `out`; returns what OUT.parity.json holds. check: users' images to compare
    (0: the whole test split); calibration: defender images an int8 client is calibrated on."""
    out = Path(out)
    if out.suffix != ".onnx":
        raise ClientError(f"--out {out}: a client is an .onnx file (e.g. client.onnx)")
    if not out.parent.is_dir():
        raise ClientError(f"--out {out}: folder {out.parent} does not exist")
    if precision not in ("fp32", "int8"):
        raise ClientError(f"--precision must be fp32 or int8, got '{precision}'")
    if calibration < 1 or check < 0:
        raise ClientError(f"--calibration must be >= 1 and --check >= 0, got {calibration} and {check}")
    run = load_run(run_dir, "cpu")
    if not run.summary:
        log(f"note: {run_dir} has not finished training; its latest checkpoint is exported")
    model = ClientModel(run.obfuscator, input_kind, str(run_dir))
    t0 = time.perf_counter()
    proto = to_onnx(model, run.channels, run.config.data.image_size)
    source_fp = fingerprint(run.obfuscator)
    splits = load_splits(run.config.data, run.config.seed)
    fp = source_fp
    if precision == "int8":
        g = torch.Generator().manual_seed(run.config.seed)
        pick = torch.randperm(len(splits.defender), generator=g)[:calibration]
        proto = int8.quantise(proto, splits.defender.images[pick], input_kind == "uint8")
        fp = int8.int8_fingerprint(source_fp, proto)
    size = write_client(proto, client_metadata(run, model, precision, fp, source_fp), out)
    seconds = time.perf_counter() - t0
    client = read_client(out)  # as a device would read it: every check of veil obfuscate --client
    users = splits.test.images[: check or None]
    result = {"client": str(out), "run": str(run_dir), "opset": OPSET, "precision": precision, "input": input_kind, "bytes": size,
              "export_seconds": seconds, "fingerprint": fp, "source_fingerprint": source_fp, "features": client.meta["veil_features"],
              "compared_on": f"the users' images (test split), {len(users)} items",
              "against_pytorch": compare(model, client.run, users, batch_size)}
    if precision == "int8":
        result["calibration_images"] = len(pick)
    atomic_write_json(parity_path(out), result)
    p = result["against_pytorch"]
    what = "codes" if model.bits else "float16 features"
    log(f"wrote {out} ({size / 1e6:.2f} MB, {precision}, opset {OPSET}, {input_kind} input, {what} {'x'.join(map(str, client.meta['veil_features']['shape']))}) "
        f"in {seconds:.1f}s; fingerprint {fp[:12]}")
    line = f"against PyTorch on {p['items']} users' images: {p['items_equal']} items equal ({100 * p['items_equal_fraction']:.2f}%), " \
           f"{p['values_differ']} of {p['values']} values differ"
    if "values_differ_on_boundary" in p:
        line += f" ({p['values_differ_on_boundary']} on a rounding boundary)"
    if "max_abs_difference" in p:
        line += f" beyond the tolerance ({p['values_exactly_equal']} bit for bit equal, largest difference {p['max_abs_difference']:.2e})"
    log(line + f"; {parity_path(out)}")
    return result
