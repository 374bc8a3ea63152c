"""The Chosen Image Attack: fresh attackers against a frozen obfuscator, scored beside floor and ceiling.

    settings.py   AttackConfig: every `veil attack` flag, checked once
    attackers.py  the attacker's own data and fitting a fresh learned attacker until its held-out PSNR stops improving
    whitebox.py   the white-box inversion: an image optimised so that f(image) matches the stored map
    scoring.py    PSNR, SSIM, re-identification, the constant-image and class floors, linkage
    harness.py    `veil attack` (a run, its ceiling, the files) and `--matrix` (Table 3)
    tables.py     attack.json / .csv / .md and the attackers' PNGs; the Table 3 matrix
    results.py    the vocabulary of attack.json and reading runs and matrices back (for tables, frontier, report)

It imports the training core and the leaves below it (models, defences, data, runtime, rundir, metrics,
plots), never the store, the report or the sweep.
"""

from veil.attack.harness import attack, attack_matrix
from veil.attack.scoring import class_floor_scores, score
from veil.attack.settings import AttackConfig

__all__ = ["AttackConfig", "attack", "attack_matrix", "class_floor_scores", "score"]
