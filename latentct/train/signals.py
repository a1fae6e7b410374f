"""Stop on SIGTERM / SIGINT: the handler only sets a flag; the training loop saves a checkpoint at the end of
the step, leaves, and the script exits with 128 + the signal number."""
from __future__ import annotations

import signal


class StopSignal:
    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def exit_if_stopped(self, step: int, total: int, is_main: bool = True) -> None:
        """After the loop: leave with 128 + signal when a signal stopped it before its last step (its checkpoint
        is saved). A signal that came during the last step's work (the final evaluation) lets the run finish and
        write its outputs: stopping then would throw the finished work away."""
        if self.received is None or step >= total:
            return
        if is_main:
            print(f"stopped by signal {self.received} after step {step}; checkpoint saved, rerun to continue")
        raise SystemExit(128 + self.received)
