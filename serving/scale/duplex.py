"""Full duplex through Ray: ``RemoteDuplexHub`` is the DuplexScheduler port (``reserve`` /
``push`` / ``close``, ``max_sessions``, ``reserved``, ``prompt``) that serving/protocols/duplex.py
and hertz_reference.py drive, so ``/v1/duplex`` and ``/audio`` run unchanged in the front.

A duplex session lives on ONE model replica for its whole life (its caches are there): it is one
streaming call to the model deployment (``ModelReplica.duplex``), made at the session's first
frame to a replica with a free slot; the replica's answers stream back on that call as they are
made. The client's frames reach that same replica through a ``FrameBox``: one small async actor
per front replica, holding a queue per session, which the front pushes to and the session's
replica pulls from (Serve calls cannot stream input, and a second call could land on another
replica). A replica that dies ends its sessions with an error (close code 1011) and
``zoo_errors_total{kind="replica_lost"}``; a front that dies takes its box (and its sockets) along.
"""
from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Callable
from typing import Any

import ray

import zoo
from zoo.core.scheduler import Busy

from ..errors import report_failure, request_id
from ..metrics import Metrics


@ray.remote(num_cpus=0)
class FrameBox:
    """Input frames per session, front -> replica, in order. ``pull`` waits for at least one;
    None means the session closed (frames after that are dropped)."""

    def __init__(self) -> None:
        self.queues: dict[str, asyncio.Queue] = {}

    def _queue(self, sid: str) -> asyncio.Queue:
        return self.queues.setdefault(sid, asyncio.Queue())

    async def push(self, sid: str, frame) -> None:
        self._queue(sid).put_nowait(frame)

    async def close(self, sid: str) -> None:
        self._queue(sid).put_nowait(None)

    async def pull(self, sid: str) -> list | None:
        queue = self._queue(sid)
        items = [await queue.get()]
        while not queue.empty():
            items.append(queue.get_nowait())
        if any(item is None for item in items):  # (frames are arrays: no == here)
            self.queues.pop(sid, None)
            return None
        return items


class RemoteTicket:
    """The front's side of one session (DuplexTicket's fields that the protocols read and set)."""

    def __init__(self, number: int, options: Any, deliver: Callable[[Any], None]) -> None:
        self.number, self.options, self.prompt, self.deliver = number, options, None, deliver
        self.chunks = False  # set by the socket: frames come as Chunks with the step's text piece
        self.sid = f"duplex-{uuid.uuid4().hex}"
        self.task: asyncio.Task | None = None
        self.closed = False


class RemoteDuplexHub:
    """``handle``: the model's DeploymentHandle; ``slots``: duplex slots per replica;
    ``replicas``: () -> running replicas; ``box``: this front's FrameBox."""

    prompt = None  # no server-wide prompt through Ray: a client sends its own (session.update)

    def __init__(self, handle, name: str, slots: int, replicas: Callable[[], int], box, metrics: Metrics) -> None:
        self.handle, self.name, self.slots, self.replicas, self.box, self.metrics = (
            handle, name, slots, replicas, box, metrics)
        self.reserved = 0
        self._numbers = itertools.count(1)

    @property
    def max_sessions(self) -> int:
        return self.slots * self.replicas()

    def nbytes(self) -> int:
        return 0  # the caches are on the replicas

    def reserve(self, options: Any, deliver: Callable[[Any], None]) -> RemoteTicket:
        if self.reserved >= self.max_sessions:
            raise Busy(f"all {self.max_sessions} {self.name} duplex session slots are busy; retry shortly")
        self.reserved += 1
        return RemoteTicket(next(self._numbers), options, deliver)

    def push(self, ticket: RemoteTicket, frame) -> None:
        if ticket.closed:
            return
        if ticket.task is None:  # the first frame opens the session (options and prompt are final now)
            ticket.task = asyncio.get_running_loop().create_task(self._run(ticket, request_id.get()))
        self.box.push.remote(ticket.sid, frame)  # calls from one caller to an actor run in order

    def close(self, ticket: RemoteTicket) -> None:
        if ticket.closed:
            return
        ticket.closed = True
        self.reserved -= 1
        if ticket.task is not None:
            self.box.close.remote(ticket.sid)
            ticket.task.cancel()  # cancels the call: the replica closes the session and frees the slot

    async def _run(self, ticket: RemoteTicket, rid: str) -> None:
        items = self.handle.options(stream=True).duplex.remote(ticket.options, ticket.prompt, self.box, ticket.sid, rid,
                                                                 ticket.chunks)
        try:
            async for item in items:
                if item[0] == "frame":
                    ticket.deliver(item[1])
                elif item[0] == "refused":  # (refused, status, kind, message, headers): a race with the front's count
                    ticket.deliver(zoo.ZooError(f"{item[2]}: {item[3]}"))
                    return
                elif item[0] == "failed":  # (failed, message, is_input_error): logged on the replica
                    ticket.deliver(zoo.ZooError(item[1]) if item[2] else RuntimeError(item[1]))
                    return
            ticket.deliver(RuntimeError(f"the {self.name} replica ended the session"))
        except asyncio.CancelledError:
            items.cancel()
            raise
        except Exception as err:  # noqa: BLE001 - the replica died or Ray failed: the session fails visibly
            report_failure(self.metrics, "replica_lost",
                           f"{self.name}: the replica holding duplex session {ticket.number} failed: {err!r}")
            ticket.deliver(RuntimeError(f"the {self.name} replica holding this session was lost "
                                        f"({type(err).__name__}); reconnect"))
