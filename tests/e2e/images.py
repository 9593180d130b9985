"""Helpers for images the webui API returns."""
import base64
import io

import numpy as np
from PIL import Image


def decode(b64: str) -> np.ndarray:
    if "," in b64[:64]:
        b64 = b64.split(",", 1)[1]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(np.int16)


def first_image(response: dict) -> np.ndarray:
    return decode(response["images"][0])


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())
