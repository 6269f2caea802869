"""MP4 video files as LeRobot writes and reads them, through PyAV (FFmpeg's libraries, bundled in its wheel).

    with VideoFileWriter(path, fps=30, width=64, height=64, codec=VideoCodec()) as video:
        video.add(rgb)                                   # (H, W, 3) uint8; frame k is shown at k / fps
    frames = FrameReader(path, fps=30)
    rgb = frames.at(1.5)                                 # the frame shown at 1.5 s (files are read forward)
    video_info(path, codec)                              # the ``info`` block of the feature in meta/info.json

Every episode of a file continues the file's one stream (LeRobot's ``from_timestamp`` of an episode is where
it starts in the file), so the file's frame ``k`` is presented at exactly ``k / fps``: the rule LeRobot's
decoders use to find a frame (``round(timestamp * fps)``). The encoder settings default to LeRobot's own
(``libsvtav1``, ``yuv420p``, GOP 2, CRF 30, preset 12).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any

import av
import numpy as np

CODECS = ("libsvtav1", "h264", "hevc")
_CANONICAL = {"libsvtav1": "av1", "h264": "h264", "hevc": "hevc"}
_LIBRARY = {"h264": "libx264", "hevc": "libx265"}  # FFmpeg encoder behind LeRobot's codec name


class VideoError(ValueError):
    """A video that cannot be written or read as asked."""


@dataclass(frozen=True)
class VideoCodec:
    """Encoder settings; the defaults are LeRobot's ``VideoEncoderConfig()``."""

    vcodec: str = "libsvtav1"
    pix_fmt: str = "yuv420p"
    g: int = 2  # GOP: a key frame every g frames, so any frame decodes after at most one other
    crf: int = 30
    preset: int | str | None = None  # None: 12 for libsvtav1 (LeRobot's default), the encoder's own otherwise
    threads: int | None = None
    extra_options: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.vcodec not in CODECS:
            raise VideoError(f"video codec {self.vcodec!r}: use one of {', '.join(CODECS)}")
        if self.g < 1 or self.crf < 0:
            raise VideoError(f"GOP must be >= 1 and CRF >= 0; got g={self.g}, crf={self.crf}")

    @property
    def encoder(self) -> str:
        return _LIBRARY.get(self.vcodec, self.vcodec)

    @property
    def effective_preset(self) -> int | str | None:
        return 12 if self.preset is None and self.vcodec == "libsvtav1" else self.preset

    def options(self) -> dict[str, str]:
        """FFmpeg options, as LeRobot's ``VideoEncoderConfig.get_codec_options`` builds them."""
        opts = {"g": str(self.g), "crf": str(self.crf)}
        if self.effective_preset is not None:
            opts["preset"] = str(self.effective_preset)
        if self.vcodec == "libsvtav1":
            opts["svtav1-params"] = "fast-decode=0" + (f":lp={self.threads}" if self.threads else "")
        elif self.threads:
            opts["threads"] = str(self.threads)
        return {**opts, **self.extra_options}

    def info(self) -> dict[str, Any]:
        """The encoder's ``video.*`` keys of a feature's ``info`` block (lerobot 0.6 records them)."""
        return {"video.g": self.g, "video.crf": self.crf, "video.preset": self.effective_preset,
                "video.fast_decode": 0, "video.extra_options": dict(self.extra_options), "video.video_backend": "pyav"}


