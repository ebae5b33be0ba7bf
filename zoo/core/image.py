"""Image in: an HxWx3 uint8 array, a file path, the bytes of a PNG/JPEG (or WebP, GIF, BMP) file or
a PIL image, turned into a PIL image for a model's own preprocessing. Problems become
ImageInputError. Decoding is bounded: a file's bytes are capped, and its pixel count is read from
the header and checked before any pixel is decoded, so a small file that claims a huge canvas
(a decompression bomb) costs nothing."""
from __future__ import annotations

import io
import os
import warnings
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageInputError

MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 6000 * 6000  # a 36-megapixel photo; a model sees 224x224 of it anyway
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
ImageSource = str | os.PathLike | bytes | bytearray | np.ndarray | Image.Image


def load_image(source: Any, *, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """``source`` as a decoded PIL image, its mode kept (models convert as their reference does)."""
    if isinstance(source, Image.Image):
        _check_pixels(*source.size, max_pixels)
        return source
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels)
    if isinstance(source, (str, os.PathLike)):
        try:
            size = os.path.getsize(source)
            if size > max_bytes:
                raise ImageInputError(f"the image file is {size} bytes, more than the {max_bytes} accepted")
            with open(source, "rb") as f:
                data = f.read(max_bytes + 1)
        except (FileNotFoundError, IsADirectoryError):
            raise ImageInputError(f"image file not found: {source}") from None
        return _decode(data, max_bytes, max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(bytes(source), max_bytes, max_pixels)
    raise ImageInputError(f"an image must be an HxWx3 uint8 array, a path, PNG/JPEG bytes or a PIL image, "
                          f"got {type(source).__name__}")


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise ImageInputError(f"the image is empty ({width}x{height})")
    if width * height > max_pixels:
        raise ImageInputError(f"the image is {width}x{height} pixels, more than the {max_pixels} accepted")


def _from_array(array: np.ndarray, max_pixels: int) -> Image.Image:
    if array.ndim != 3 or array.shape[2] != 3:
        raise ImageInputError(f"an image array must be HxWx3 (RGB), got shape {array.shape}")
    if array.dtype != np.uint8:
        raise ImageInputError(f"an image array must be uint8, got {array.dtype}")
    _check_pixels(array.shape[1], array.shape[0], max_pixels)
    return Image.fromarray(np.ascontiguousarray(array), mode="RGB")


def _decode(data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    if len(data) > max_bytes:
        raise ImageInputError(f"the image is more than {max_bytes} bytes")
    if not data:
        raise ImageInputError("the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL warns (and past twice its limit raises) on huge canvases; we check our own limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
            _check_pixels(*image.size, max_pixels)
            image.load()
    except ImageInputError:
        raise
    except Image.DecompressionBombError:  # PIL's own header check, far past ours
        raise ImageInputError(f"the image is more than the {max_pixels} pixels accepted") from None
    except UnidentifiedImageError as err:
        raise ImageInputError(f"could not decode the image ({err}); send a PNG or JPEG file") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:  # truncated or corrupt data
        raise ImageInputError(f"could not decode the image: {err}") from None
    return image
