"""Ray on one machine, on loopback only: ``start_local_ray`` (server.py --replicas without
--ray-address, the tests, bench/load.py) and ``keep_on_loopback`` (called in each Serve replica).

Ray swaps a node address of 127.0.0.1 for the machine's own (so that other nodes could reach it)
unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``; with it, the GCS, raylet, workers and agents bind
and talk on 127.0.0.1. Serve's replicas also open an inter-deployment gRPC server on ``[::]:0``
whatever the node address; ``keep_on_loopback`` moves it to 127.0.0.1 in a loopback instance
(callers reach it at the node address, 127.0.0.1, either way).

``direct_ingress_env``: Serve's direct ingress, where the ingress replica (the front) serves HTTP
and WebSockets on its own socket instead of behind Serve's HTTP proxy, which saves the proxy's
hop each way and the body's pull from the proxy (docs/SCALING.md, "Added time");
``rebind_after_a_crash`` (called in the front replica) lets a new front take the port of a
killed one at once.
"""
from __future__ import annotations

import logging
import os

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
log = logging.getLogger("omni-zoo.scale")


def start_local_ray(num_cpus: int, *, loopback: bool = True, **kwargs):
    """A single-node Ray instance for this process (dashboard off). ``loopback``: every Ray
    process listens and connects on 127.0.0.1 only (nothing on the machine's own addresses)."""
    if loopback:
        os.environ[LOOPBACK_ENV] = "0"  # read by Ray at import, and inherited by every process it starts
        import ray._private.ray_constants as constants

        constants.ENABLE_RAY_CLUSTER = False  # in case Ray was imported before the variable was set
        kwargs["_node_ip_address"] = "127.0.0.1"
    import ray

    return ray.init(address="local", include_dashboard=False, num_cpus=num_cpus, **kwargs)


def direct_ingress_env(port: int) -> dict[str, str]:
    """The environment (read by Serve's controller and replicas when they start, so set before
    Ray starts) under which the ingress replica listens on exactly ``port``. Serve gives each
    direct-ingress replica a port from a range; a range of one port means one front replica per
    node (deploy.py runs one). Serve holds a dead replica's port out of the pool for a while
    (150 s in Ray 2.60) so that an HAProxy in front can forget it first; there is none here, and
    the front that replaces a dead one must have the same port at once, so no quarantine."""
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1), "RAY_SERVE_PORT_QUARANTINE_S": "0"}


def rebind_after_a_crash() -> None:
    """In the front replica under direct ingress: its listening socket gets SO_REUSEADDR and
    SO_REUSEPORT (Serve's helper for that, which its proxy uses). Serve 2.60 binds a
    direct-ingress socket without them; then a front that replaces a killed one cannot bind the
    port while the dead one's connections linger in TIME_WAIT (60 s), and Serve bars the port for
    good after that one failure: the address would stay dead."""
    if os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "1":
        _wrap_replica_function("start_asgi_http_server", "let the front rebind its port after a crash",
                               lambda original: _async_with(original, enable_so_reuseport=True))


def keep_on_loopback() -> None:
    """In a Serve replica of a loopback instance: its inter-deployment gRPC server (opened after
    the deployment's constructor) listens on 127.0.0.1 rather than every interface."""
    if os.environ.get(LOOPBACK_ENV) == "0":
        _wrap_replica_function(
            "add_port_to_grpc_server", "keep the Serve replica's gRPC server on loopback",
            lambda original: lambda server, address: original(server, address.replace("[::]:", "127.0.0.1:", 1)))


def _async_with(original, **forced):
    async def call(*args, **kwargs):
        return await original(*args, **{**kwargs, **forced})
    return call


def _wrap_replica_function(name: str, purpose: str, wrap) -> None:
    """Replace ``name`` in Serve's replica module (its private internals: Ray 2.60) by
    ``wrap(original)``, once per process; on another Ray without it, Serve's own behaviour stays
    and the log says what could not be done."""
    try:
        from ray.serve._private import replica as internals

        original = getattr(internals, name)
    except (ImportError, AttributeError):
        log.warning("could not %s (Ray %s)", purpose, _ray_version())
        return
    if getattr(original, "wrapped_by_omni_zoo", False):
        return
    wrapped = wrap(original)
    wrapped.wrapped_by_omni_zoo = True
    setattr(internals, name, wrapped)


def _ray_version() -> str:
    import ray

    return ray.__version__
