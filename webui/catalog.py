"""The models a server offers, as its ``GET /v1/models`` lists them (one per server.py process
today; several behind a multi-model deployment): what a page needs to offer a model picker and to
describe the chosen model from its card, never from its name."""
from __future__ import annotations

from dataclasses import dataclass

import requests

from webui.client import API_KEY_ENV, BackendError, auth_headers


@dataclass(frozen=True)
class ModelEntry:
    id: str
    card: dict
    random_weights: bool = False
    notice: str | None = None  # what the server says every front end must show (random weights)
    default_max_new_tokens: int | None = None  # the server's reply cap when the caller sets none

    @property
    def text_output(self) -> bool:
        """The model streams text with its audio (cards without the field predate it: text)."""
        return bool(self.card.get("text_output", True))

    @property
    def image_input(self) -> bool:
        """A question may come with an image (the card says image_input)."""
        return bool(self.card.get("image_input"))

    def facts(self) -> list[str]:
        """Short card facts for people: rates, input limit, what it can do."""
        card = self.card
        facts = [f"{card['input_sample_rate'] / 1000:g} kHz in" if card.get("input_sample_rate") else None,
                 f"{card['output_sample_rate'] / 1000:g} kHz out" if card.get("output_sample_rate") else None,
                 f"questions up to {card['max_input_seconds']:g} s" if card.get("max_input_seconds") else None,
                 "speech and text out" if self.text_output else "audio only (no text)",
                 "takes an image with the question" if self.image_input else None,
                 "multi-turn" if card.get("multi_turn") else None,
                 "full duplex" if card.get("duplex") else None,
                 "languages: " + ", ".join(card["languages"]) if card.get("languages") else None]
        return [fact for fact in facts if fact]


def list_models(api_url: str, timeout: float = 5) -> list[ModelEntry]:
    """``GET /v1/models``; a server that cannot be reached, refuses or answers nonsense is a
    BackendError whose message says what to do."""
    api_url = api_url.rstrip("/")
    try:
        response = requests.get(api_url + "/v1/models", headers=auth_headers(), timeout=timeout)
    except requests.RequestException as err:
        raise BackendError(f"cannot reach the voice server at {api_url} ({type(err).__name__}). "
                           f"Start it with `python server.py`, or set API_URL.") from None
    if response.status_code == 401:
        raise BackendError(f"the voice server at {api_url} needs an API key: set {API_KEY_ENV}")
    try:
        response.raise_for_status()
        entries = [ModelEntry(m["id"], dict(m["card"]), bool(m.get("random_weights")), m.get("notice"),
                              m.get("default_max_new_tokens")) for m in response.json()["data"]]
    except (requests.HTTPError, KeyError, TypeError, ValueError) as err:
        raise BackendError(f"the voice server at {api_url} did not list its models "
                           f"(GET /v1/models: {type(err).__name__}: {err})") from None
    if not entries:
        raise BackendError(f"the voice server at {api_url} offers no model")
    return entries
