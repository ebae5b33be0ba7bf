"""What the Ray Serve deployment adds per request, against the single-process server, on the
same model and machine. Both servers run at once (server.py, and server.py --replicas 1, each on
its own free loopback port) and are asked the same things alternately, one request at a time:
no concurrency, so the figure is the path's own cost, not queueing, and whatever else the
machine does at the time weighs on both alike. Both get the same torch thread count: Ray gives a
1-CPU replica OMP_NUM_THREADS=1, so the single process gets it too (or whatever OMP_NUM_THREADS
says); with torch's default (every core) next to Ray's processes, the single process was the
slower one on 2 cores and the difference looked ~8 ms smaller than it is.

    python bench/ray_overhead.py --tiny
    python bench/ray_overhead.py --tiny --serve-proxy     # clients -> Serve's HTTP proxy -> the front
    python bench/ray_overhead.py --tiny --requests 60 --env RAY_SERVE_USE_GRPC_BY_DEFAULT=1

The Ray server runs as server.py does by default on a local instance: the front replica listens
itself (Serve's direct ingress); ``--serve-proxy`` puts Serve's HTTP proxy in front of it.

Per server: ``GET /v1/models`` latency (the HTTP path without a model call: the front, and the
proxy with --serve-proxy) and /chat TTFA (request sent -> first audio byte: adds the model
replica call and the first streamed items); for Ray also the front's zoo_replica_dispatch_seconds (call -> the model
replica's first item, before any model work). Prints JSON with the differences (Ray minus single
process) at p50 and p95.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from datetime import date

import numpy as np
import requests
from loopback import ROOT, post_chat, start_server, stop_server

QUESTION = ROOT / "demos" / "samples" / "01.wav"


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 1)


def measure(servers: dict[str, str], requests_n: int, max_tokens: int) -> dict[str, dict]:
    """``servers``: name -> URL, asked alternately."""
    body = {"audio": base64.b64encode(QUESTION.read_bytes()).decode(), "max_tokens": max_tokens}
    rates = {name: requests.get(url + "/v1/models", timeout=30).json()["data"][0]["card"]["output_sample_rate"]
             for name, url in servers.items()}
    for _ in range(3):  # warm-up: first calls build routers, caches, connections
        for name, url in servers.items():
            post_chat(url, body, rates[name], 120)
            requests.get(url + "/v1/models", timeout=30)
    models_ms = {name: [] for name in servers}
    ttfa_ms = {name: [] for name in servers}
    errors = dict.fromkeys(servers, 0)
    for _ in range(requests_n * 2):
        for name, url in servers.items():
            started = time.perf_counter()
            requests.get(url + "/v1/models", timeout=30).raise_for_status()
            models_ms[name].append((time.perf_counter() - started) * 1000)
    for _ in range(requests_n):
        for name, url in servers.items():
            r = post_chat(url, body, rates[name], 120)
            if "error" in r:
                errors[name] += 1
            else:
                ttfa_ms[name].append(r["ttfa_s"] * 1000)
    results = {}
    for name, url in servers.items():
        results[name] = {"v1_models_ms_p50": pct(models_ms[name], 50), "v1_models_ms_p95": pct(models_ms[name], 95),
                         "ttfa_ms_p50": pct(ttfa_ms[name], 50), "ttfa_ms_p95": pct(ttfa_ms[name], 95),
                         "chats": len(ttfa_ms[name]), "errors": errors[name]}
        dispatch = dispatch_mean_ms(requests.get(url + "/metrics", timeout=30).text)
        if dispatch is not None:
            results[name]["replica_dispatch_ms_mean"] = dispatch
    return results


def dispatch_mean_ms(text: str) -> float | None:
    """The mean of zoo_replica_dispatch_seconds (the Ray front: call -> the replica's first item)."""
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("zoo_replica_dispatch_seconds_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("zoo_replica_dispatch_seconds_count"):
            count += float(line.rsplit(" ", 1)[1])
    return round(total / count * 1000, 1) if count else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mini-omni")
    p.add_argument("--tiny", action="store_true", help="the tiny random model (CPU)")
    p.add_argument("--device")
    p.add_argument("--requests", type=int, default=40, help="chats per mode (twice as many /v1/models)")
    p.add_argument("--max-tokens", type=int, default=20)
    p.add_argument("--serve-proxy", action="store_true", help="the Ray server behind Serve's HTTP proxy")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="for the Ray mode's server.py")
    args = p.parse_args(argv)
    if not 1 <= args.requests <= 500:
        p.error("--requests 1..500")
    flags = ["--model", args.model, "--max-sessions", "4"] + (["--tiny"] if args.tiny else [])
    flags += ["--device", args.device] if args.device else []
    threads = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    ray_env = dict(e.split("=", 1) for e in args.env)
    started = []
    try:
        started.append(start_server(flags, env=threads))
        ray_flags = ["--replicas", "1"] + (["--serve-proxy"] if args.serve_proxy else [])
        started.append(start_server(flags + ray_flags, env={**threads, **ray_env}))
        results = measure({"single_process": started[0][1], "ray_replicas_1": started[1][1]}, args.requests,
                          args.max_tokens)
    finally:
        for proc, _ in started:
            stop_server(proc)
    single, ray = results["single_process"], results["ray_replicas_1"]
    added = {k.replace("_ms", "_ms_added"): round(ray[k] - single[k], 1) for k in single if k.endswith(("p50", "p95"))}
    print(json.dumps({"date": date.today().isoformat(), "model": args.model, "tiny": args.tiny,
                      "machine": f"{os.cpu_count()} cores", "device": args.device or "auto", **threads, "ray_env": ray_env,
                      "ray_ingress": "serve_proxy" if args.serve_proxy else "direct",
                      "requests": args.requests, "max_tokens": args.max_tokens, **results, "ray_minus_single": added},
                     indent=2))
    return 1 if single["errors"] or ray["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
