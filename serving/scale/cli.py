"""``python server.py --replicas N [--ray-address ADDR] [--model a,b,...]``: the same server on
Ray Serve. Without ``--ray-address`` a local Ray instance is started (local.py: every Ray process
on 127.0.0.1 when ``--host`` is loopback, dashboard off); with it, the deployment joins that
cluster. The other server.py flags keep their meaning (security, limits, model flags; the component flags apply to
the first model).

Who listens on ``--host``/``--port``: in a local instance, the front replica itself (Serve's
direct ingress, local.py: no proxy hop in either direction); Serve still starts its HTTP proxy
on the head node in that mode, and it gets a spare port of ``--host`` that nobody is told about.
With ``--serve-proxy``, or ``--ray-address`` (a cluster's Serve settings are its own, fixed when
its nodes started), Serve's HTTP proxy listens there on every node it runs on.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import socket

from zoo.cli import DEFAULT_MODEL

from ..protocols.duplex import DuplexSettings
from ..protocols.hertz_reference import ReferenceSettings
from ..security import AccessSettings
from .local import direct_ingress_env, start_local_ray

log = logging.getLogger("omni-zoo.scale")
SCALE_FLAGS = ("--replicas", "--ray-address", "--min-replicas", "--max-replicas")


def requested(argv: list[str]) -> bool:
    """Whether the command line asks for the Ray deployment."""
    return any(a == f or a.startswith(f + "=") for a in argv for f in SCALE_FLAGS)


def add_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scale-out on Ray Serve (pip install '.[ray]'; docs/SCALING.md)")
    group.add_argument("--replicas", help="replicas per model: N, or NAME=N,NAME=N (--model may then list "
                                          "several models, comma-separated)")
    group.add_argument("--ray-address", help="join this Ray cluster (default: start a local one)")
    group.add_argument("--min-replicas", help="autoscaling lower bound: N or NAME=N,...")
    group.add_argument("--max-replicas", help="autoscaling upper bound: N or NAME=N,...")
    group.add_argument("--serve-proxy", action="store_true",
                       help="a local instance: clients reach the front through Serve's HTTP proxy (one hop more "
                            "each way) rather than the front listening on --port itself")
    group.add_argument("--cpus-per-replica", type=float, default=1.0,
                       help="CPUs Ray reserves for each model replica (scheduling only; default 1)")
    group.add_argument("--gpus-per-replica", type=float,
                       help="GPUs each model replica holds (default 1 when the cluster has GPUs, else 0)")


def split_models(argv: list[str]) -> tuple[list[str], list[str]]:
    """(model names of ``--model a,b``, argv with only the first name, for the one-model parser)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default=DEFAULT_MODEL)
    names = [n.strip() for n in pre.parse_known_args(argv)[0].model.split(",") if n.strip()]
    if len(names) < 2 and "," not in " ".join(argv):
        return names or [DEFAULT_MODEL], list(argv)  # one model: the parser reads (and checks) it as given
    out, skip = [], False
    for a in argv:
        if skip:
            out.append(names[0])
            skip = False
        elif a == "--model":
            out.append(a)
            skip = True
        elif a.startswith("--model="):
            out.append("--model=" + names[0])
        else:
            out.append(a)
    return names, out


def specs_from(args: argparse.Namespace, names: list[str], num_gpus: float):
    from zoo import card
    from zoo import names as known
    from zoo.cli import component_values

    from .deploy import ModelSpec, parse_replicas

    unknown = [n for n in names if n not in known()]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; choose from {known()}")
    counts = parse_replicas(args.replicas or "1", names)
    low = parse_replicas(args.min_replicas, names, None) if args.min_replicas else {}  # left out: no bound
    high = parse_replicas(args.max_replicas, names, None) if args.max_replicas else {}
    specs = []
    for i, name in enumerate(names):
        # the model flags only (never the API key); the component flags were parsed for the first model
        model_args = {"model": name, "tiny": args.tiny, "random_full": args.random_full, "device": args.device,
                      "dtype": args.dtype, **(component_values(args, card(name)) if i == 0 else {})}
        specs.append(ModelSpec(model_args=model_args, max_sessions=args.max_sessions, seed=args.seed,
                               prefill_batch=args.prefill_batch, prefill_positions=args.prefill_positions or None,
                               duplex_sessions=(args.duplex_sessions or args.max_sessions) if card(name).duplex else 0,
                               replicas=counts[name], min_replicas=low.get(name), max_replicas=high.get(name),
                               num_gpus=num_gpus, num_cpus=args.cpus_per_replica))
    return specs


