"""The attack's settings: `AttackConfig` (every field is a `veil attack` flag), checked once."""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

from veil.attack.registry import INVERSION, registry
from veil.config import PRECISIONS
from veil.errors import ConfigError
from veil.runtime import OFF, ON

# ----------------------------------------------------------------------------- settings


@dataclass
class AttackConfig:
    attackers: str = "simrec,resrec,unet,decoder-inversion"
    """Attackers to train from scratch, comma-separated (attack/registry.py): Table 1's simrec, urec1, urec2, resrec, unet
    (a U-Net decoder), consistency (the U-Net asked to draw images f maps back to the code), adversarial (the U-Net with a
    patch discriminator) and decoder-inversion (the white-box inversion started from the best decoder listed before it).
    The default leaves out URec#1 and #2: measured, they were never the strongest and cost the most (docs/benchmarks.md);
    it includes decoder-inversion, measured the strongest by PSNR and SSIM at the paper's cut, defended and undefended, for
    at most twice the time (docs/results.md); give simrec,urec1,urec2,resrec for the paper's Table 3."""
    consistency_weight: float = 1.0
    """The consistency attacker's weight on 10 log10(|f(its image) - z|^2 / |z|^2), in dB per dB of PSNR."""
    adversarial_weight: float = 0.1
    """The adversarial attacker's weight on its patch discriminator's loss (nats per patch), in dB of PSNR per nat."""
    prior_weights: str = "0,1,10,100,inf"
    """The decoder-started inversion's weights on mean((x - decoder's image)^2), comma-separated; the attacker keeps the
    one whose inversions of its own held-out images score the best PSNR (inf: the decoder's image unchanged)."""
    search: bool = False
    """Try each decoder at several learning rates and widths (search_lrs x search_widths, the default first) within
    search_seconds, keep the one with the best held-out PSNR (the attacker's own images); the grid is in attack.json."""
    search_lrs: str = "1,0.5,2"
    """The search's learning rates, as multiples of lr, comma-separated."""
    search_widths: str = "1,2"
    """The search's decoder widths, as multiples of the attacker's width, comma-separated."""
    search_seconds: float = 900.0
    """The search's budget per attacker and obfuscator: no new grid point is started once it is spent."""
    whitebox: bool = True
    """Also run the white-box attacker (optimise an image so that f(image) matches the stored features)."""
    undefended: bool = True
    """Also attack the run's undefended obfuscator (after pretraining): the ceiling beside each number."""
    ceiling: str = ""
    """Another run directory whose undefended obfuscator is the ceiling instead (e.g. the paper's cut, undefended,
    beside a deeper or narrower one); it must have been trained on the same images (data and seed)."""
    width: float = 0.0
    """Channel multiplier of the attack reconstructors (0 = the run's model.width)."""
    max_epochs: int = 40
    """Most epochs an attacker trains for (over the attacker-train images minus the held-out part): a cap that
    patience, not the cap, should end (measured: 14-24 epochs on reduced CIFAR-10); one it ends is marked (cap)."""
    patience: int = 3
    """Stop after this many epochs in a row without a new best held-out PSNR (any gain counts); the best weights are kept."""
    min_delta: float = 0.01
    """Held-out PSNR gain (dB) below which an epoch is a plateau for the learning rate (it is multiplied by lr_decay);
    it does not touch patience, so an attacker still gaining slowly trains on at a smaller step."""
    validation_fraction: float = 0.1
    """Fraction of the attacker-train images held out for early stopping."""
    lr: float = 2e-3
    """Adam learning rate of the attackers at the start."""
    lr_decay: float = 0.5
    """Multiply the learning rate by this after each epoch that gained less than min_delta (1 = constant)."""
    batch_size: int = 64
    """Images per attacker optimisation step."""
    eval_batch_size: int = 500
    """Images per forward pass when obfuscating, reconstructing and inverting."""
    augment: bool = False
    """Random crop/flip on attacker batches (off: features are computed once, which is ~2x faster; a random
    obfuscator, e.g. the noise defence, is applied afresh to every batch either way)."""
    linkage_max_draws: int = 256
    """Linkage against a random obfuscator (the noise defence): the attacker's template of each candidate is the mean
    of M draws of f(candidate), M doubled from 1 until one more doubling moves the top-1 rate by less than its
    standard error, or M reaches this; the M used is in attack.json."""
    copies: bool = True
    """Also link from changed copies of the users' pictures (flipped, shifted 2 pixels, JPEG at quality 50, 10% brighter:
    attack/copies.py), and score the reference stores (the image store, the label store and its logits variant) beside the obfuscators."""
    n_candidates: int = 100
    """Re-identification: candidates per reconstruction (the true user image and N-1 others at random)."""
    whitebox_images: int = 200
    """Users' images the white-box attacker inverts (the first ones of the test split; 0 = all)."""
    whitebox_steps: int = 200
    """Adam steps of the white-box inversion per image batch."""
    whitebox_lr: float = 0.05
    """Peak learning rate of the white-box inversion (on pixel values in [0, 1]), cosine-annealed to 0."""
    tv_weights: str = "0.1,1,10"
    """Total-variation prior weights to try, comma-separated; the white-box attacker keeps the one whose
    inversions of its own held-out images score the best PSNR (one value: no choice)."""
    n_show: int = 8
    """Users' images shown in each attacker's PNG (the first ones of the test split)."""
    seed: int = 0
    """Seed of the held-out split, attacker initialisation, batch order, candidate sets and a random obfuscator's draws."""
    device: str = "auto"
    """auto (cuda when available, else cpu) | cpu | cuda | cuda:N."""
    channels_last: str = "auto"
    """NHWC layout of the networks (auto | on | off; auto: on for CPU and CUDA, where it runs faster, as train.channels_last)."""
    precision: str = "auto"
    """auto | fp32 | bf16: bf16 autocast for the learned attackers' training and reconstructions (the decoders, the
    discriminator, f inside the consistency term); the stored features, the inversions and every score stay fp32.
    auto picks as train.precision does (bf16 on a CUDA device that has it, fp32 on a CPU); attack.json records the choice."""
    progress: bool = True
    """Show progress bars."""
    client: str = ""
    """A client file of this run (veil export, e.g. an int8 one): the defended obfuscator attacked is then the client,
    run by onnxruntime, so the attackers get what a store made on the device holds; the white-box inversion takes the
    gradients of the run's own obfuscator (the client's source). Results go to RUN/attack-<file name>/; CPU only."""
    allow_unfinished: bool = False
    """Attack a run whose training has not finished (its latest checkpoint); attack.json records the step."""


