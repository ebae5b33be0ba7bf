"""Client text that must be a JSON object (an HTTP body, a realtime event, a duplex
session.update): parsed in one place, so every protocol refuses the same things the same way."""
from __future__ import annotations

import json
from typing import Any


def json_object(data: str | bytes) -> dict[str, Any]:
    """``data`` as a JSON object; anything else (not JSON, not UTF-8, an array, a number, null)
    raises ValueError saying what was wrong, for the caller to answer in its protocol's words."""
    value = json.loads(data)  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    return value
