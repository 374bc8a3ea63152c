"""The attackers `veil attack --attackers NAME` can run: a decoder and how it is trained, or an inversion.

    simrec, urec1, urec2, resrec, unet   a decoder trained on the pixel loss (Eq. 3): models/reconstructors.attackers()
    consistency                          the U-Net, its pixel loss plus a term asking f(its image) to match the stored
                                         code (f frozen, gradients through it): images f maps back to the user's code
    adversarial                          the U-Net, its pixel loss plus a patch discriminator on the attacker's own
                                         images (discriminator.py): sharp, plausible images rather than the mean given the code
    decoder-inversion                    the white-box inversion (whitebox.py) started from the best decoder fitted before
                                         it in the same attack, and held near that decoder's image by a prior whose
                                         weight the attacker picks on its own held-out images (infinite: the decoder itself);
                                         it rebuilds every user, as the decoder does, so the two compare on the same users

A new attacker is one entry here: a decoder name with its terms' weights, or kind "inversion".
The weights are settings (AttackConfig.consistency_weight, adversarial_weight), read when the attack runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from veil.models.reconstructors import attackers as decoders

DECODER, INVERSION = "decoder", "inversion"


@dataclass(frozen=True)
class Attacker:
    kind: str = DECODER  # DECODER (trained on (f(I), I) pairs) | INVERSION (optimises images against f)
    decoder: str = ""  # the architecture of models/reconstructors.attackers() a DECODER trains
    consistency: bool = False  # add the consistency term |f(r(z)) - z|^2 / |z|^2 (in dB)
    adversarial: bool = False  # add the patch discriminator's loss


# Attackers beyond the plain decoders (each of models/reconstructors.attackers() is one under its own name).
EXTRA = {
    "consistency": Attacker(decoder="unet", consistency=True),
    "adversarial": Attacker(decoder="unet", adversarial=True),
    "decoder-inversion": Attacker(kind=INVERSION),
}


def registry() -> dict[str, Attacker]:
    """Every attacker by name: the plain decoders (read at call time, so a reconstructor added later is one) and EXTRA."""
    return {**{name: Attacker(decoder=name) for name in decoders()}, **EXTRA}


def get_attacker(name: str) -> Attacker:
    table = registry()
    if name not in table:
        raise ValueError(f"unknown attacker '{name}'; valid: {', '.join(table)}")
    return table[name]
