"""No defence: the pretrained split, the undefended ceiling every other defence is measured against."""

from veil.defences.defence import Defence

DEFENCE = Defence(name="none", summary="no rounds: the pretrained split, the ceiling")
