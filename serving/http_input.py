"""Reading an HTTP request's JSON body without trusting the client: JSON content type only (a
web page cannot send that cross-site without the browser asking first), bounded size, and a
deadline for each piece of the body, so a client that stalls halfway cannot hold a connection."""
from __future__ import annotations

import asyncio
import base64
import binascii

from fastapi import Request

from .errors import ApiError
from .parsing import json_object

READ_TIMEOUT_S = 30.0


async def read_json(request: Request, limit: int, timeout: float = READ_TIMEOUT_S) -> dict:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", f"send the body as application/json, not {content_type or 'nothing'!r}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "too_large", f"request body over {limit} bytes")
    body = bytearray()
    parts = request.stream()
    while True:
        try:
            part = await asyncio.wait_for(anext(parts, None), timeout)
        except TimeoutError:
            raise ApiError(408, "read_timeout", f"no body data for {timeout:g} s: the request is dropped",
                           headers={"Connection": "close"}) from None
        if part is None:
            break
        body += part
        if len(body) > limit:
            raise ApiError(413, "too_large", f"request body over {limit} bytes")
    try:
        return json_object(body)
    except ValueError as err:
        raise ApiError(400, "bad_json", f"the body must be a JSON object: {err}") from None


def decode_audio_field(data: dict) -> bytes:
    value = data.get("audio")
    if not isinstance(value, str) or not value:
        raise ApiError(400, "bad_request", "field 'audio' (base64 of an audio file) is required")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_base64", "field 'audio' is not valid base64") from None


def decode_base64_image(value: object, where: str) -> bytes:
    """The bytes of an image sent as base64, or as a ``data:image/...;base64,`` URL (the OpenAI
    style); decoding and its limits are zoo.core.image's (in the model's prepare step)."""
    if not isinstance(value, str) or not value:
        raise ApiError(400, "bad_image", f"{where} must be a base64 image file (PNG or JPEG)")
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if not header.endswith(";base64") or not header[5:].startswith("image/"):
            raise ApiError(400, "bad_image", f"{where}: only data:image/...;base64 URLs are accepted")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_base64", f"{where} is not valid base64") from None


def decode_image_field(data: dict) -> bytes | None:
    """The optional ``image`` of a /chat body (what the Mini-Omni2 reference clients send)."""
    value = data.get("image")
    if value is None or value == "":  # the reference server treats an empty image as none
        return None
    return decode_base64_image(value, "field 'image'")
