"""Camera frame compression for the wire: HxWx3 uint8 RGB arrays to JPEG/PNG bytes and back, and
an observation's images as the ``CameraImage`` records of a ``Step``."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from schemas.records import CameraImage

ENCODINGS = ("jpeg", "png")
DEFAULT_JPEG_QUALITY = 90


def _check_rgb(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}")


def encode_image(image: np.ndarray, *, encoding: str = "jpeg", quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    """Compress one HxWx3 uint8 RGB image; ``quality`` (1–95) applies to JPEG only."""
    _check_rgb(image)
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown image encoding {encoding!r}; use one of {ENCODINGS}")
    buf = io.BytesIO()
    pil = Image.fromarray(np.ascontiguousarray(image))
    if encoding == "jpeg":
        if not 1 <= quality <= 95:
            raise ValueError(f"JPEG quality must be in 1..95, got {quality}")
        pil.save(buf, format="JPEG", quality=quality)
    else:
        pil.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """Decompress JPEG or PNG bytes into an HxWx3 uint8 RGB array (the format is read from the bytes)."""
    with Image.open(io.BytesIO(data)) as pil:
        return np.asarray(pil.convert("RGB"), dtype=np.uint8)


def encode_jpeg(image: np.ndarray, quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    return encode_image(image, encoding="jpeg", quality=quality)


def decode_jpeg(data: bytes) -> np.ndarray:
    return decode_image(data)


def camera_images(
    images: dict[str, np.ndarray], *, encoding: str = "jpeg", quality: int = DEFAULT_JPEG_QUALITY
) -> list[CameraImage]:
    """An observation's images as ``Step.images`` records, in the dict's camera order."""
    return [
        CameraImage(
            camera=camera,
            encoding=encoding,
            width=int(image.shape[1]),
            height=int(image.shape[0]),
            data=encode_image(image, encoding=encoding, quality=quality),
        )
        for camera, image in images.items()
    ]
