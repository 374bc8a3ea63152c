"""Flip test-time augmentation on finished runs: test accuracy of the newest weights without and with
the mirror image's logits added (train.test_flip), on the run's own test split.

    VEIL_DATA_DIR=<data> python benchmarks/flip_tta.py RUN [RUN ...]
"""

from __future__ import annotations

import sys

from veil.data import load_splits
from veil.rundir import load_run
from veil.train import evaluate


def main(run_dirs: list[str]) -> None:
    for d in run_dirs:
        run = load_run(d)
        test = load_splits(run.config.data, run.config.seed).test
        nets = {"obfuscator": run.obfuscator, "classifier": run.classifier, "reconstructor": run.reconstructor}
        plain = evaluate(nets, test, 500, with_reconstructor=False)["test_accuracy"]
        flip = evaluate(nets, test, 500, with_reconstructor=False, flip=True)["test_accuracy"]
        print(f"{d}: step {run.step}, {len(test)} test images, plain {plain:.2%}, flip TTA {flip:.2%}, gain {100 * (flip - plain):+.2f} points", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