# Settings that change no number: a saved attack.json made with other values may be reused.
NOT_RESULTS = ("device", "channels_last", "progress", "allow_unfinished")


def result_settings(settings: AttackConfig | dict) -> dict:
    """The settings that change the numbers (all but NOT_RESULTS), from an AttackConfig or a saved attack.json's
    "settings": two attacks with equal ones may share their results."""
    # A setting added since a saved attack was made is at its default there (an attack.json stays reusable).
    values = dataclasses.asdict(settings) if isinstance(settings, AttackConfig) else {**dataclasses.asdict(AttackConfig()), **settings}
    return {k: v for k, v in values.items() if k not in NOT_RESULTS}


def attacker_names(s: AttackConfig) -> list[str]:
    return [name.strip() for name in s.attackers.split(",") if name.strip()]


def numbers(text: str) -> list[float]:
    """'0.1,1,inf' -> [0.1, 1.0, inf]; ValueError if one is not a number."""
    return [float(w) for w in text.split(",") if w.strip()]


def tv_weights(s: AttackConfig) -> list[float]:
    return numbers(s.tv_weights)


def search_grid(s: AttackConfig) -> list[tuple[float, float]]:
    """(lr multiple, width multiple) of every grid point, the default (1, 1) first."""
    grid = [(lr, w) for w in numbers(s.search_widths) for lr in numbers(s.search_lrs)]
    return sorted(set(grid), key=lambda p: (p != (1.0, 1.0), grid.index(p)))


