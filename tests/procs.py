"""Programs the tests run as a user would: a subprocess on a free loopback port, ready once its
health URL answers, stopped (and killed if need be) afterwards."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

import requests
from conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackProcess:
    """``argv`` is run with this Python (``{port}`` is filled in) from the repository root."""

    def __init__(self, argv: list[str], *, health: str = "/", env: dict | None = None, timeout: float = 120,
                 cwd=REPO) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # one torch thread per program: the test process and its servers share a small machine, and
        # torch's spinning intra-op threads, starved by the other process, slow each step ~50x
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        environment = {k: v for k, v in environment.items() if v is not None}  # None removes a variable
        # its output goes to a file, not a pipe: a pipe nobody reads fills up (the access log writes a
        # line per request) and then blocks the program
        self.log = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
        self.proc = subprocess.Popen([sys.executable, *(a.format(port=self.port) for a in argv)], cwd=cwd,
                                     env=environment, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        try:
            self._wait(self.url + health, timeout)
        except BaseException:
            self.stop()
            raise

    def _wait(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if requests.get(url, timeout=1).ok:
                    return
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or too busy starting
                time.sleep(0.3)
            assert self.proc.poll() is None, self.output()
        raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")

    def output(self) -> str:
        """Everything the program printed so far (stdout and stderr)."""
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
