"""From what the operator asked (models, replica counts, autoscaling bounds, GPUs) to a Serve
application: one ModelReplica deployment per model (named after the model) and the Ingress in
front of them.

Capacity is the model's session slots: ``max_ongoing_requests`` = ``max_sessions``, so Serve only
routes a reply to a replica with a free slot. "All full" is answered 503 busy at once by the front
(remote.py: its replies in flight against running replicas x slots), as in the single-process
server. Serve's own caller queue (``max_queued_requests``) holds the replies that wait for the
router to pick a replica: a burst waits there while the router learns the replicas' loads (its view
lags by a probe), so it is as large as the deployment's slots (max_sessions x the most replicas) and
never refuses what the front admitted (a queue of max_sessions refused 8 of a burst of 16 on
2 x 8 slots); with several front replicas (whose counts are each their own) it bounds the wait
before Serve answers busy itself. Autoscaling (``min_replicas`` < ``max_replicas``)
follows the ongoing replies per replica, aiming at ``AUTOSCALE_TARGET`` of the slots.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ray import serve

from zoo.core.admission import PREFILL_POSITIONS

from .ingress import FrontSettings, Ingress
from .replica import ModelReplica

AUTOSCALE_TARGET = 0.7  # scale up when replicas run above 70% of their slots on average
INGRESS_CPUS = 0.5


@dataclasses.dataclass
class ModelSpec:
    """One model's deployment. ``model_args``: the zoo/cli.py model flags (model, tiny,
    random_full, device, dtype, components) as a dict."""

    model_args: dict[str, Any]
    max_sessions: int = 16
    seed: int = 0
    prefill_batch: int = 8
    prefill_positions: int | None = PREFILL_POSITIONS  # None: no bound (server.py --prefill-positions 0)
    duplex_sessions: int = 0  # duplex slots per replica (duplex models; each session holds one call)
    replicas: int = 1
    min_replicas: int | None = None  # with max_replicas: autoscaling between them
    max_replicas: int | None = None
    num_gpus: float = 0
    num_cpus: float = 1

    @property
    def name(self) -> str:
        return self.model_args["model"]

    def options(self) -> dict[str, Any]:
        scaling: dict[str, Any] = {"num_replicas": self.replicas}
        if self.min_replicas is not None or self.max_replicas is not None:
            low = self.min_replicas if self.min_replicas is not None else 1
            high = self.max_replicas if self.max_replicas is not None else max(low, self.replicas)
            if not 0 <= low <= high or high < 1:
                raise ValueError(f"{self.name}: need 0 <= min_replicas <= max_replicas, max_replicas >= 1; got {low}, {high}")
            scaling = {"autoscaling_config": {
                "min_replicas": low, "max_replicas": high, "initial_replicas": min(max(self.replicas, low), high),
                "target_ongoing_requests": max(1.0, AUTOSCALE_TARGET * self.max_sessions)}}
        most = max(self.replicas, self.max_replicas or 0)
        calls = self.max_sessions + self.duplex_sessions  # a reply or a duplex session: one call each
        return {"name": self.name, "max_ongoing_requests": calls, "max_queued_requests": calls * most,
                "ray_actor_options": {"num_gpus": self.num_gpus, "num_cpus": self.num_cpus}, **scaling}


def parse_replicas(text: str, names: list[str], default: int | None = 1) -> dict[str, int]:
    """``"2"`` (every model) or ``"first=4,second=2"`` (models left out get ``default``;
    None: they are left out of the answer too)."""
    if "=" not in text:
        return dict.fromkeys(names, _count(text))
    counts = dict.fromkeys(names, default)
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in counts:
            raise ValueError(f"--replicas names {name.strip()!r}, which is not among --model {','.join(names)}")
        counts[name.strip()] = _count(value)
    return {name: n for name, n in counts.items() if n is not None}


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"a replica count must be a whole number, got {text!r}") from None
    if value < 1:
        raise ValueError(f"a replica count must be at least 1, got {value}")
    return value


def build(specs: list[ModelSpec], front: FrontSettings, ingress_replicas: int = 1):
    """The Serve application: run it with ``serve.run(app, name=front.app_name, route_prefix="/")``."""
    if not specs:
        raise ValueError("no model to serve")
    models = {spec.name: serve.deployment(ModelReplica).options(**spec.options()).bind(dataclasses.asdict(spec))
              for spec in specs}
    ingress = serve.deployment(Ingress).options(
        name="front", num_replicas=ingress_replicas, max_ongoing_requests=front.access.max_connections,
        ray_actor_options={"num_cpus": INGRESS_CPUS})
    return ingress.bind(models, front)
