"""Soak test for server.py: N clients for M minutes mixing valid replies, hostile requests and
disconnects, while the server's memory, file descriptors and sessions are sampled. Loopback only;
every request has a timeout and every loop stops at the deadline, so the run ends by itself.

    python bench/soak.py --model mini-omni --tiny --clients 16 --minutes 10   # starts its own server.py
    python bench/soak.py --url http://127.0.0.1:60808 --clients 4 --minutes 1 [--api-key K]

The mix of actions is in bench/soak_actions.py. Reported: completed and lost replies (a valid reply
that fails or comes back short, a 5xx or no answer to a hostile request; "busy" answers are retried
and counted), hostile outcomes by status, TTFA p50/p95 of the valid replies, RSS over time with its
slope over the second half, open fds, and /health sessions. Results: bench/results/<date>_<device>_soak.{json,md} (or --out STEM).
Exit status 1 when any reply was lost or the server died.
"""
from __future__ import annotations

import argparse
import os
import random
import shlex
import shutil
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

import requests
import soak_report
from host import RESULTS, machine
from loopback import ROOT, is_loopback, metrics, start_server, stop_server
from soak_actions import MIX, Outcome, Target, load_samples, silence_flac
from tqdm import tqdm


class ServerWatch(threading.Thread):
    """Every ``interval`` s: the server's RSS and open fds (from /proc when it is our child, else
    from /metrics) and /health's sessions. ``down`` is set once three samples in a row fail: the
    clients stop then, rather than spin on refused connections for the rest of the run."""

    FAILURES_BEFORE_DOWN = 3

    def __init__(self, url: str, headers: dict, pid: int | None, interval: float) -> None:
        super().__init__(daemon=True)
        self.url, self.headers, self.pid, self.interval = url, headers, pid, interval
        self.samples: list[dict] = []
        self.started = time.monotonic()
        self.stopping = threading.Event()
        self.down = threading.Event()

    def sample(self) -> dict:
        point = {"t": round(time.monotonic() - self.started, 1), "rss_mib": None, "fds": None, "sessions": None}
        try:
            point["sessions"] = requests.get(self.url + "/health", headers=self.headers, timeout=10).json()["sessions"]
            if self.pid is None:
                values = metrics(self.url, self.headers)
                point["rss_mib"] = round(values["process_resident_memory_bytes"] / 2**20, 1)
                point["fds"] = int(values["process_open_fds"])
        except (requests.RequestException, ValueError, KeyError) as err:
            point["error"] = f"{type(err).__name__}: {err}"[:200]
        if self.pid is not None:
            try:
                point["rss_mib"] = round(proc_rss_kib(self.pid) / 1024, 1)
                point["fds"] = len(os.listdir(f"/proc/{self.pid}/fd"))
            except OSError as err:  # the process is gone
                point["error"] = f"{type(err).__name__}: {err}"[:200]
        return point

    def run(self) -> None:
        failures = 0
        while not self.stopping.is_set():
            self.samples.append(self.sample())
            failures = failures + 1 if "error" in self.samples[-1] else 0
            if failures >= self.FAILURES_BEFORE_DOWN:
                self.down.set()
            self.stopping.wait(self.interval)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=30)
        self.samples.append(self.sample())


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise OSError(f"no VmRSS for {pid}")


