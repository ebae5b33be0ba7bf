"""What the load benchmarks share: a server.py of their own on a free loopback port, the loopback
check for a server given by URL, one streamed /chat reply, and the server's /metrics."""
from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import requests

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_loopback(url: str) -> bool:
    """127.0.0.0/8, ::1 or localhost; a name that merely starts like one (127.0.0.1.example) is not."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def start_server(flags: list[str], env: dict | None = None, timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """server.py with ``flags`` on a free loopback port, once its /health answers."""
    port = free_port()
    cmd = [sys.executable, str(ROOT / "server.py"), "--port", str(port), *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                # 401 without a key is up too; a Ray Serve proxy answers 404 until the app is deployed
                if requests.get(url + "/health", timeout=1).status_code in (200, 401):
                    return proc, url
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or too busy starting
                time.sleep(0.5)
            if proc.poll() is not None:
                raise SystemExit("server.py exited during start-up")
        raise SystemExit(f"server.py did not start in {timeout:.0f} s")
    except BaseException:  # whatever stops the wait (Ctrl-C too) stops the server: none is left behind
        stop_server(proc)
        raise


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def metrics(url: str, headers: dict | None = None, timeout: float = 10) -> dict[str, float]:
    """The unlabelled samples of /metrics (process_resident_memory_bytes, process_open_fds, ...)."""
    values = {}
    for line in requests.get(url + "/metrics", headers=headers, timeout=timeout).text.splitlines():
        name, _, value = line.partition(" ")
        if line and not line.startswith("#") and "{" not in name:
            values[name] = float(value)
    return values


def post_chat(url: str, body: dict, rate: int, timeout: float, headers: dict | None = None) -> dict:
    """One /chat reply read to its end: status, bytes, TTFA (request sent -> first audio byte), RTF;
    ``error`` says why it is not a complete 200 stream (HTTP status, or the transport error)."""
    started = time.perf_counter()
    try:
        response = requests.post(url + "/chat", json=body, headers=headers, stream=True, timeout=timeout)
        if response.status_code != 200:
            return {"status": response.status_code, "error": f"HTTP {response.status_code}: {response.text[:200]}",
                    "retry_after": response.headers.get("retry-after")}
        first, size = None, 0
        for part in response.iter_content(chunk_size=4096):
            if first is None and part:
                first = time.perf_counter() - started
            size += len(part)
        total = time.perf_counter() - started
    except requests.RequestException as err:
        return {"status": None, "error": f"{type(err).__name__}: {err}"}
    audio_s = size / 2 / rate
    return {"status": 200, "bytes": size, "ttfa_s": first, "total_s": total, "audio_s": audio_s,
            "rtf": total / audio_s if audio_s else None}
