"""What a /v1/realtime client event may contain: each field's type and range is checked here, so a
malformed event gets an ``error`` event naming the field (ProtocolError) instead of a crash deep
inside the session."""
from __future__ import annotations

import math
from typing import Any

WIRE_RATE = 24000
MAX_SILENCE_MS = 10_000
MAX_PADDING_MS = 5_000
MODALITIES = {"audio", "text"}

DEFAULT_TURN_DETECTION = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                          "silence_duration_ms": 500, "create_response": True, "interrupt_response": True}


class ProtocolError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def expect_object(value: Any, where: str, *, optional: bool = False) -> dict:
    if value is None and optional:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError("invalid_value", f"{where} must be an object, got {_kind(value)}")
    return value


def event_id(event: dict) -> str | None:
    value = event.get("event_id")
    if value is not None and not isinstance(value, str):
        raise ProtocolError("invalid_value", f"event_id must be a string, got {_kind(value)}")
    return value


def audio_format(value: Any, where: str) -> None:
    fmt = expect_object(value, where)
    rate = fmt.get("rate", WIRE_RATE)
    if fmt.get("type") != "audio/pcm" or not _integer(rate) or rate != WIRE_RATE:
        raise ProtocolError("unsupported_format", f"{where}: only audio/pcm at {WIRE_RATE} Hz is supported, got {fmt}")


def turn_detection(value: Any) -> dict | None:
    """The session's turn detection from an update (null = manual turns; unset fields: defaults)."""
    if value is None:
        return None
    update = expect_object(value, "turn_detection")
    if update.get("type", "server_vad") != "server_vad":
        raise ProtocolError("unsupported_turn_detection", "turn_detection must be server_vad or null")
    merged = {**DEFAULT_TURN_DETECTION, **update}
    threshold = merged["threshold"]
    if not _number(threshold) or not 0.0 <= threshold <= 1.0:
        raise ProtocolError("invalid_value", f"turn_detection.threshold must be a number in [0, 1], got {threshold!r}")
    for name, top in (("silence_duration_ms", MAX_SILENCE_MS), ("prefix_padding_ms", MAX_PADDING_MS)):
        if not _integer(merged[name]) or not 0 <= merged[name] <= top:
            raise ProtocolError("invalid_value", f"turn_detection.{name} must be an integer in [0, {top}], "
                                                 f"got {merged[name]!r}")
    for name in ("create_response", "interrupt_response"):
        if not isinstance(merged[name], bool):
            raise ProtocolError("invalid_value", f"turn_detection.{name} must be true or false, got {merged[name]!r}")
    return merged


def output_modalities(value: Any) -> list:
    if not isinstance(value, list) or not value or not all(isinstance(m, str) and m in MODALITIES for m in value):
        raise ProtocolError("invalid_value", f"output_modalities must be a list of {sorted(MODALITIES)}, got {value!r}")
    return value


def instructions(value: Any) -> str:
    if not isinstance(value, str):
        raise ProtocolError("invalid_value", f"instructions must be a string, got {_kind(value)}")
    return value


def max_output_tokens(value: Any) -> int | str:
    """``"inf"`` or a positive integer (the model's options cap it further)."""
    if value == "inf" or (_integer(value) and value >= 1):
        return value
    raise ProtocolError("invalid_value", f"max_output_tokens must be a positive integer or \"inf\", got {value!r}")


def input_image(value: Any) -> str:
    """The image of a ``conversation.item.create`` item: a user message whose content is one
    ``{"type": "input_image", "image_url": "data:image/...;base64,..."}`` part."""
    item = expect_object(value, "conversation.item.create's 'item'")
    if item.get("type", "message") != "message" or item.get("role") != "user":
        raise ProtocolError("unsupported_item", "only user messages (type 'message', role 'user') can be created")
    content = item.get("content")
    if not isinstance(content, list) or not content:
        raise ProtocolError("invalid_value", "item.content must be a non-empty list of content parts")
    images = []
    for part in content:
        part = expect_object(part, "item.content[]")
        if part.get("type") != "input_image":
            raise ProtocolError("unsupported_content", f"only input_image content parts are supported "
                                                       f"(send speech as input audio), got {part.get('type')!r}")
        if not isinstance(part.get("image_url"), str):
            raise ProtocolError("invalid_value", "input_image.image_url must be a data:image/...;base64 URL string")
        images.append(part["image_url"])
    if len(images) != 1:
        raise ProtocolError("invalid_value", f"send one input_image per item, got {len(images)}")
    return images[0]


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__
