"""Images from users (a data URI or a file path), checked, and turned into the encoder's pixels.

    img = load_image("data:image/png;base64,iVBOR...", where="messages[0].content[1]")
    pixels = to_pixels(img, 32)        # (3, 32, 32) float in [-1, 1], as SigLIP's processor makes

Refused with one UserError naming the problem: http(s) URLs (nothing is fetched), a path that does
not exist, bytes that are no image, a format other than FORMATS, more than MAX_PIXELS pixels
(checked from the header, before the image is decoded).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
from pathlib import Path

import numpy as np
import torch

from llmforge.errors import UserError

FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")
MAX_PIXELS = 16_777_216        # 4096 x 4096: larger images are refused before decoding
MAX_BYTES = 8 << 20            # encoded size


def load_image(url: str, where: str = "image", base: Path | None = None):
    """A PIL RGB image from a data URI (data:image/...;base64,...) or a file path (relative to `base`)."""
    from PIL import Image, UnidentifiedImageError
    from PIL.Image import DecompressionBombError

    if url.startswith(("http://", "https://")):
        raise UserError(f"{where}: image URLs are not fetched (the server has no network access); send the "
                        "image inline as data:image/png;base64,...")
    if url.startswith("data:"):
        head, _, payload = url.partition(",")
        if ";base64" not in head or not payload:
            raise UserError(f"{where}: a data URI must look like data:image/png;base64,<data>")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise UserError(f"{where}: the data URI's base64 is corrupt; re-encode the image") from None
    else:
        path = Path(url) if base is None or Path(url).is_absolute() else base / url
        if not path.is_file():
            raise UserError(f"{where}: image file {path} does not exist; fix the path")
        raw = path.read_bytes()
    if len(raw) > MAX_BYTES:
        raise UserError(f"{where}: the image is {len(raw) / 2**20:.1f} MiB; send at most {MAX_BYTES >> 20} MiB")
    try:
        img = Image.open(io.BytesIO(raw))
    except DecompressionBombError:
        raise UserError(f"{where}: the image has too many pixels; send at most {MAX_PIXELS / 1e6:.0f} megapixels") from None
    except (UnidentifiedImageError, OSError):
        raise UserError(f"{where}: the data is not an image (or is corrupt); send a PNG, JPEG, GIF, WEBP or BMP") from None
    if img.format not in FORMATS:
        raise UserError(f"{where}: image format {img.format} is not supported; send one of {', '.join(FORMATS)}")
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise UserError(f"{where}: the image is {w} x {h} = {w * h / 1e6:.0f} megapixels; send at most "
                        f"{MAX_PIXELS / 1e6:.0f} megapixels (resize it)")
    try:
        return img.convert("RGB")
    except (OSError, ValueError, SyntaxError):
        raise UserError(f"{where}: the image data is corrupt (it cannot be decoded); re-encode the image") from None


def to_uint8(img, size: int) -> torch.Tensor:
    """(3, size, size) uint8 RGB, resized (bilinear): what training stores per image."""
    from PIL import Image

    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1]: rescaled by 1/255, normalised with mean 0.5 and std 0.5
    per channel (the SigLIP processor's defaults)."""
    return pixels.float() / 127.5 - 1.0


def to_pixels(img, size: int) -> torch.Tensor:
    """(3, size, size) float32 in [-1, 1]: to_uint8, then normalize."""
    return normalize(to_uint8(img, size))


def image_hash(img) -> str:
    """sha256 of an image's size and RGB pixels (equal pictures, equal hash, whatever the file format)."""
    rgb = img.convert("RGB")
    return hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()


def data_uri(img, fmt: str = "PNG") -> str:
    """A PIL image as a data URI (what an OpenAI client sends)."""
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()
