"""Ctrl-C and SIGTERM during training: finish the iteration, save a resumable checkpoint, stop.

``StopSignals`` is a context manager around ``Trainer.fit``: inside it (in the main thread) SIGINT and SIGTERM only
record the request, which the loop checks after each iteration, and a long Langevin chain between its chunks (the
iteration is then abandoned and redone on resume; ``LangevinSampler.stop_check``); a second signal raises
``KeyboardInterrupt`` at once (the last checkpoint stays valid). ``request(signum)`` does the same from code. The
previous handlers come back on exit.
"""

from __future__ import annotations

import signal
import threading

__all__ = ["StopSignals"]


class StopSignals:
    def __init__(self):
        self.signum: int | None = None
        self._previous: dict | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def request(self, signum: int = signal.SIGINT) -> None:
        self.signum = int(signum)

    def _handler(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now, the last checkpoint stays valid
            raise KeyboardInterrupt
        self.signum = signum
        from tqdm.auto import tqdm

        tqdm.write(
            f"[ebmfast] {signal.Signals(signum).name}: finishing this iteration (a long chain stops at its next "
            "chunk and the iteration is redone on resume), then saving a resumable checkpoint (signal again to stop "
            "at once)"
        )

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in (self._previous or {}).items():
            signal.signal(sig, handler)
        self._previous = None
