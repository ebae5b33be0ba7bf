"""Failures stay with their session: a model's batched step does each session's own share of the
work (sampling with its options, routing its ids, decoding its audio) inside ``isolate``, so an
exception there ends that session alone (its ``error`` and ``done``) while the step goes on for
the others; ``admit_each`` does the same for a batched start. The schedulers (zoo.core.scheduler)
then hand that error to that session's client only."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, TypeVar

log = logging.getLogger("zoo.sessions")


class Failable(Protocol):
    """What ``isolate`` marks: a job, or the per-session state a model's engine steps."""

    done: bool
    error: Exception | None


@contextlib.contextmanager
def isolate(session: Failable) -> Iterator[None]:
    """Run one session's share of a batched step: an exception ends that session only (recorded
    in ``session.error``, ``session.done`` set, logged) and is not raised, so the caller goes on
    with the next session. The caller skips, or feeds a placeholder for, a failed session."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - reported to that session only
        log.exception("one session failed; the others in its batch go on")
        if session.error is None:
            session.error = err
        session.done = True


F = TypeVar("F", bound=Failable)


def admit_each(sessions: Sequence[F], admit: Callable[[F], None]) -> list[F]:
    """The sessions ``admit`` accepted, in order; one it raises for ends alone (``isolate``): a
    batched start (``start_many``) goes on with the others."""
    admitted = []
    for session in sessions:
        with isolate(session):
            admit(session)
            admitted.append(session)
    return admitted
