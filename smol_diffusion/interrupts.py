"""Ctrl-C as a pause, not a loss: the training loop turns SIGINT (Ctrl-C, a notebook's
Interrupt) and SIGTERM (what a scheduler or `kill` sends) into KeyboardInterrupt, catches it,
and writes a checkpoint at the step it stopped at. Inside a `held()` section, where the
weights, optimizer, EMA and step counter change together, a signal waits for the section to
end, so the checkpoint never holds half an update."""
from __future__ import annotations

import contextlib
import signal
import threading


class Interrupts:
    """While entered (`enabled`, in the main thread; otherwise signals keep their handlers),
    SIGINT and SIGTERM raise KeyboardInterrupt, at once outside `held()` sections and at their
    end inside them."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool = True):
        self.enabled, self.depth, self.pending, self.previous = enabled, 0, False, {}

    def __enter__(self) -> Interrupts:
        if self.enabled and threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.depth:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self):
        """A section that a signal does not cut short: it raises when the section ends."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth and self.pending:
                self.pending = False
                raise KeyboardInterrupt