def validate_attack(s: AttackConfig) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(f"attack settings: {msg}")

    names = attacker_names(s)
    valid = registry()
    unknown = [n for n in names if n not in valid]
    need(not unknown, f"unknown attacker(s) {', '.join(unknown)} in '{s.attackers}'; valid: {', '.join(valid)}")
    need(len(set(names)) == len(names), f"attackers lists a name twice: '{s.attackers}'")
    for i, n in enumerate(names):
        need(valid[n].kind != INVERSION or any(valid[m].kind != INVERSION for m in names[:i]),
             f"{n} starts from a decoder listed before it in attackers, got '{s.attackers}' (e.g. unet,{n})")
    try:
        priors, grid = numbers(s.prior_weights), search_grid(s)
    except ValueError:
        priors, grid = [], []
    need(bool(priors) and all(w >= 0 for w in priors), f"prior_weights must be comma-separated numbers >= 0 (or inf), got '{s.prior_weights}'")
    need(bool(grid) and all(0 < a < float("inf") and 0 < b < float("inf") for a, b in grid),
         f"search_lrs and search_widths must be comma-separated numbers > 0, got '{s.search_lrs}' and '{s.search_widths}'")
    need(s.search_seconds > 0, f"search_seconds must be > 0, got {s.search_seconds}")
    need(s.consistency_weight >= 0 and s.adversarial_weight >= 0,
         f"consistency_weight and adversarial_weight must be >= 0, got {s.consistency_weight} and {s.adversarial_weight}")
    need(bool(names) or s.whitebox, "no attacker to run: give --attackers or leave --whitebox on")
    need(s.width >= 0, f"width must be >= 0 (0 = the run's width), got {s.width}")
    need(s.max_epochs >= 1, f"max_epochs must be >= 1, got {s.max_epochs}")
    need(s.patience >= 1, f"patience must be >= 1, got {s.patience}")
    need(s.min_delta >= 0, f"min_delta must be >= 0, got {s.min_delta}")
    need(0 < s.validation_fraction < 1, f"validation_fraction must be in (0, 1), got {s.validation_fraction}")
    need(s.lr > 0 and s.whitebox_lr > 0, f"lr and whitebox_lr must be > 0, got {s.lr} and {s.whitebox_lr}")
    need(0 < s.lr_decay <= 1, f"lr_decay must be in (0, 1], got {s.lr_decay}")
    need(s.batch_size >= 2 and s.eval_batch_size >= 1, f"batch_size must be >= 2 and eval_batch_size >= 1, got {s.batch_size} and {s.eval_batch_size}")
    need(s.linkage_max_draws >= 1, f"linkage_max_draws must be >= 1, got {s.linkage_max_draws}")
    need(s.n_candidates >= 2, f"n_candidates must be >= 2, got {s.n_candidates}")
    need(s.whitebox_images >= 0 and s.whitebox_steps >= 1, f"whitebox_images must be >= 0 and whitebox_steps >= 1, got {s.whitebox_images} and {s.whitebox_steps}")
    try:
        weights = tv_weights(s)
    except ValueError:
        weights = []
    need(bool(weights) and all(w >= 0 for w in weights), f"tv_weights must be comma-separated numbers >= 0, got '{s.tv_weights}'")
    need(s.n_show >= 1, f"n_show must be >= 1, got {s.n_show}")
    need(0 <= s.seed < 2**32, f"seed must be in 0..2**32-1, got {s.seed}")  # numpy's generators take no other
    need(s.device == "auto" or s.device == "cpu" or s.device.startswith("cuda"), f"device must be auto, cpu or cuda[:N], got '{s.device}'")
    need(str(s.channels_last).lower() in ("auto", *ON, *OFF), f"channels_last must be auto, on or off, got '{s.channels_last}'")
    need(s.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got '{s.precision}'")


def resolve_settings(overrides: dict) -> AttackConfig:
    """Defaults with `overrides` (field name -> value) applied, validated."""
    names = {f.name for f in dataclasses.fields(AttackConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"attack settings: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    s = dataclasses.replace(AttackConfig(), **overrides)
    validate_attack(s)
    return s


def seed_for(seed: int, *names: str) -> int:
    """A stable seed per (seed, attacker): the same attacker starts alike against both obfuscators."""
    return (seed * 1_000_003 + zlib.crc32("/".join(names).encode()) % 1_000_003) % 2**63  # within torch.manual_seed's range
