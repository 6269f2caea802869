"""The camera images a ``Step`` carries, as bytes: reading their size from the JPEG/PNG structure without
decoding them, and a pool of synthetic JPEG frames for load and tests::

    jpeg_size(data), png_size(data)   # (w, h) of a structurally whole image, else BadImage (the processor's edge)
    image_dimensions(data)            # (w, h) from the header alone, None if not JPEG/PNG (the learner's check)
    frames = jpeg_pool(8, 64, seed=0)  # 64x64 tabletop-like JPEGs

The stream processor and the learner both check images and may not import each other, so this lives with the
wire contract. It imports no other package of the repository.
"""

from __future__ import annotations

import io
import struct
import zlib

# -- strict: a structurally whole image (the processor's edge) ---------------------------------------------------


class BadImage(ValueError):
    """Bytes that are not a well-formed image of the claimed encoding."""


# What each marker byte after 0xFF is, looked up once per segment (the walk is the edge's hottest loop).
_SEGMENT, _STANDALONE, _FILL, _BAD, _SOS, _SOF, _SOF_UNSUPPORTED = range(7)
_MARKERS = bytearray([_SEGMENT]) * 256
for _m in (0x01, *range(0xD0, 0xD8)):  # TEM, RST0-7: no length field
    _MARKERS[_m] = _STANDALONE
for _m in (0x00, 0xD8, 0xD9):  # a stuffed zero, SOI, EOI: never a header segment
    _MARKERS[_m] = _BAD
for _m in (0xC0, 0xC1, 0xC2):  # baseline, extended sequential, progressive (Huffman): what PIL reads
    _MARKERS[_m] = _SOF
for _m in (0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):  # lossless, hierarchical, arithmetic
    _MARKERS[_m] = _SOF_UNSUPPORTED
