"""The Streamlit chat's low-latency live widget (or full duplex, for models whose card says so):
the same scripts as the Gradio page's (webui/live.py), each in a component iframe, which
Streamlit lets use the microphone."""
from __future__ import annotations

from urllib.parse import urlencode

import streamlit as st
import streamlit.components.v1 as components

from webui.catalog import ModelEntry
from webui.client import api_key
from webui.live import DUPLEX_JS, LIVE_JS, duplex_url, duplex_widget_html, realtime_url, widget_html


def _embed(markup: str, script: str, height: int, scrolling: bool) -> None:
    # the scripts find their widget under `element`, as Gradio's js_on_load hands it to them
    components.html(markup + f"<script>const element = document.body;</script><script>{script}</script>",
                    height=height, scrolling=scrolling)


def live_widgets(api_url: str, entry: ModelEntry) -> None:
    card = entry.card
    if card.get("duplex"):
        with st.expander("Full duplex (live): talk whenever you like; the model listens and speaks at the same "
                         "time (headphones help)", expanded=True):
            markup = duplex_widget_html(duplex_url(api_url), card.get("input_sample_rate") or 16000,
                                        card.get("frame_samples") or 0, api_key())
            _embed(markup, DUPLEX_JS, 80, False)
    else:
        with st.expander("Live chat (low latency): talk, pause, and the reply plays as it is generated",
                         expanded=True):
            url = f"{realtime_url(api_url)}?{urlencode({'model': entry.id})}"  # the model picked in the sidebar
            _embed(widget_html(url, api_key()), LIVE_JS, 120, True)
