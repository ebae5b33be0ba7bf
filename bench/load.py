"""Many concurrent clients against server.py: TTFA p50/p90, per-session RTF, aggregate throughput,
errors and server memory. Loopback only; the number of requests and the time are bounded.

    python bench/load.py --spawn --tiny --clients 1 8 32          # starts its own server.py
    python bench/load.py --url http://127.0.0.1:60808 --clients 8  # a server you started

Each client sends the demo question to POST /chat (the reference client protocol) and reads the
PCM stream. TTFA is measured at the client: request sent -> first audio byte. With --spawn the
same model is also run in-process first, so the server's overhead on top of the model's own TTFA
is reported. Results: bench/results/<date>_load_<model>_<device>.json and a row in load.md.

Simulated users (``--users N --duration S``): each user talks (waits a turn's speaking time),
sends the turn, listens to the whole reply (its audio duration in real time from the first audio
byte), thinks, and talks again, until the time is up; users join spread over the first seconds.
Reports completed turns, TTFA p50/p95/p99 and errors (``bench/results/<date>_users_...json``, a
row in users.md). With ``--replicas`` (and --spawn) the server is the Ray Serve deployment:

    python bench/load.py --spawn --tiny --replicas 2 --users 32 --duration 120
"""
from __future__ import annotations

import argparse
import base64
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import numpy as np
import requests
from host import RESULTS, machine
from loopback import ROOT, is_loopback, metrics, post_chat, start_server, stop_server
from tqdm import tqdm

QUESTION = ROOT / "demos" / "samples" / "01.wav"


def spawn(args) -> tuple[subprocess.Popen, str]:
    flags = ["--model", args.model, "--max-sessions", str(args.max_sessions or max(args.users or 0, *args.clients))]
    flags += ["--replicas", args.replicas, "--cpus-per-replica", "0.5"] if args.replicas else []
    flags += ["--tiny"] if args.tiny else []
    flags += ["--random-full"] if args.full else []
    flags += ["--dtype", args.dtype] if args.dtype else []
    flags += ["--device", args.device] if args.device else []
    flags += ["--prefill-batch", str(args.prefill_batch)] if args.prefill_batch else []
    flags += ["--prefill-positions", str(args.prefill_positions)] if args.prefill_positions is not None else []
    return start_server(flags)