def main(argv: list[str], parse_args) -> int:
    """``parse_args``: server.py's parser (its flags, this module's add_flags among them)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        import ray
        from ray import serve
    except ImportError:
        log.error("--replicas / --ray-address need Ray Serve: pip install '.[ray]'")
        return 2
    from server import is_loopback

    from .deploy import INGRESS_CPUS, build

    names, one_model_argv = split_models(argv)
    args = parse_args(one_model_argv)
    try:  # checked before Ray starts, with the GPU count settled afterwards
        specs = specs_from(args, names, 0)
    except ValueError as err:
        log.error("%s", err)
        return 2
    if args.duplex_prompt:
        log.warning("--duplex-prompt is not passed to Ray replicas: duplex clients send their own prompt "
                    "(session.update); ignoring it")
    direct = not (args.ray_address or args.serve_proxy)
    if args.ray_address:
        ray.init(address=args.ray_address)
    else:  # a local instance: Ray's CPU count is for scheduling, so room for every replica asked for
        if not port_free(args.host, args.port):  # Serve would retry the bind forever
            log.error("%s:%d is in use: choose another --port", args.host, args.port)
            return 2
        if direct:
            os.environ.update(direct_ingress_env(args.port))  # inherited by every process Ray starts
        wanted = sum(s.num_cpus * max(s.replicas, s.max_replicas or 0) for s in specs) + INGRESS_CPUS
        start_local_ray(max(os.cpu_count() or 1, math.ceil(wanted)), loopback=is_loopback(args.host))
    set_gpus(specs, args.gpus_per_replica, ray.cluster_resources().get("GPU", 0))
    front = front_settings(args)
    # direct ingress: the front takes --port; Serve's proxy, which that mode still starts, a spare port
    serve.start(http_options={"host": args.host, "port": 0 if direct else args.port})
    log.info("serving %s on http://%s:%d through Ray Serve (%s)", ", ".join(names), args.host, args.port,
             ", ".join(f"{s.name}: {s.options().get('num_replicas', 'autoscaling')} replicas" for s in specs))
    serve.run(build(specs, front), name=front.app_name, route_prefix="/", blocking=True)
    return 0


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now (as uvicorn does: SO_REUSEADDR, so a port
    whose last connections linger in TIME_WAIT counts as free)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def set_gpus(specs, per_replica: float | None, cluster_gpus: float) -> None:
    """``--gpus-per-replica``, else one GPU per replica when the cluster has GPUs, else none."""
    for spec in specs:
        spec.num_gpus = per_replica if per_replica is not None else (1 if cluster_gpus else 0)


def front_settings(args: argparse.Namespace):
    from .ingress import FrontSettings

    return FrontSettings(access=AccessSettings(api_key=args.api_key or None, allowed_origins=tuple(args.allow_origin),
                                               max_connections=args.max_connections),
                         max_body_bytes=int(args.max_body_mb * 2**20), read_timeout=args.read_timeout,
                         realtime_idle_s=args.realtime_idle_s,
                         duplex=DuplexSettings(max_backlog_frames=args.duplex_backlog, idle_timeout_s=args.duplex_idle_s),
                         reference=ReferenceSettings(replay_seconds=args.replay_seconds))


def application(config: dict):
    """The Serve application builder for ``serve run`` / ``serve deploy`` and KubeRay's RayService
    (docs/SCALING.md): ``import_path: serving.scale.cli:application``, ``args: {argv: "<server.py
    flags>"}`` (the model, replica, limit and security flags; host and port are Serve's own
    settings there). Deploy it under the name ``omni-zoo`` (FrontSettings.app_name), which
    /health reads the replica states of."""
    import shlex

    import ray

    from .deploy import build

    argv = config.get("argv", "")
    argv = shlex.split(argv) if isinstance(argv, str) else [str(a) for a in argv]
    specs, front = plan(argv, ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0)
    return build(specs, front)


def plan(argv: list[str], cluster_gpus: float):
    """(the models' ModelSpecs, the FrontSettings) of server.py flags; ValueError for a bad model
    or replica count."""
    import server

    names, one_model_argv = split_models(argv)
    args = server.parse_args(one_model_argv)
    specs = specs_from(args, names, 0)
    set_gpus(specs, args.gpus_per_replica, cluster_gpus)
    return specs, front_settings(args)
