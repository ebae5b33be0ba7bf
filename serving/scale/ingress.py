"""``Ingress``: the Serve ingress deployment. It takes every request and WebSocket, on its own
socket (Serve's direct ingress, server.py's default on a local instance) or from Serve's HTTP
proxy; it builds the front (front.py) at replica start from the model deployments' handles,
so the routes, protocols and security are the single-process server's own code.

A WebSocket session (``/v1/realtime``) lives on the ingress replica that accepted it for its
whole life (one connection, to one front), together with its conversation state (buffer, VAD,
history); each turn's reply is one streaming call to a model replica that has a free slot, with
the history passed along, so no model replica holds session state between turns and a replica
lost between turns costs the session nothing.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from prometheus_client import Counter, Histogram
from ray import serve

from ..app import create_app
from ..http_input import READ_TIMEOUT_S
from ..metrics import Metrics
from ..protocols.chat import MAX_BODY_BYTES
from ..protocols.duplex import DuplexSettings
from ..protocols.hertz_reference import ReferenceSettings
from ..protocols.realtime import IDLE_TIMEOUT_S
from ..security import AccessSettings
from .duplex import FrameBox, RemoteDuplexHub
from .front import ModelRouter, guarded, shared_app
from .local import keep_on_loopback, rebind_after_a_crash
from .remote import RemoteService

log = logging.getLogger("omni-zoo.ingress")
STATUS_TTL_S = 1.0  # /health and the capacity check read the controller at most this often
STATUS_TIMEOUT_S = 5.0
DISPATCH_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclasses.dataclass
class FrontSettings:
    """The single-process server's front settings (server.py flags), carried to every ingress replica."""

    app_name: str = "omni-zoo"
    access: AccessSettings = dataclasses.field(default_factory=AccessSettings)
    max_body_bytes: int = MAX_BODY_BYTES
    read_timeout: float = READ_TIMEOUT_S
    realtime_idle_s: float = IDLE_TIMEOUT_S
    duplex: DuplexSettings = dataclasses.field(default_factory=DuplexSettings)
    reference: ReferenceSettings = dataclasses.field(default_factory=ReferenceSettings)


@serve.ingress()
class Ingress:
    """``models``: model name -> its deployment (a handle once Serve runs it), in command-line order."""

    def __init__(self, models: dict, settings: FrontSettings) -> None:
        keep_on_loopback()
        rebind_after_a_crash()
        self.handles, self.settings = models, settings
        self.states: dict[str, dict[str, int]] = {}
        self.states_at = -float("inf")
        self.states_lock = asyncio.Lock()
        self.box = None  # this front's FrameBox, made when a model is duplex

    async def __serve_build_asgi_app__(self):
        s, metrics = self.settings, Metrics()
        per_replica = Counter("zoo_replica_replies_total", "replies started, by model and replica",
                              ["model", "replica"], registry=metrics.registry)
        dispatch = Histogram("zoo_replica_dispatch_seconds", "a reply's call to a model replica: sent -> the "
                             "replica's first item (routing, Ray's call, the replica's event loop), by model",
                             ["model"], buckets=DISPATCH_BUCKETS, registry=metrics.registry)
        services = {}
        for name, handle in self.handles.items():
            info = await handle.info.remote()
            services[name] = RemoteService(handle, info, metrics, replicas=lambda n=name: self.running(n),
                                           per_replica=per_replica, dispatch=dispatch.labels(name))
            if info.get("duplex_sessions"):  # duplex sessions, each held on one replica (duplex.py)
                if self.box is None:
                    self.box = FrameBox.remote()
                services[name].duplex = RemoteDuplexHub(handle, name, info["duplex_sessions"],
                                                        lambda n=name: self.running(n), self.box, metrics)
        apps = {name: create_app(service, s.max_body_bytes, s.duplex, read_timeout=s.read_timeout,
                                 realtime_idle_s=s.realtime_idle_s, reference_settings=s.reference, guarded=False)
                for name, service in services.items()}
        router = ModelRouter(apps, shared_app(services, metrics, self.replica_states), metrics,
                             s.max_body_bytes, s.read_timeout)
        await self.replica_states()
        self.poller = asyncio.get_running_loop().create_task(self.poll())  # capacity follows the replica count
        gate, self.sockets = guarded(router, s.access, metrics)
        log.info("front ready for %s", ", ".join(services))
        return gate

    async def poll(self) -> None:
        while True:
            await asyncio.sleep(STATUS_TTL_S)
            await self.replica_states()

    def running(self, name: str) -> int:
        return self.states.get(name, {}).get("RUNNING", 0)

    async def replica_states(self) -> dict[str, dict[str, int]]:
        """{model: {replica state: count}} from the Serve controller, cached for STATUS_TTL_S."""
        async with self.states_lock:
            if time.monotonic() - self.states_at > STATUS_TTL_S:
                try:
                    status = await asyncio.wait_for(asyncio.to_thread(serve.status), STATUS_TIMEOUT_S)
                    deployments = status.applications[self.settings.app_name].deployments
                    self.states = {name: {getattr(k, "value", str(k)): n for k, n in deployments[name].replica_states.items()}
                                   for name in self.handles if name in deployments}
                except Exception as err:  # noqa: BLE001 - /health must answer; the last known states stay
                    log.warning("could not read the replica states from the Serve controller: %r", err)
                self.states_at = time.monotonic()
            return self.states
