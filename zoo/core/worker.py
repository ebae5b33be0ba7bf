"""What both schedulers (zoo.core.scheduler, zoo.core.duplex_scheduler) are built on: the one
worker thread that owns a stepper, and the refusal when every slot is taken."""
from __future__ import annotations

import threading


class Busy(Exception):
    """Every session slot (of replies, or of duplex sessions) is taken."""


class WorkerThread:
    """The one thread that owns a stepper: callers on other threads hand it work under ``_cv``
    and notify it; ``stop`` ends it between steps."""

    def __init__(self, name: str) -> None:
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=10)
