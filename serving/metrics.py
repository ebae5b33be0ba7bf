"""The server's Prometheus metrics, one registry per Service (``GET /metrics``)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes and friends
        self.sessions_active = Gauge("zoo_sessions_active", "replies being generated or prepared", registry=r)
        self.sessions_total = Counter("zoo_sessions_total", "replies accepted", registry=r)
        self.ttfa = Histogram("zoo_ttfa_seconds", "request complete -> first audio", registry=r,
                              buckets=(0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2, 5, 10, 30))
        self.rtf = Histogram("zoo_rtf", "compute time / audio time per reply", registry=r,
                             buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 5, 10))
        self.errors = Counter("zoo_errors_total", "refused or failed requests, by kind", ["kind"], registry=r)
        self.stopped = Counter("zoo_replies_stopped_total",
                               "replies stopped before their end (client gone, cancel, barge-in)", registry=r)
        # full-duplex sessions
        self.duplex_sessions_active = Gauge("zoo_duplex_sessions_active", "duplex sessions connected", registry=r)
        self.duplex_sessions_total = Counter("zoo_duplex_sessions_total", "duplex sessions accepted", registry=r)
        self.duplex_step_seconds = Histogram("zoo_duplex_step_seconds", "one batched duplex step (all sessions in it)",
                                             registry=r, buckets=(0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.125,
                                                                  0.15, 0.2, 0.3, 0.5, 1, 2))
        self.duplex_batch_size = Histogram("zoo_duplex_batch_size", "sessions stepped together per duplex step",
                                           registry=r, buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64))
        self.duplex_frames = Counter("zoo_duplex_frames_total", "duplex input frames stepped", registry=r)
        self.duplex_dropped = Counter("zoo_duplex_frames_dropped_total",
                                      "duplex input frames dropped (client over its backlog)", registry=r)
        self.duplex_frame_latency = Histogram("zoo_duplex_frame_latency_seconds",
                                              "duplex input frame received -> its answer sent", registry=r,
                                              buckets=(0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2, 5))

    def duplex_step(self, seconds: float, sessions: int, answered: int) -> None:
        """One successful batched duplex step (DuplexScheduler's ``on_step``)."""
        self.duplex_step_seconds.observe(seconds)
        self.duplex_batch_size.observe(sessions)
        self.duplex_frames.inc(answered)