def run_clients(target: Target, clients: int, seconds: float, seed: int, server_down: threading.Event) -> list[Outcome]:
    """``clients`` threads, each picking actions with its own seeded RNG until the deadline (or
    until the server is down)."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    names, weights = list(MIX), [weight for _, _, weight in MIX.values()]

    def client(index: int) -> None:
        rng = random.Random(f"{seed}:{index}")
        while time.monotonic() < deadline and not server_down.is_set():
            name = rng.choices(names, weights)[0]
            action, category, _ = MIX[name]
            try:
                outcome = action(target, rng)
            except Exception as err:  # a failure the action did not foresee: record it, keep the client going
                outcome = Outcome(f"unexpected {type(err).__name__}", lost=True, detail=str(err)[:300])
            outcome.action, outcome.category = name, category
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    with tqdm(total=round(seconds), unit="s", desc=f"soak, {clients} clients") as progress:
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline and not server_down.is_set():
            time.sleep(1)
            progress.n = min(round(seconds - (deadline - time.monotonic())), progress.total)
            with lock:
                progress.set_postfix(actions=len(outcomes), lost=sum(o.lost for o in outcomes))
    # an action under way at the deadline still finishes (bounded by the request timeout and
    # its busy retries); one that overstays that is abandoned with its daemon thread
    for thread in threads:
        thread.join(timeout=max(deadline + 2 * target.timeout - time.monotonic(), 0))
    with lock:
        return list(outcomes)


def sessions_after(url: str, headers: dict, wait_s: float = 20) -> int | None:
    """/health sessions once the last disconnected replies have had time to be cleaned up."""
    deadline = time.monotonic() + wait_s
    sessions = None
    while time.monotonic() < deadline:
        try:
            sessions = requests.get(url + "/health", headers=headers, timeout=5).json()["sessions"]
        except (requests.RequestException, ValueError, KeyError):
            return None
        if sessions == 0:
            break
        time.sleep(0.5)
    return sessions


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return git("rev-parse", "--short", "HEAD") + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def command_line(argv: list[str]) -> str:
    """How this run was started, for the report, with the API key blanked out."""
    shown = list(argv)
    for i, arg in enumerate(shown):
        if arg == "--api-key" and i + 1 < len(shown):
            shown[i + 1] = "***"
        elif arg.startswith("--api-key="):
            shown[i] = "--api-key=***"
    return shlex.join(["python", "bench/soak.py", *shown])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server (loopback only); without it server.py is started here")
    p.add_argument("--model", default="mini-omni", help="the model of the server started here")
    p.add_argument("--tiny", action="store_true", help="the server started here uses tiny random weights")
    p.add_argument("--device", help="the server started here runs on this device (and the results are named after it)")
    p.add_argument("--api-key", default=os.environ.get("OMNI_ZOO_API_KEY"),
                   help="sent as 'Authorization: Bearer KEY' (default $OMNI_ZOO_API_KEY); given to the server started here")
    p.add_argument("--clients", type=int, default=16)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, default=10)
    length.add_argument("--seconds", type=float, help="the run's length in seconds instead of --minutes")
    p.add_argument("--seed", type=int, default=0, help="seeds each client's choice of actions")
    p.add_argument("--timeout", type=float, default=120, help="per request, seconds")
    p.add_argument("--sample-every", type=float, default=5, help="seconds between memory/fd samples")
    p.add_argument("--out", type=Path, help="results path without suffix (default bench/results/<date>_<device>_soak)")
    args = p.parse_args(argv)
    if args.url and not is_loopback(args.url):
        p.error("soak tests target loopback addresses only (127.0.0.0/8, ::1, localhost)")
    if not 1 <= args.clients <= 256:
        p.error("--clients must be in [1, 256]")
    args.seconds = args.seconds if args.seconds is not None else args.minutes * 60
    if not 0 < args.seconds <= 24 * 3600:
        p.error("the run must last more than 0 s and at most a day")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    proc = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        # slots for every client twice over: a dropped reply holds its slot until the server notices
        flags = ["--model", args.model, "--max-sessions", str(2 * args.clients)]
        flags += ["--tiny"] if args.tiny else []
        flags += ["--device", args.device] if args.device else []
        proc, url = start_server(flags, env={"OMNI_ZOO_API_KEY": args.api_key} if args.api_key else None)
    try:
        card = requests.get(url + "/v1/models", headers=headers, timeout=30).json()["data"][0]
        target = Target(url, headers, args.timeout, card["card"]["output_sample_rate"], load_samples(),
                        silence_flac(card["card"]["max_input_seconds"] + 10))
        watch = ServerWatch(url, headers, proc.pid if proc else None, args.sample_every)
        watch.start()
        outcomes = run_clients(target, args.clients, args.seconds, args.seed, watch.down)
        left = sessions_after(url, headers)
        watch.stop()
        alive = not watch.down.is_set() and (proc is None or proc.poll() is None) and "error" not in watch.samples[-1]
    finally:
        if proc is not None:
            stop_server(proc)
    device = args.device or ("cuda" if shutil.which("nvidia-smi") else "cpu")
    meta = {"date": date.today().isoformat(), "machine": machine(), "device": device, "model": card["id"],
            "weights": "random" if card.get("random_weights") else "published", "clients": args.clients,
            "minutes": round(args.seconds / 60, 2), "seed": args.seed, "commit": commit(),
            "command": command_line(sys.argv[1:] if argv is None else argv),
            "server_alive_at_end": alive, "sessions_after_run": left}
    report = soak_report.summarize(outcomes, watch.samples, meta)
    json_path, md_path = soak_report.write(report, args.out or RESULTS / f"{meta['date']}_{device}_soak")
    print(soak_report.terminal_table(report))
    print(f"results: {json_path} {md_path}")
    return 0 if soak_report.passed(report) else 1


if __name__ == "__main__":
    sys.exit(main())
