"""Decoding with PyAV into analysis-size batches.

Only what is analysed is converted: libswscale scales each frame to
analysis size in its own yuv420p, luma is read from that Y plane, and only
the small frame is converted to RGB for the HSV kernels, so a 1080p frame
never exists in RGB.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import queue
import threading

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter

VIDEO_PIXELS_MAX = 3840 * 2160  # 4K UHD: above it, one frame's analysis no longer fits the real-time budget
VIDEO_DURATION_S_MAX = 6 * 3600  # a work session, with room
ANALYSIS_WIDTH_TARGET = 256  # PySceneDetect's auto-downscale aims at this width: the scores stay comparable
DECODE_THREADS = 0  # 0: FFmpeg picks (one per core)
PREFETCH_BATCHES = 2  # decoded batches waiting for the kernels: bounds memory


class VideoError(Exception):
    """The input cannot be analysed as a video; the message says why."""


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: Fraction
    duration_s: float
    codec: str


@dataclass(frozen=True)
class FrameBatch:
    first_index: int
    rgb: torch.Tensor  # (N, h, w, 3) uint8, on the CPU
    luma: torch.Tensor  # (N, h, w) uint8


def analysis_size(width: int, height: int) -> tuple[int, int]:
    """PySceneDetect's auto downscale (0.7): width brought to 256, aspect kept;
    narrower videos are analysed as they are."""
    if width <= ANALYSIS_WIDTH_TARGET:
        return width, height
    factor = width / ANALYSIS_WIDTH_TARGET
    return max(1, round(width / factor)), max(1, round(height / factor))


def open_video(path: str | Path) -> tuple[av.container.InputContainer, av.video.stream.VideoStream, VideoInfo]:
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path} is not a file")
    if path.stat().st_size == 0:
        raise VideoError(f"{path} is empty")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError) as exc:
        raise VideoError(f"{path.name} is not a video FFmpeg can read: {exc}") from exc
    try:
        if not container.streams.video:
            kinds = ", ".join(sorted({s.type for s in container.streams})) or "no streams"
            raise VideoError(f"{path.name} has no video stream ({kinds})")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width <= 0 or height <= 0:
            raise VideoError(f"{path.name}: video stream has no frame size")
        if width * height > VIDEO_PIXELS_MAX:
            raise VideoError(f"{path.name}: {width}x{height} is over the {VIDEO_PIXELS_MAX:,}-pixel limit (4K UHD)")
        fps = stream.average_rate or stream.guessed_rate
        if not fps:
            raise VideoError(f"{path.name}: the video stream has no frame rate")
        duration_s = float(stream.duration * stream.time_base) if stream.duration else (
            container.duration / av.time_base if container.duration else 0.0)
        if duration_s > VIDEO_DURATION_S_MAX:
            raise VideoError(f"{path.name}: {duration_s:.0f} s is over the {VIDEO_DURATION_S_MAX} s limit")
        stream.thread_type = "AUTO"
        stream.thread_count = DECODE_THREADS
        return container, stream, VideoInfo(width, height, Fraction(fps), duration_s, stream.codec_context.name)
    except BaseException:
        container.close()
        raise


def decode_batches(container, stream, info: VideoInfo, batch_frames: int) -> Iterator[FrameBatch]:
    """Every frame, in order, as analysis-size CPU batches of `batch_frames`."""
    w, h = analysis_size(info.width, info.height)
    # One reformatter per step keeps its swscale context: three times faster
    # than a fresh one per frame.
    to_small, to_rgb = VideoReformatter(), VideoReformatter()
    rgb = np.empty((batch_frames, h, w, 3), np.uint8)
    luma = np.empty((batch_frames, h, w), np.uint8)
    filled, first = 0, 0
    try:
        for frame in container.decode(stream):
            # Scale once, in the decoder's own yuv420p (the area filter: a box
            # downscale that reads every source pixel once); luma is then the
            # small frame's Y plane, and only the small frame becomes RGB.
            small = to_small.reformat(frame, w, h, "yuv420p", interpolation="AREA")
            plane = small.planes[0]
            luma[filled] = np.frombuffer(plane, np.uint8).reshape(h, plane.line_size)[:, :w]
            rgb[filled] = to_rgb.reformat(small, format="rgb24").to_ndarray()
            filled += 1
            if filled == batch_frames:
                yield FrameBatch(first, torch.from_numpy(rgb.copy()), torch.from_numpy(luma.copy()))
                first += filled
                filled = 0
    except av.error.FFmpegError as exc:
        if first + filled == 0:
            raise VideoError(f"no frame could be decoded: {exc}") from exc
        raise TruncatedVideo(first + filled, str(exc)) from exc
    if filled:
        yield FrameBatch(first, torch.from_numpy(rgb[:filled].copy()), torch.from_numpy(luma[:filled].copy()))


def prefetched(batches: Iterator[FrameBatch], depth: int = PREFETCH_BATCHES) -> Iterator[FrameBatch]:
    """Decode on a thread of its own while the caller computes: FFmpeg and
    torch both release the GIL, so the two overlap on two cores."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        slots.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put(done)
        except BaseException as exc:  # handed to the consumer, which raises it
            slots.put(exc)

    thread = threading.Thread(target=produce, name="video-decode", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


class TruncatedVideo(VideoError):
    """Decoding failed part way: `frames` decoded before the damage."""

    def __init__(self, frames: int, detail: str):
        super().__init__(f"the video is damaged or truncated after frame {frames}: {detail}")
        self.frames = frames
