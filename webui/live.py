"""The low-latency live widgets both pages embed, their markup, scripts and WebSocket addresses:
``live.js`` (turn-based live chat on a server's /v1/realtime: server VAD, barge-in) for
half-duplex models and ``duplex.js`` (full duplex on /v1/duplex: the mic streams in and the
model's frames play back continuously) for models whose card says duplex."""
from __future__ import annotations

import html
from pathlib import Path

STATIC = Path(__file__).resolve().parent / "static"
PCM_JS = (STATIC / "pcm.js").read_text()  # PCM16 -> Web Audio, shared by every widget
LIVE_JS = PCM_JS + (STATIC / "live.js").read_text()
DUPLEX_JS = PCM_JS + (STATIC / "duplex.js").read_text()


def _ws_base(api_url: str) -> str:
    return api_url.rstrip("/").replace("https://", "wss://").replace("http://", "ws://")


def realtime_url(api_url: str) -> str:
    """http(s)://host:port -> ws(s)://host:port/v1/realtime."""
    return _ws_base(api_url) + "/v1/realtime"


def duplex_url(api_url: str) -> str:
    """http(s)://host:port -> ws(s)://host:port/v1/duplex."""
    return _ws_base(api_url) + "/v1/duplex"


def _key_attribute(api_key: str | None) -> str:
    """The server's API key for the widget's WebSocket (browsers cannot set an Authorization
    header there: the script offers it as a subprotocol). Whoever can open the page can read it."""
    return f' data-key="{html.escape(api_key)}"' if api_key else ""


TRANSCRIPT_HEIGHT_PX = 220  # the live transcript scrolls inside this height: a long talk must not grow the page
# a text panel of either widget: it scrolls inside TRANSCRIPT_HEIGHT_PX rather than growing the page
PANEL_STYLE = (f"max-height: {TRANSCRIPT_HEIGHT_PX}px; overflow-y: auto; border: 1px solid #d1d5db; "
               "border-radius: 6px; padding: 6px 8px; line-height: 1.4")


def widget_html(ws_url: str, api_key: str | None = None) -> str:
    """The live chat widget's markup; an empty ``ws_url`` means the page's own origin. Its
    transcript is a labelled conversation (who said what, turn by turn) in a fixed-height panel."""
    return (f'<div data-omni-live data-ws="{ws_url}"{_key_attribute(api_key)} style="font-family: sans-serif">'
            f'<button data-state="off">Start live chat</button> <span class="omni-live-status">not started</span>'
            f'<div class="omni-live-label" style="font-weight: 600; margin: 8px 0 4px">Live conversation</div>'
            f'<div class="omni-live-transcript" role="log" aria-label="Live conversation" '
            f'style="{PANEL_STYLE}">'
            f'<div class="omni-live-empty" style="color: #6b7280">Start live chat and talk; '
            f'each turn appears here.</div></div></div>')


def duplex_widget_html(ws_url: str, sample_rate: int, frame_samples: int, api_key: str | None = None) -> str:
    """The full-duplex widget's markup (the card's input rate and frame size); an empty
    ``ws_url`` means the page's own origin. Below the button, the model's text as it streams,
    labelled and scrolling inside a fixed height (shown once the model sends text)."""
    return (f'<div data-omni-duplex data-ws="{ws_url}"{_key_attribute(api_key)} data-rate="{int(sample_rate)}" '
            f'data-frame="{int(frame_samples)}" style="font-family: sans-serif">'
            f'<button data-state="off">Start full duplex</button> '
            f'<span class="omni-duplex-status">not started</span>'
            # the model's text as it streams (cards with text_output); hidden until a piece arrives
            f'<div class="omni-duplex-text" role="log" aria-label="The model\'s text" hidden '
            f'style="{PANEL_STYLE}; margin-top: 8px; white-space: pre-wrap"></div></div>')
