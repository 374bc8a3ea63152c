"""The client's cost: export size and images/s, onnxruntime against PyTorch eager, on 1 and 2 threads.

    python benchmarks/client_speed.py [--images 2000] [--out client_speed.json]

For the paper's cut (split 2, float16 features) and the private configuration (split 5, a learned projection to
16 channels, 2-bit codes), each at width 0.25 and 1.0: an obfuscator with seeded random weights (speed does not
depend on what it learned) is exported as `veil export` does (ClientModel, fp32) and as an int8 client (calibrated
on 256 of the bundled demo images), and each is timed on the bundled demo images (uint8 in, what the store keeps
out), in batches of 250, after one warm-up batch: PyTorch eager (torch.set_num_threads(T), inference mode) and
onnxruntime (intra-op threads T). The best of three passes over the images is kept (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import onnxruntime as ort
import torch

from veil.client import int8
from veil.client.model import ClientModel
from veil.client.onnxfile import INPUT, OUTPUT, to_onnx
from veil.data import read_npz, to_tensor_images
from veil.models.obfuscator import Obfuscator

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"paper cut": dict(split=2), "private": dict(split=5, bottleneck="learned", channels=16, bits=2)}
BATCH = 250


def best_rate(run, images: torch.Tensor, passes: int = 3) -> float:
    run(images[:BATCH])  # warm-up
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        for s in range(0, len(images), BATCH):
            run(images[s : s + BATCH])
        best = min(best, time.perf_counter() - t0)
    return len(images) / best


def session(proto, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--out", default="")
    args = p.parse_args()
    images, _, _ = read_npz(ROOT / "demo" / "cifar10-2k.npz")
    images = to_tensor_images(images, 32, "demo")[: args.images]
    rows = []
    for name, kw in CONFIGS.items():
        for width in (0.25, 1.0):
            torch.manual_seed(0)
            model = ClientModel(Obfuscator(3, width, **kw).eval())
            fp32 = to_onnx(model, 3, 32)
            q = int8.quantise(fp32, images[:256], uint8_input=True)
            row = {"config": name, "width": width, "fp32_bytes": len(fp32.SerializeToString()), "int8_bytes": len(q.SerializeToString())}
            for threads in (1, 2):
                torch.set_num_threads(threads)
                with torch.inference_mode():
                    row[f"pytorch_{threads}"] = best_rate(model, images)
                for which, proto in (("onnx", fp32), ("int8", q)):
                    s = session(proto, threads)
                    row[f"{which}_{threads}"] = best_rate(lambda x, s=s: s.run([OUTPUT], {INPUT: x.numpy()}), images)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| obfuscator | width | fp32 file | int8 file | threads | PyTorch eager | onnxruntime fp32 | ratio | onnxruntime int8 | ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        for t in (1, 2):
            print(f"| {r['config']} | {r['width']} | {r['fp32_bytes'] / 1e6:.2f} MB | {r['int8_bytes'] / 1e6:.2f} MB | {t} | {r[f'pytorch_{t}']:,.0f} | "
                  f"{r[f'onnx_{t}']:,.0f} | {r[f'onnx_{t}'] / r[f'pytorch_{t}']:.2f}x | {r[f'int8_{t}']:,.0f} | {r[f'int8_{t}'] / r[f'pytorch_{t}']:.2f}x |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