class VideoFileWriter:
    """One MP4 file of one camera, frames appended in order (bounded memory: the encoder's look-ahead only)."""

    def __init__(self, path: Path, *, fps: int, width: int, height: int, codec: VideoCodec) -> None:
        if codec.pix_fmt == "yuv420p" and (width % 2 or height % 2):
            raise VideoError(f"{width}x{height} frames: yuv420p video needs an even width and height")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.width, self.height, self.fps = width, height, fps
        self.frames = 0
        self.bytes = 0  # encoded bytes muxed so far (the file itself grows in the muxer's own steps)
        logging.getLogger("libav").setLevel(logging.ERROR)
        # faststart: the index (moov) at the front, as lerobot writes its files
        self._container = av.open(str(path), mode="w", format="mp4", options={"movflags": "faststart"})
        try:
            self._stream = self._container.add_stream(codec.encoder, rate=fps, options=codec.options())
        except (av.FFmpegError, ValueError) as exc:
            self._container.close()
            raise VideoError(f"cannot encode {codec.vcodec} here ({exc})") from exc
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = codec.pix_fmt
        self._stream.codec_context.time_base = Fraction(1, fps)

    def add(self, rgb: np.ndarray) -> None:
        if rgb.shape != (self.height, self.width, 3) or rgb.dtype != np.uint8:
            raise VideoError(f"{self.path.name}: frame {self.frames} is {rgb.shape} {rgb.dtype}, the video is "
                             f"({self.height}, {self.width}, 3) uint8")
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts = self.frames
        frame.time_base = Fraction(1, self.fps)
        self._mux(self._stream.encode(frame))
        self.frames += 1

    def _mux(self, packets: list[av.Packet]) -> None:
        self.bytes += sum(p.size for p in packets)
        self._container.mux(packets)

    @property
    def size_bytes(self) -> int:
        return self.bytes

    def close(self) -> None:
        if self._container is None:
            return
        try:
            self._mux(self._stream.encode(None))  # flush the encoder's delayed frames
        finally:
            self._container.close()
            self._container = None

    def __enter__(self) -> VideoFileWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class FrameReader:
    """The frames of one video file, read forward: ``at(t)`` returns the frame presented closest to ``t``.

    Asking for times in increasing order (episode after episode, frame after frame) decodes the file once.
    """

    def __init__(self, path: Path, *, fps: int, tolerance_s: float | None = None) -> None:
        if not path.exists():
            raise VideoError(f"video file {path} is missing")
        self.path = path
        self.tolerance_s = 0.5 / fps if tolerance_s is None else tolerance_s
        self._container = av.open(str(path), mode="r")
        self._frames: Iterator[av.VideoFrame] = self._container.decode(video=0)
        self._current: tuple[float, np.ndarray] | None = None
        self._next: tuple[float, np.ndarray] | None = self._read()

    def _read(self) -> tuple[float, np.ndarray] | None:
        try:
            frame = next(self._frames)
        except StopIteration:
            return None
        except av.FFmpegError as exc:
            raise VideoError(f"{self.path}: cannot decode ({exc})") from exc
        return float(frame.time or 0.0), frame.to_ndarray(format="rgb24")

    def at(self, t: float) -> np.ndarray:
        # Move forward while the next frame is at least as close to t as the current one.
        while self._next is not None and (self._current is None or abs(self._next[0] - t) <= abs(self._current[0] - t)):
            self._current, self._next = self._next, self._read()
        if self._current is None or abs(self._current[0] - t) > self.tolerance_s:
            found = "no frame" if self._current is None else f"the nearest frame is at {self._current[0]:.4f} s"
            raise VideoError(f"{self.path}: no frame at {t:.4f} s ({found}; tolerance {self.tolerance_s:.4f} s)")
        return self._current[1]

    def close(self) -> None:
        self._container.close()


def video_info(path: Path, codec: VideoCodec | None = None) -> dict[str, Any]:
    """The ``info`` block of a video feature, probed from the file as LeRobot's ``get_video_info`` does."""
    with av.open(str(path), mode="r") as container:
        stream = container.streams.video[0]
        info: dict[str, Any] = {
            "video.height": stream.height,
            "video.width": stream.width,
            "video.codec": stream.codec_context.codec.canonical_name,
            "video.pix_fmt": stream.codec_context.pix_fmt,
            "video.fps": int(stream.base_rate or stream.average_rate or 0),
            "video.channels": 3,
            "has_audio": bool(container.streams.audio),
        }
    if codec is not None:
        for key, value in codec.info().items():
            info.setdefault(key, value)
    info["is_depth_map"] = False
    return info


def canonical_codec(vcodec: str) -> str:
    return _CANONICAL[vcodec]
