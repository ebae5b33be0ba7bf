"""The flags every terminal client of server.py shares (demos/mic_chat.py, demos/duplex_chat.py):
the server's URL, its API key and the model the user expects there, checked against the server's
``GET /v1/models`` before anything else happens, so a wrong URL, a missing key or the wrong model
is one clear line. The counterpart of zoo/cli.py, whose flags are for programs that load a model.

Only the standard library and the cards: a client loads no torch."""
from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from . import card, names

DEFAULT_SERVER = "http://127.0.0.1:60808"
SERVER_ENV = "API_URL"  # as the web UIs
API_KEY_ENV = "OMNI_ZOO_API_KEY"  # the key server.py was started with (--api-key), if any


class ClientError(Exception):
    """The server cannot be used as asked; the message is one line for people."""


@dataclass
class ServerInfo:
    url: str  # http(s)://host:port, no trailing slash
    api_key: str | None
    model: str  # the model the server runs
    card: dict = field(default_factory=dict)
    notice: str | None = None  # random weights: what every front end shows

    def ws_url(self, path: str) -> str:
        scheme, rest = self.url.split("://", 1)
        return f"{'wss' if scheme == 'https' else 'ws'}://{rest}{path}"

    def headers(self) -> dict:
        return auth_headers(self.api_key)


def auth_headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def add_client_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--server", default=os.environ.get(SERVER_ENV) or DEFAULT_SERVER, metavar="URL",
                       help=f"server.py's address (default: env {SERVER_ENV}, else {DEFAULT_SERVER})")
    group.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None, metavar="KEY",
                       help=f"the key server.py was started with (default: env {API_KEY_ENV}, which keeps it "
                            "out of the process list)")
    group.add_argument("--model", choices=names(), help="the model you expect the server to run; "
                       "another one is an error (default: whatever it runs)")


def connect(args: argparse.Namespace, *, duplex: bool = False, timeout: float = 10) -> ServerInfo:
    """Ask the server which model it runs (``GET /v1/models``) and check it against the flags
    (``duplex``: the client needs a full-duplex model). ClientError otherwise."""
    url = args.server.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ClientError(f"--server {args.server}: give an http:// or https:// address, e.g. {DEFAULT_SERVER}")
    request = urllib.request.Request(url + "/v1/models", headers=auth_headers(args.api_key))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            listing = json.load(response)
        served = listing["data"][0]
        info = ServerInfo(url, args.api_key, served["id"], served.get("card") or {}, served.get("notice"))
    except urllib.error.HTTPError as err:
        raise ClientError(refusal(url, err, args.api_key)) from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", None) or err
        raise ClientError(f"cannot reach the server at {url} ({reason}): start it with `python server.py`, "
                          f"or give its address with --server") from None
    except (ValueError, KeyError, IndexError, TypeError):
        raise ClientError(f"{url} does not answer GET /v1/models like server.py: is it an omni-zoo server?") from None
    if args.model and args.model != info.model:
        raise ClientError(f"the server at {url} runs {info.model!r}, not {args.model!r}: start it with "
                          f"`python server.py --model {args.model}`, or leave out --model")
    if duplex and not info.card.get("duplex"):
        offered = ", ".join(n for n in names() if card(n).duplex)
        raise ClientError(f"the server at {url} runs {info.model!r}, which is not full duplex: start it with a "
                          f"full-duplex model (`python server.py --model NAME`, NAME one of: {offered})")
    return info


def refusal(url: str, err: urllib.error.HTTPError, api_key: str | None) -> str:
    if err.code == 401:
        if api_key:
            return f"the server at {url} refused the API key: check --api-key / {API_KEY_ENV}"
        return f"the server at {url} needs an API key: set {API_KEY_ENV} (or pass --api-key)"
    try:
        message = json.loads(err.read())["error"]["message"]
    except (ValueError, KeyError, TypeError, OSError):
        message = err.reason
    return f"the server at {url} answered HTTP {err.code} to GET /v1/models: {message}"
