"""The defence registry: every defence Veil trains, sweeps, reports and attacks.

    adversarial  Algorithm 1 (the paper), the default
    nopeek       cross-entropy + alpha * distance correlation(images, features) (NoPeek, 2020)
    noise        Gaussian noise of scale sigma on the feature maps, a layer of the obfuscator
    none         the pretrained split: the ceiling
    reid         Algorithm 1's rounds with a privacy term aimed at re-identification, floored at chance
    pool         Algorithm 1's rounds against the strongest of a pool of reconstructors, a term that stops at the floor
    classfloor   Algorithm 1's rounds with a privacy term floored at the mean image of each image's class
    vib          a variational information bottleneck: unit Gaussian noise on f's output, cross-entropy + beta * KL

A defence is one module declaring a `Defence` (defence.py: its name, strength key and label, the
phases of a round, its privacy term, a layer it adds to the obfuscator) and one entry below.
Training (train.plan and the phase loop), `veil sweep`, `veil report`, the CLI and the attack read
it from here. Every defence starts from the same pretrained obfuscator+classifier (the
`undefended` checkpoint) and then trains for t_main rounds of t_sub epochs per phase, so all are
compared at the same budget.
"""

from __future__ import annotations

from torch import nn

from veil.defences import adversarial, classfloor, noise, none, nopeek, pool, reid, vib
from veil.defences.defence import FINAL, PHASE_A, PHASE_B, PHASE_C, PRETRAIN, RECONSTRUCTOR_PHASES, WARMUP, Defence, Penalty
from veil.defences.noise import GaussianNoise, set_noise
from veil.defences.nopeek import distance_correlation
from veil.errors import ConfigError

DEFENCES: dict[str, Defence] = {
    "adversarial": adversarial.DEFENCE,
    "nopeek": nopeek.DEFENCE,
    "noise": noise.DEFENCE,
    "none": none.DEFENCE,
    "reid": reid.DEFENCE,
    "pool": pool.DEFENCE,
    "classfloor": classfloor.DEFENCE,
    "vib": vib.DEFENCE,
}


def get_defence(name: str) -> Defence:
    if name not in DEFENCES:
        raise ConfigError(f"unknown defence '{name}'; valid: {', '.join(DEFENCES)}")
    return DEFENCES[name]


def strength_of(cfg: object) -> float:
    """The strength of the run's defence (0 for a defence without one)."""
    d = get_defence(cfg.train.defence)
    return float(cfg.get(d.strength_key)) if d.strength_key else 0.0


def strength_overrides(name: str, strength: float) -> list[str]:
    """KEY=VALUE overrides that make a config run defence `name` at `strength` (a sweep point)."""
    d = get_defence(name)
    return [f"train.defence={name}"] + ([f"{d.strength_key}={strength!r}"] if d.strength_key else [])


def describe(cfg: object) -> str:
    """'λ=0.1', 'NoPeek α=2', 'noise σ=0.5', 'none': the run's defence in a label."""
    d = get_defence(cfg.train.defence)
    if not d.strength_key:
        return d.title or d.name
    value = f"{d.symbol or d.strength_label}={strength_of(cfg):g}"
    return f"{d.title} {value}" if d.title else value


def point_symbol(name: str) -> str:
    """The strength's symbol for plot labels ('λ'), or its label, or 'strength' for an unknown defence;
    '' for a defence without a strength (none)."""
    d = DEFENCES.get(name)
    return ((d.symbol or d.strength_label) if d.strength_key else "") if d else "strength"


def strength_label(name: str) -> str:
    """The strength's name ('lambda') for point names and tables; 'strength' for an unknown defence."""
    d = DEFENCES.get(name)
    return d.strength_label if d else "strength"


def obfuscator_layer(cfg: object) -> nn.Module | None:
    """The layer the run's defence appends to the obfuscator, if any."""
    d = get_defence(cfg.train.defence)
    return d.layer() if d.layer else None


def round_phases() -> set[str]:
    """Every phase name that ends a round under some defence (Table 2 counts rounds by them)."""
    return {p for d in DEFENCES.values() for p in d.round_phases}


__all__ = [
    "PRETRAIN", "WARMUP", "PHASE_A", "PHASE_B", "PHASE_C", "FINAL", "RECONSTRUCTOR_PHASES", "Penalty",
    "DEFENCES", "Defence", "get_defence", "GaussianNoise", "set_noise", "distance_correlation", "strength_of", "strength_overrides", "describe", "obfuscator_layer", "round_phases",
]
