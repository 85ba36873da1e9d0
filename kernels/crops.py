"""Platform variants: 16:9, 9:16 and 1:1 crops that follow the saliency,
planned from the per-frame saliency profiles and encoded with libx264.

The plan works shot by shot: inside a shot the crop window eases towards
where the saliency is (smoothed over a second, with a dead zone so it does
not twitch at every keystroke, and a speed limit so a pan is a pan, not a
jump); at a shot change it jumps, as an editor's cut would.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from dailydoco.protocol.video import CROP_ASPECTS, CropVariant, Shot

from .decode import VideoError, open_video, plane_array

CROP_SMOOTH_S = 1.0  # saliency averaged over this much time either side before placing the window
CROP_DEADZONE_SHARE = 0.06  # the window stays put until its target moves this share of the frame
CROP_PAN_SHARE_PER_S = 0.5  # and then pans at most half the frame a second
CROP_PATH_SAMPLES_PER_S = 1  # the crop's position, kept in the result once a second
VARIANT_CRF = 23  # libx264's default quality
VARIANT_PRESET = "veryfast"


@dataclass(frozen=True)
class CropPlan:
    aspect: str
    width: int  # crop size in source pixels, even (4:2:0)
    height: int
    x: np.ndarray  # (frames,) left edge per frame, even
    y: np.ndarray  # (frames,) top edge per frame, even


def _even(value: float) -> int:
    return max(2, int(value) // 2 * 2)


def crop_size(width: int, height: int, aspect: str) -> tuple[int, int]:
    """The largest crop of `aspect` ("W:H") inside a width x height frame, even-sided."""
    aw, ah = (int(part) for part in aspect.split(":"))
    if width * ah > height * aw:  # the frame is wider than the aspect: full height, narrower
        return _even(height * aw / ah), _even(height)
    return _even(width), _even(width * ah / aw)


def _place(profile: np.ndarray, window_share: float, span: int, window: int, shots: list[Shot],
           fps: float) -> np.ndarray:
    """Left (or top) edge per frame, in source pixels, of a `window`-pixel
    crop along an axis of `span` pixels, from that axis's saliency profile."""
    frames, bins = profile.shape
    if window >= span:
        return np.zeros(frames, np.int64)
    width_bins = max(1, round(window_share * bins))
    reach = max(0, round(CROP_SMOOTH_S * fps))
    deadzone, speed = CROP_DEADZONE_SHARE * span, CROP_PAN_SHARE_PER_S * span / fps
    edges = np.empty(frames, np.float64)
    for shot in shots:
        a, b = shot.start_frame, shot.end_frame
        # Centred moving average of the profile within the shot.
        sums = np.cumsum(np.vstack((np.zeros((1, bins)), profile[a:b])), axis=0)
        lo, hi = np.maximum(0, np.arange(b - a) - reach), np.minimum(b - a, np.arange(b - a) + reach + 1)
        smooth = (sums[hi] - sums[lo]) / (hi - lo)[:, None]
        # Mass of every window position, per frame: a box sum over the bins.
        boxes = np.cumsum(np.hstack((np.zeros((b - a, 1)), smooth)), axis=1)
        mass = boxes[:, width_bins:] - boxes[:, :-width_bins]
        targets = (mass.argmax(axis=1) + width_bins / 2) / bins * span - window / 2
        targets = np.clip(targets, 0, span - window)
        current = targets[0]  # a new shot: jump
        for i, target in enumerate(targets):
            if abs(target - current) > deadzone:
                current += np.clip(target - current, -speed, speed)
            edges[a + i] = current
    return (np.clip(edges, 0, span - window).astype(np.int64) // 2) * 2


def plan_crops(width: int, height: int, saliency_x: np.ndarray, saliency_y: np.ndarray, shots: list[Shot],
               fps: float) -> list[CropPlan]:
    plans = []
    for aspect in CROP_ASPECTS:
        cw, ch = crop_size(width, height, aspect)
        plans.append(CropPlan(aspect, cw, ch, _place(saliency_x, cw / width, width, cw, shots, fps),
                              _place(saliency_y, ch / height, height, ch, shots, fps)))
    return plans


def summarise(plan: CropPlan, fps: float, path: Path | None) -> CropVariant:
    step = max(1, round(fps / CROP_PATH_SAMPLES_PER_S))
    return CropVariant(aspect=plan.aspect, width=plan.width, height=plan.height,
                       path=str(path) if path else None,
                       x_per_s=[int(v) for v in plan.x[::step]], y_per_s=[int(v) for v in plan.y[::step]])


def write_variants(video: str | Path, plans: list[CropPlan], folder: str | Path) -> list[Path]:
    """One H.264 MP4 per plan, cropped frame by frame, in one decoding pass.
    Crops are cut from the decoded yuv420p planes directly (no RGB), at the
    source's resolution; audio is copied into each variant unchanged."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    container, stream, info = open_video(video)
    audio = container.streams.audio[0] if container.streams.audio else None
    paths = [folder / f"{Path(video).stem}-{plan.aspect.replace(':', 'x')}.mp4" for plan in plans]
    outputs = []
    try:
        for plan, path in zip(plans, paths, strict=True):
            out = av.open(str(path), "w")
            video_out = out.add_stream("libx264", rate=Fraction(info.fps))
            video_out.width, video_out.height, video_out.pix_fmt = plan.width, plan.height, "yuv420p"
            video_out.options = {"crf": str(VARIANT_CRF), "preset": VARIANT_PRESET}
            audio_out = out.add_stream_from_template(audio) if audio is not None else None
            outputs.append((out, video_out, audio_out))
        frames = len(plans[0].x) if plans else 0
        index = 0
        for packet in container.demux(*(s for s in (stream, audio) if s is not None)):
            if packet.stream.type == "audio":
                if packet.dts is None:
                    continue
                for out, _, audio_out in outputs:
                    packet.stream = audio_out
                    out.mux(packet)
                continue
            for frame in packet.decode():
                if index >= frames:
                    break
                yuv = frame if frame.format.name == "yuv420p" else frame.reformat(format="yuv420p")
                planes = [plane_array(p) for p in yuv.planes]
                for plan, (out, video_out, _) in zip(plans, outputs, strict=True):
                    x, y, w, h = int(plan.x[index]), int(plan.y[index]), plan.width, plan.height
                    cropped = np.concatenate((planes[0][y:y + h, x:x + w].ravel(),
                                              planes[1][y // 2:(y + h) // 2, x // 2:(x + w) // 2].ravel(),
                                              planes[2][y // 2:(y + h) // 2, x // 2:(x + w) // 2].ravel()))
                    picture = av.VideoFrame.from_ndarray(cropped.reshape(h * 3 // 2, w), format="yuv420p")
                    picture.pts = index
                    for encoded in video_out.encode(picture):
                        out.mux(encoded)
                index += 1
        for out, video_out, _ in outputs:
            for encoded in video_out.encode():
                out.mux(encoded)
    except av.error.FFmpegError as exc:
        raise VideoError(f"writing the platform variants failed: {exc}") from exc
    finally:
        for out, _, _ in outputs:
            out.close()
        container.close()
    return paths
