"""JPEG/PNG encoding of camera frames."""

from __future__ import annotations

import numpy as np
import pytest

from producers.images import camera_images, decode_image, encode_image, encode_jpeg


def _frame(h: int = 48, w: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 128)], axis=-1).astype(np.uint8)


def test_jpeg_round_trip_keeps_shape_and_is_close() -> None:
    frame = _frame()
    data = encode_jpeg(frame, quality=90)
    assert data[:2] == b"\xff\xd8"
    back = decode_image(data)
    assert back.shape == frame.shape and back.dtype == np.uint8
    assert np.abs(back.astype(int) - frame.astype(int)).mean() < 3


def test_png_is_lossless_and_quality_matters_for_jpeg() -> None:
    frame = np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(encode_image(frame, encoding="png")), frame)
    assert len(encode_jpeg(frame, quality=20)) < len(encode_jpeg(frame, quality=95))


def test_non_contiguous_views_encode() -> None:
    frame = _frame()
    flipped = frame[::-1, ::-1]
    np.testing.assert_array_equal(
        decode_image(encode_image(flipped, encoding="png")), np.ascontiguousarray(flipped)
    )


@pytest.mark.parametrize(
    "bad", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 3), np.float32)]
)
def test_rejects_what_is_not_hxwx3_uint8(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="HxWx3"):
        encode_image(bad)


def test_rejects_unknown_encoding_and_bad_quality() -> None:
    with pytest.raises(ValueError, match="encoding"):
        encode_image(_frame(), encoding="webp")
    with pytest.raises(ValueError, match="quality"):
        encode_image(_frame(), quality=0)


def test_camera_images_records() -> None:
    records = camera_images({"corner": _frame(48, 64), "topview": _frame(8, 8)}, encoding="jpeg")
    assert [r["camera"] for r in records] == ["corner", "topview"]
    assert (records[0]["height"], records[0]["width"]) == (48, 64)
    assert all(r["encoding"] == "jpeg" and r["data"] for r in records)