def run_level(url: str, clients: int, per_client: int, body: dict, rate: int, timeout: float) -> dict:
    results: list[dict] = []
    lock = threading.Lock()
    progress = tqdm(total=clients * per_client, desc=f"{clients} clients", unit="req")

    def client():
        for _ in range(per_client):
            r = post_chat(url, body, rate, timeout)
            with lock:
                results.append(r)
                progress.update()

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    progress.close()
    ok = [r for r in results if "error" not in r]
    ttfa = [r["ttfa_s"] * 1000 for r in ok if r["ttfa_s"] is not None]
    return {
        "clients": clients, "requests": len(results), "errors": len(results) - len(ok),
        "error_samples": [r["error"] for r in results if "error" in r][:3],
        "ttfa_ms_p50": round(float(np.percentile(ttfa, 50)), 1) if ttfa else None,
        "ttfa_ms_p90": round(float(np.percentile(ttfa, 90)), 1) if ttfa else None,
        "rtf_per_session_median": round(statistics.median(r["rtf"] for r in ok), 3) if ok else None,
        "audio_s_total": round(sum(r["audio_s"] for r in ok), 2), "wall_s": round(wall, 2),
        "throughput_audio_s_per_s": round(sum(r["audio_s"] for r in ok) / wall, 3),
    }


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def run_users(url: str, users: int, duration: float, body: dict, rate: int, timeout: float, talk_s: float,
              think_s: float, seed: int = 0) -> dict:
    """``users`` simulated talkers for ``duration`` seconds (a turn started before the end finishes)."""
    results: list[dict] = []
    lock = threading.Lock()
    end = time.monotonic() + duration

    def user(number: int) -> None:
        rng = np.random.default_rng(seed + number)
        time.sleep(rng.uniform(0, min(5.0, duration / 4)))  # users do not all start at once
        while time.monotonic() < end:
            time.sleep(talk_s * rng.uniform(0.5, 1.5))  # the user speaks the turn
            sent = time.monotonic()
            r = post_chat(url, body, rate, timeout)
            with lock:
                results.append(r)
            if "error" in r:
                time.sleep(1.0)  # a refused or failed turn: the user tries again shortly
                continue
            heard_until = sent + (r["ttfa_s"] or 0) + r["audio_s"]  # playback from the first audio byte
            time.sleep(max(0.0, heard_until - time.monotonic()) + think_s * rng.uniform(0.5, 1.5))

    threads = [threading.Thread(target=user, args=(i,)) for i in range(users)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ok = [r for r in results if "error" not in r]
    ttfa = [r["ttfa_s"] * 1000 for r in ok if r["ttfa_s"] is not None]
    return {"users": users, "duration_s": duration, "wall_s": round(wall, 1), "talk_s": talk_s, "think_s": think_s,
            "completed_turns": len(ok), "errors": len(results) - len(ok),
            "error_samples": [r["error"] for r in results if "error" in r][:3],
            "turns_per_user_per_min": round(len(ok) / users / (wall / 60), 2),
            "ttfa_ms_p50": percentile(ttfa, 50), "ttfa_ms_p95": percentile(ttfa, 95), "ttfa_ms_p99": percentile(ttfa, 99),
            "audio_s_total": round(sum(r["audio_s"] for r in ok), 1)}


def in_process_ttfa(args, audio_bytes: bytes, repeats: int = 5) -> float:
    """The model's own TTFA on the same question (what the server adds comes on top)."""
    import zoo

    random_weights = "full" if args.full else "tiny" if args.tiny else None
    model = zoo.load(args.model, random_weights=random_weights, device=args.device, dtype=args.dtype)
    times = []
    for i in range(repeats + 1):
        started = time.perf_counter()
        for chunk in model.respond(audio_bytes, options={"max_new_tokens": args.max_tokens}):
            if chunk.audio.size:
                break
        if i:
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server (loopback only)")
    p.add_argument("--spawn", action="store_true", help="start server.py on a free loopback port")
    p.add_argument("--tiny", action="store_true", help="with --spawn: the tiny random model")
    p.add_argument("--full", action="store_true", help="with --spawn: published dimensions, random weights")
    p.add_argument("--dtype")
    p.add_argument("--model", default="mini-omni")
    p.add_argument("--device")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=60)
    p.add_argument("--prefill-batch", type=int, help="with --spawn: server.py --prefill-batch (1: one prefill at a time)")
    p.add_argument("--prefill-positions", type=int,
                   help="with --spawn: server.py --prefill-positions (0: no bound, whole prompts only)")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--users", type=int, help="simulated users (talk, listen, think) instead of --clients levels")
    p.add_argument("--duration", type=float, default=60, help="--users: seconds of simulated conversation")
    p.add_argument("--talk-s", type=float, default=3.0, help="--users: mean seconds a user speaks per turn")
    p.add_argument("--think-s", type=float, default=1.5, help="--users: mean pause after a reply")
    p.add_argument("--replicas", help="with --spawn: the Ray Serve deployment with these replicas (server.py --replicas)")
    p.add_argument("--max-sessions", type=int, help="with --spawn: session slots (per replica)")
    args = p.parse_args(argv)
    if not (args.url or args.spawn):
        p.error("give --url or --spawn")
    if args.url and not is_loopback(args.url):
        p.error("load tests target loopback addresses only")
    if max(args.clients) * args.requests_per_client > 2000:
        p.error("at most 2000 requests per level")
    if args.users is not None and not (1 <= args.users <= 1000 and 0 < args.duration <= 3600):
        p.error("--users 1..1000, --duration up to 3600 s")

    audio_bytes = QUESTION.read_bytes()
    body = {"audio": base64.b64encode(audio_bytes).decode(), "max_tokens": args.max_tokens}
    if args.users:
        return users_main(args, body)
    model_ttfa = in_process_ttfa(args, audio_bytes) if args.spawn else None
    with serving(args, body) as (url, card, rate):
        memory_before = metrics(url)["process_resident_memory_bytes"] / 2**20
        levels = [run_level(url, n, args.requests_per_client, body, rate, args.timeout) for n in args.clients]
        memory_after = metrics(url)["process_resident_memory_bytes"] / 2**20
    base = levels[0]["throughput_audio_s_per_s"] or 1e-9
    result = {
        "date": date.today().isoformat(), "model": card["id"], "random_weights": card.get("random_weights"),
        "machine": machine(), "device": args.device or "auto", "max_tokens": args.max_tokens,
        "question": QUESTION.name, "prefill_batch": args.prefill_batch,
        "prefill_positions": args.prefill_positions, "levels": levels,
        "throughput_vs_first_level": [round(level["throughput_audio_s_per_s"] / base, 2) for level in levels],
        "model_ttfa_ms_in_process": round(model_ttfa, 1) if model_ttfa else None,
        "server_overhead_ms_at_1_client": (round(levels[0]["ttfa_ms_p50"] - model_ttfa, 1)
                                           if model_ttfa and levels[0]["clients"] == 1 else None),
        "server_rss_mib": {"before": memory_before, "after": memory_after},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    tag = weights_tag(args, card)
    (args.out / f"{result['date']}_load_{card['id']}_{tag}.json").write_text(json.dumps(result, indent=2))
    table = args.out / "load.md"
    if not table.exists():
        table.write_text("# Load results (bench/load.py)\n\n| date | model | machine | clients | requests | errors "
                         "| TTFA p50 / p90 ms | RTF per session | throughput audio s/s | x first level |\n"
                         "|---|---|---|---|---|---|---|---|---|---|\n")
    with table.open("a") as f:
        for level, ratio in zip(levels, result["throughput_vs_first_level"]):
            f.write(f"| {result['date']} | {card['id']} ({tag}) | {result['machine']}, {result['device']} | {level['clients']} "
                    f"| {level['requests']} | {level['errors']} | {level['ttfa_ms_p50']} / {level['ttfa_ms_p90']} "
                    f"| {level['rtf_per_session_median']} | {level['throughput_audio_s_per_s']} | {ratio} |\n")
    print(json.dumps(result, indent=2))
    return 1 if any(level["errors"] for level in levels) else 0


def weights_tag(args, card: dict) -> str:
    """What weights answered: the spawn flags, or for --url what the server's card says."""
    if args.spawn:
        return "full-random" if args.full else ("tiny" if args.tiny else "published")
    return "random-weights" if card.get("random_weights") else "published"


def server_kind(args, url: str) -> str:
    """The spawn flags, or for --url what its /health says (a Ray deployment counts replicas)."""
    if args.spawn:
        return f"ray serve, replicas {args.replicas}" if args.replicas else "single process"
    try:
        models = requests.get(url + "/health", timeout=10).json().get("models", {})
        replicas = {name: sum(m.get("replicas", {}).values()) for name, m in models.items() if "replicas" in m}
    except (requests.RequestException, ValueError, AttributeError):
        replicas = {}
    return f"ray serve at {url}, replicas {replicas}" if replicas else f"server at {url}"


@contextmanager
def serving(args, body: dict) -> Iterator[tuple[str, dict, int]]:
    """The server under test (spawned, or --url) after one warm-up reply: (url, its model's card
    entry, its output sample rate). A spawned one is stopped afterwards."""
    proc, url = spawn(args) if args.spawn else (None, args.url)
    try:
        card = requests.get(url + "/v1/models", timeout=10).json()["data"][0]
        if args.spawn and card["id"] != args.model:
            raise SystemExit(f"the spawned server serves {card['id']}, not --model {args.model}")
        rate = card["card"]["output_sample_rate"]
        post_chat(url, body, rate, args.timeout)  # warm-up
        yield url, card, rate
    finally:
        if proc is not None:
            stop_server(proc)


def users_main(args, body: dict) -> int:
    with serving(args, body) as (url, card, rate):
        run = run_users(url, args.users, args.duration, body, rate, args.timeout, args.talk_s, args.think_s)
    tag = weights_tag(args, card)
    server = server_kind(args, url)
    result = {"date": date.today().isoformat(), "model": card["id"], "random_weights": card.get("random_weights"),
              "machine": machine(), "device": args.device or "auto", "server": server,
              "max_tokens": args.max_tokens, "question": QUESTION.name, **run}
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = f"_replicas{args.replicas}" if args.replicas else ""
    (args.out / f"{result['date']}_users_{card['id']}_{tag}{suffix}.json").write_text(json.dumps(result, indent=2))
    table = args.out / "users.md"
    if not table.exists():
        table.write_text("# Simulated users (bench/load.py --users)\n\n| date | model | machine | server | users | s "
                         "| completed turns | errors | TTFA p50 / p95 / p99 ms | turns per user per min |\n"
                         "|---|---|---|---|---|---|---|---|---|---|\n")
    with table.open("a") as f:
        f.write(f"| {result['date']} | {card['id']} ({tag}) | {result['machine']}, {result['device']} | {server} "
                f"| {run['users']} | {run['duration_s']:g} | {run['completed_turns']} | {run['errors']} "
                f"| {run['ttfa_ms_p50']} / {run['ttfa_ms_p95']} / {run['ttfa_ms_p99']} | {run['turns_per_user_per_min']} |\n")
    print(json.dumps(result, indent=2))
    return 1 if run["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