_MARKERS[0xFF] = _FILL
_MARKERS[0xDA] = _SOS
_MARKERS = bytes(_MARKERS)


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a structurally whole JPEG; raises :class:`BadImage` on garbage or truncation.

    Walks the marker segments from SOI to the first SOS (the frame header SOF0/1/2 gives the size) and
    requires EOI as the last two bytes; the entropy-coded scan data is not decoded.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        raise BadImage("no SOI marker at the start")
    if data[n - 2] != 0xFF or data[n - 1] != 0xD9:
        raise BadImage("no EOI marker at the end (truncated, or bytes after the image)")
    last = n - 2  # where EOI starts: headers must end before it
    i = 2
    size: tuple[int, int] | None = None
    while True:
        if i + 4 > last:
            raise BadImage(f"segments run into the end at byte {i} before a scan (SOS)")
        if data[i] != 0xFF:
            raise BadImage(f"expected a marker at byte {i}, found 0x{data[i]:02x}")
        marker = data[i + 1]
        kind = _MARKERS[marker]
        if kind == _SEGMENT:
            length = (data[i + 2] << 8) | data[i + 3]
            i += 2 + length
            if length < 2 or i > last:
                raise BadImage(f"segment 0xff{marker:02x} ending at byte {i} has length {length}, past the end")
            continue
        if kind == _FILL:
            i += 1
            continue
        if kind == _STANDALONE:
            i += 2
            continue
        if kind in (_BAD, _SOF_UNSUPPORTED):
            what = "unsupported JPEG process (frame marker" if kind == _SOF_UNSUPPORTED else "unexpected marker ("
            raise BadImage(f"{what} 0xff{marker:02x} at byte {i})")
        length = (data[i + 2] << 8) | data[i + 3]
        end = i + 2 + length
        if length < 2 or end > last:
            raise BadImage(f"segment 0xff{marker:02x} at byte {i} has length {length}, past the end")
        if kind == _SOS:
            if size is None:
                raise BadImage("a scan (SOS) before any frame header (SOF)")
            if length < 8 or end >= last:
                raise BadImage(f"scan header at byte {i} is malformed or has no scan data")
            return size
        # kind == _SOF
        if size is not None:
            raise BadImage(f"a second frame header at byte {i}")
        if length < 11:
            raise BadImage(f"frame header at byte {i} is too short ({length})")
        components = data[i + 9]
        if data[i + 4] != 8 or components not in (1, 3) or length != 8 + 3 * components:
            raise BadImage(f"frame header at byte {i}: precision {data[i + 4]}, {components} components, "
                           f"length {length} (need 8-bit, 1 or 3 components)")
        height = (data[i + 5] << 8) | data[i + 6]
        width = (data[i + 7] << 8) | data[i + 8]
        if width == 0 or height == 0:
            raise BadImage(f"frame header declares {width}x{height}")
        size = (width, height)
        i = end


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IHDR = b"\x00\x00\x00\x0dIHDR"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_U32 = struct.Struct(">I")
_IHDR = struct.Struct(">IIBBBBBI")


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a structurally whole PNG; raises :class:`BadImage` on garbage or truncation.

    Checks the signature, IHDR (fields and CRC), that the chunks chain up to IEND as the very last bytes
    and that there is image data (IDAT); the compressed data itself is not inflated.
    """
    n = len(data)
    if n < 57 or data[:8] != _PNG_SIGNATURE:  # signature + IHDR (25) + a minimal IDAT (12) + IEND (12)
        raise BadImage("no PNG signature, or too short for a PNG")
    if data[8:16] != _PNG_IHDR:
        raise BadImage("the first chunk is not a 13-byte IHDR")
    width, height, depth, colour, compression, filtering, interlace, crc = _IHDR.unpack_from(data, 16)
    if zlib.crc32(data[12:29]) != crc:
        raise BadImage("IHDR CRC mismatch")
    if width == 0 or height == 0 or depth not in _PNG_DEPTHS.get(colour, ()) or compression or filtering \
            or interlace > 1:
        raise BadImage(f"IHDR: {width}x{height}, bit depth {depth}, colour type {colour}, compression {compression}, "
                       f"filter {filtering}, interlace {interlace}")
    if data[n - 12:] != _PNG_IEND:
        raise BadImage("no IEND chunk at the end (truncated, or bytes after the image)")
    i, last, idat = 33, n - 12, False
    while i < last:
        if i + 12 > last:
            raise BadImage(f"chunk at byte {i} runs past IEND")
        length = _U32.unpack_from(data, i)[0]
        kind = data[i + 4:i + 8]
        if kind == b"IDAT":
            idat = True
        elif kind == b"IEND" or kind == b"IHDR":
            raise BadImage(f"unexpected {kind.decode()} chunk at byte {i}")
        i += 12 + length
    if i != last:
        raise BadImage(f"chunk lengths do not add up to IEND (at byte {i}, IEND at {last})")
    if not idat:
        raise BadImage("no IDAT chunk (no image data)")
    return width, height


# -- lenient: the size from the header alone (the learner reads stored rows; a cut body shows at decode) ---------

# JPEG start-of-frame markers (they carry the frame's size); C4, C8 and CC are other segments.
_JPEG_SOF_ANY = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def image_dimensions(data: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    r"""``(width, height)`` read from a JPEG's frame header or a PNG's IHDR, or None when the bytes are neither
    (or the header is cut). A few segment hops: ~10x cheaper than ``PIL.Image.open``.

    >>> image_dimensions(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x40\x00\x00\x00\x20")
    (64, 32)
    """
    data = bytes(data[:65536]) if not isinstance(data, bytes) else data
    if data[:8] == _PNG_SIGNATURE:
        if len(data) >= 24 and data[12:16] == b"IHDR":
            return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        return None
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in _JPEG_SOF_ANY:
            if i + 9 > n:
                return None
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        if marker in (0xDA, 0xD9):  # scan or end before any frame header
            return None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


# -- synthetic frames ------------------------------------------------------------------------------------------------

def jpeg_pool(n: int, size: int, seed: int = 0) -> list[bytes]:
    """Pre-encoded JPEG frames that look like a tabletop scene (smooth background, a few blobs)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    frames = []
    for _ in range(n):
        img = np.zeros((size, size, 3), np.float32)
        for c in range(3):
            img[..., c] = 90 + 60 * np.sin(rng.uniform(1, 4) * xx + rng.uniform(0, 6)) * np.cos(rng.uniform(1, 4) * yy)
        for _ in range(3):
            cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.15)
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
            img[mask] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 6, img.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        frames.append(buf.getvalue())
    return frames
