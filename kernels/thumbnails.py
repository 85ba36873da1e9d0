"""Thumbnails: the keyframes, decoded again at thumbnail size and written as JPEG.

The analysis keeps only analysis-size numbers per frame, so the chosen
frames are read again: one forward pass over the video that converts only
those frames, stopping after the last.
"""

from __future__ import annotations

from pathlib import Path

import av
from av.video.reformatter import VideoReformatter

from .decode import open_video

THUMBNAIL_WIDTH = 640  # YouTube's minimum custom-thumbnail width; heights follow the aspect
JPEG_QUALITY_SCALE = 3  # FFmpeg's mjpeg qscale: 2 (best) .. 31; 3 is visually lossless for screens


def write_thumbnails(video: str | Path, frames: list[int], folder: str | Path) -> list[Path]:
    """One JPEG per frame index (in `frames`' order), named by frame."""
    wanted = set(frames)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    container, stream, info = open_video(video)
    width = min(THUMBNAIL_WIDTH, info.width)
    height = max(2, round(info.height * width / info.width / 2) * 2)  # even, for 4:2:0
    scaler = VideoReformatter()
    written: dict[int, Path] = {}
    try:
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                small = scaler.reformat(frame, width, height, "yuvj420p", interpolation="AREA")
                encoder = av.CodecContext.create("mjpeg", "w")
                encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuvj420p"
                encoder.time_base = stream.time_base or 1
                # Constant quality: the quantiser pinned at both ends of its range.
                encoder.options = {"qmin": str(JPEG_QUALITY_SCALE), "qmax": str(JPEG_QUALITY_SCALE)}
                packets = encoder.encode(small) + encoder.encode(None)
                path = folder / f"frame-{index:07d}.jpg"
                path.write_bytes(b"".join(bytes(p) for p in packets))
                written[index] = path
                if len(written) == len(wanted):
                    break
    finally:
        container.close()
    return [written[f] for f in frames if f in written]
