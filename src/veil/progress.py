"""Progress bars: one look for every loop that shows one (training phases, attackers, store classifiers)."""

from __future__ import annotations

from tqdm.auto import tqdm


def progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    """A bar of `total` steps that clears itself when done; `enabled=False` shows nothing."""
    return tqdm(total=total, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True)
