"""Veil: privacy-preserving image classification with a learnable obfuscator.

    import veil
    run = veil.load_run("runs/demo/paper-cut")
    features = run.obfuscator(images)          # N x 3 x 32 x 32 in [0, 1] -> N x 128w x 8 x 8
    logits = run.classifier(features)

    store = veil.open_store("stores/c10-train")   # a feature store as a torch Dataset: (features, label)
"""

from veil.config import Config, ConfigError  # noqa: E402
from veil.data import DataError, ImageSet, Splits, load_splits  # noqa: E402
from veil.errors import StoreError, TrainingError  # noqa: E402
from veil.io import CheckpointError  # noqa: E402
from veil.metrics import psnr, ssim  # noqa: E402
from veil.models import RECONSTRUCTORS, Classifier, Obfuscator, build_networks, build_reconstructor  # noqa: E402
from veil.rundir import Run, load_run  # noqa: E402
from veil.store.dataset import ShardShuffle, StoreDataset, open_store  # noqa: E402
from veil.train import Stopped, train  # noqa: E402
from veil.version import __version__  # noqa: E402

__all__ = [
    "Config", "ConfigError", "DataError", "ImageSet", "Splits", "load_splits", "CheckpointError", "psnr", "ssim",
    "RECONSTRUCTORS", "Classifier", "Obfuscator", "build_networks", "build_reconstructor", "Run", "load_run",
    "Stopped", "TrainingError", "train", "__version__", "StoreError", "StoreDataset", "ShardShuffle", "open_store",
]
