"""Decoding with PyAV into analysis-size batches.

Only what is analysed is read: each analysis pixel takes the Y, U and V
samples at its centre straight from the decoder's yuv420p planes (a nearest
sample; PySceneDetect's cv2.resize INTER_LINEAR, without antialiasing, reads
just the 2x2 pixels around each centre), so of a 1080p frame only the 144
rows in use are touched and no full-size frame is ever scaled or converted.
Luma is the Y plane's sample; RGB is made from Y, U and V by the kernels
(`frame_kernels.yuv_to_rgb`), on the device that analyses them.

Why not libswscale: it filters every source row before it picks any, so
scaling a 1080p frame to 256x144 cost 0.15-0.35 ms here (fast bilinear to
area), as much as decoding it; the samples cost about 0.1 ms.
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

VIDEO_PIXELS_MAX = 3840 * 2160  # 4K UHD: above it, one frame's analysis no longer fits the real-time budget
VIDEO_DURATION_S_MAX = 6 * 3600  # a work session, with room
ANALYSIS_WIDTH_TARGET = 256  # PySceneDetect's auto-downscale aims at this width: the scores stay comparable
PREFETCH_BATCHES = 2  # decoded batches waiting for the kernels: bounds memory
SAMPLED_FORMATS = {"yuv420p": False, "yuvj420p": True}  # sampled as decoded; value: full range
AVCOL_SPC_BT709 = 1  # FFmpeg's AVColorSpace for BT.709; unflagged video is taken as BT.601, as swscale does
AVCOL_RANGE_JPEG = 2  # FFmpeg's AVColorRange for full-range (0-255) samples


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
class Colour:
    """How a video's YUV samples become RGB: its matrix and its range."""

    bt709: bool = False  # else BT.601
    full_range: bool = False  # else limited (video) range: Y 16-235, U and V 16-240


@dataclass(frozen=True)
class FrameBatch:
    first_index: int
    luma: torch.Tensor  # (N, h, w) uint8 Y samples, on the CPU
    chroma: torch.Tensor  # (N, 2, h, w) uint8 U and V samples at the same pixels
    colour: Colour


def analysis_size(width: int, height: int) -> tuple[int, int]:
    """PySceneDetect's auto downscale (0.7): width brought to 256, aspect kept;
    narrower videos are analysed as they are."""
    if width <= ANALYSIS_WIDTH_TARGET:
        return width, height
    factor = width / ANALYSIS_WIDTH_TARGET
    return max(1, round(width / factor)), max(1, round(height / factor))


def open_video(path: str | Path, threads: int = 0) -> tuple[av.container.InputContainer, av.video.stream.VideoStream, VideoInfo]:
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
        stream.thread_count = threads  # 0: FFmpeg picks, one per core
        return container, stream, VideoInfo(width, height, Fraction(fps), duration_s, stream.codec_context.name)
    except BaseException:
        container.close()
        raise


def sample_grid(size: int, target: int) -> np.ndarray:
    """The source index under the centre of each of `target` analysis pixels."""
    return np.minimum(((np.arange(target) + 0.5) * size / target).astype(np.intp), size - 1)


def decode_batches(container, stream, info: VideoInfo, batch_frames: int) -> Iterator[FrameBatch]:
    """Every frame, in order, as analysis-size CPU batches of `batch_frames`."""
    w, h = analysis_size(info.width, info.height)
    rows, cols = sample_grid(info.height, h), sample_grid(info.width, w)
    chroma_rows, chroma_cols = rows // 2, cols // 2  # 4:2:0: one U and one V per 2x2 luma samples
    colour: Colour | None = None
    filled, first = 0, 0
    try:
        for frame in container.decode(stream):
            if filled == 0:  # a batch's own arrays: the tensors handed on share them
                luma = np.empty((batch_frames, h, w), np.uint8)
                chroma = np.empty((batch_frames, 2, h, w), np.uint8)
            if frame.format.name not in SAMPLED_FORMATS or (frame.width, frame.height) != (info.width, info.height):
                # 10-bit, 4:4:4, a size change mid-stream: converted whole, then sampled
                frame = frame.reformat(info.width, info.height, "yuv420p")
            if colour is None:
                colour = Colour(bt709=frame.colorspace == AVCOL_SPC_BT709,
                                full_range=SAMPLED_FORMATS[frame.format.name] or frame.color_range == AVCOL_RANGE_JPEG)
            y, u, v = (plane_array(plane) for plane in frame.planes)
            luma[filled] = y[rows][:, cols]
            chroma[filled, 0] = u[chroma_rows][:, chroma_cols]
            chroma[filled, 1] = v[chroma_rows][:, chroma_cols]
            filled += 1
            if filled == batch_frames:
                yield FrameBatch(first, torch.from_numpy(luma), torch.from_numpy(chroma), colour)
                first += filled
                filled = 0
    except av.error.FFmpegError as exc:
        if first + filled == 0:
            raise VideoError(f"no frame could be decoded: {exc}") from exc
        raise TruncatedVideo(first + filled, str(exc)) from exc
    if filled:
        yield FrameBatch(first, torch.from_numpy(luma[:filled]), torch.from_numpy(chroma[:filled]), colour)


def plane_array(plane) -> np.ndarray:
    """One plane of a frame as (height, width), a view of the decoder's buffer."""
    return np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, : plane.width]


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
