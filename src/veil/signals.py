"""SIGTERM / Ctrl-C noted, not obeyed at once: training and every change of a store stop at their next safe
point (a saved phase-epoch, a listed shard), so what a signal leaves is always whole; a second signal stops
at once (KeyboardInterrupt)."""

from __future__ import annotations

import signal
import sys


class StopSignals:
    """`with StopSignals("after this phase-epoch is saved") as stop:` ... `if stop.requested: ...`; `signum`
    is the signal that asked. Outside the main thread signals stay as they were."""

    def __init__(self, when: str = "at the next safe point") -> None:
        self.when = when
        self.signum = 0
        self._old: dict = {}

    @property
    def requested(self) -> bool:
        return bool(self.signum)

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ANN001
        if self.signum:  # a second signal stops at once
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nveil: signal {signum} received; stopping {self.when} (send again to stop now)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        for sig, old in self._old.items():
            signal.signal(sig, old)
