"""Ctrl-C as a pause, not a loss: the training loop turns SIGINT (Ctrl-C, a notebook's
Interrupt) and SIGTERM (what a scheduler, torchrun or `kill` sends) into a stop at a step
boundary, and writes a checkpoint there. Inside a `held()` section, where the weights,
optimizer, EMA and step counter change together, a signal waits for the section to end, so the
checkpoint never holds half an update."""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Interrupts:
    """While entered (in the main thread; elsewhere signals keep their handlers), SIGINT and
    SIGTERM set `pending`. With `at_once` (one process) they also raise KeyboardInterrupt: at
    once outside `held()` sections, at their end inside them. Several processes must stop at
    the same step, so there the training loop shares `pending` at its next loss reading."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, at_once: bool = True):
        self.at_once, self.depth, self.pending, self.previous = at_once, 0, False, {}
        self.torn = False  # a held section ended in an error: what it guards may be half-changed

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        self.pending = True
        if self.at_once and not self.depth:
            self.pending = False
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """A section that a signal does not cut short: it raises when the section ends."""
        self.depth += 1
        try:
            yield
        except BaseException:
            self.torn = True
            raise
        finally:
            self.depth -= 1
        if self.at_once and not self.depth and self.pending:
            self.pending = False
            raise KeyboardInterrupt
