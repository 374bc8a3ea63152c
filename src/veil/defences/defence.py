"""What a defence is made of: the phases of a round, a privacy term, a layer of the obfuscator.

The phase names are Algorithm 1's; training (train.py) runs them, a defence picks which of them
make up its rounds. A phase that is not one of (b) or (c) below trains f + g on
cross-entropy + strength * penalty, so a defence with its own phase name gets that for free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

PRETRAIN = "pretrain"  # f + g on cross-entropy (Algorithm 1, first pass)
WARMUP = "reconstructor_warmup"  # r on Eq. 3 against the undefended f
PHASE_A = "obfuscator_classifier"  # (a) f + g on CE + strength * penalty, r frozen
PHASE_B = "reconstructor"  # (b) r on Eq. 3, f frozen
PHASE_C = "obfuscator"  # (c) f on CE + strength * penalty, g and r frozen
FINAL = "reconstructor_final"  # r on Eq. 3 against the final f
RECONSTRUCTOR_PHASES = (WARMUP, PHASE_B, FINAL)

# (images N x C x H x W in [0, 1], features f(images), the training reconstructor[, labels N]) -> a scalar to minimise
Penalty = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Defence:
    name: str
    """The value of train.defence."""
    summary: str
    """What one round does, in a line (README, --help)."""
    strength_key: str | None = None
    """Dotted config key of the defence's strength (None: it has none)."""
    strength_label: str = "strength"
    """The strength's name in sweep point names (lambda-0.1) and tables."""
    symbol: str = ""
    """The strength's symbol in labels and plots (λ, α, σ)."""
    title: str = ""
    """Shown before the strength in labels ('NoPeek' -> 'NoPeek α=2'); '' shows the strength alone."""
    round_phases: tuple[str, ...] = ()
    """The phases one round runs, in order; () = no rounds (the pretrained split)."""
    penalty: Penalty | None = None
    """The privacy term weighed by the strength in the round's f + g and f phases."""
    penalty_metric: str = ""
    """metrics.jsonl key under which the penalty's epoch mean is logged."""
    penalty_uses_labels: bool = False
    """The penalty takes the batch's labels as a fourth argument (a class-aware privacy term)."""
    layer: Callable[[], nn.Module] | None = None
    """Builds a layer appended to the obfuscator, inactive until `start` (pretraining is undefended)."""
    start: Callable[[nn.Module, float], None] | None = None
    """(obfuscator, strength): called before each phase-epoch of a round that trains f (e.g. sets the noise scale)."""
