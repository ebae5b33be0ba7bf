"""Streamlit web UI: ``streamlit run webui/omni_streamlit.py [--server.port N]``.

A home page at ``/`` and the voice chat at ``/chat`` (webui/views/chat.py), which talks to
server.py at ``API_URL`` (default http://127.0.0.1:60808; start it with ``python server.py``):
a model picker, replies that play as they stream, and each turn's record. Run it from the
repository root so Streamlit reads ``.streamlit/config.toml`` (no usage statistics).
"""
from pathlib import Path

import streamlit as st

HERE = Path(__file__).resolve().parent


def home() -> None:
    st.title("omni-zoo")
    st.markdown(
        "Open end-to-end voice chat models behind one streaming interface: speak a question and "
        "the model answers in speech, with its text alongside.\n\n"
        "This UI talks to `server.py` (set `API_URL`, default `http://127.0.0.1:60808`)."
    )
    st.page_link(chat_page, label="Open the voice chat", icon=":material/mic:")


chat_page = st.Page(HERE / "views" / "chat.py", url_path="chat", title="Voice chat")
home_page = st.Page(home, url_path="home", title="Home")  # first page: served at /

# No page icons: Streamlit makes a page's icon the favicon and fetches a Material one from
# fonts.gstatic.com (an emoji needs an emoji font, which many Linux desktops lack); its own
# favicon is served locally. The page asks nothing of anyone but this server (and, with
# .streamlit/config.toml, sends no usage statistics).
st.set_page_config(page_title="omni-zoo voice chat")
st.navigation([home_page, chat_page]).run()
