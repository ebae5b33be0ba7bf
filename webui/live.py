"""The low-latency live chat widget both pages embed (webui/static/live.js): its markup, its
script and the WebSocket address of a server's /v1/realtime."""
from __future__ import annotations

from pathlib import Path

LIVE_JS = (Path(__file__).resolve().parent / "static" / "live.js").read_text()


def realtime_url(api_url: str) -> str:
    """http(s)://host:port -> ws(s)://host:port/v1/realtime."""
    return api_url.rstrip("/").replace("https://", "wss://").replace("http://", "ws://") + "/v1/realtime"


def widget_html(ws_url: str) -> str:
    """The widget's markup; an empty ``ws_url`` means the page's own origin."""
    return (f'<div data-omni-live data-ws="{ws_url}" style="font-family: sans-serif">'
            f'<button data-state="off">Start live chat</button> <span class="omni-live-status">not started</span>'
            f'<div class="omni-live-transcript"></div></div>')
