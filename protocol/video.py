"""The video analysis result: shots, chapters, keyframes, quality, pacing."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from msgspec import Meta, Struct

from .messages import NO_CONTROL_CHARACTERS_PATTERN, UserId

CHAPTER_S_MIN = 10.0  # YouTube: each chapter at least 10 s
CHAPTERS_MIN = 3  # YouTube: at least three, the first at 0:00


class _Result(Struct, frozen=True, forbid_unknown_fields=True):
    pass


class Shot(_Result):
    start_frame: int
    end_frame: int  # exclusive
    start_s: float
    end_s: float
    starts_with: Literal["start", "cut", "fade", "dissolve"]


class Chapter(_Result):
    start_s: float
    title: str

    @property
    def youtube_timestamp(self) -> str:
        total = int(self.start_s)
        h, rem = divmod(total, 3600)
        m, s = divmod(rem, 60)
        return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Keyframe(_Result):
    frame: int
    time_s: float
    sharpness: float
    phash: str  # 16 hex digits
    thumbnail: str | None = None  # a JPEG's path, when thumbnails were asked for


class QualityReport(_Result):
    score: int  # 0-100, the weighted mean of the components
    sharpness: int  # median variance of the Laplacian, on a log scale
    exposure: int  # share of frames that are not blank (near black)
    stability: int  # share of frames inside shots without whole-screen shake
    information: int  # mean luma entropy against its 8-bit maximum


class Pacing(_Result):
    shots: int
    shots_per_minute: float
    shot_s_mean: float
    shot_s_median: float
    idle_share: float  # frames where almost nothing moved
    longest_idle_s: float  # the longest dwell on an unchanging screen
    scrolling_share: float  # frames that scrolled
    text_density_mean: float  # mean share of 4x4 blocks holding an edge: how much text is on screen


ACTIVITIES = ("idle", "scrolling", "typing", "motion")
CROP_ASPECTS = ("16:9", "9:16", "1:1")  # YouTube and LinkedIn, Shorts/Reels/TikTok, square feeds


class ActivitySpan(_Result):
    """A stretch of one kind of activity; spans cover the video end to end."""

    kind: Literal["idle", "scrolling", "typing", "motion"]  # ACTIVITIES
    start_s: float
    end_s: float


class CropVariant(_Result):
    """A platform variant: a crop of the source that follows the saliency."""

    aspect: Literal["16:9", "9:16", "1:1"]  # CROP_ASPECTS
    width: int  # crop size in source pixels
    height: int
    path: str | None  # the encoded MP4, when variants were asked for
    x_per_s: list[int]  # the crop's left edge, once a second
    y_per_s: list[int]  # its top edge


class PerformancePrediction(_Result):
    """A heuristic from pacing and quality, not a model trained on outcomes."""

    method: Literal["heuristic"]
    expected_watch_share: float  # 0..1


class VideoAnalysis(_Result):
    width: int
    height: int
    fps: float
    frames: int
    duration_s: float
    analysis_width: int
    analysis_height: int
    device: str
    backend: Literal["eager", "compile"]  # how the kernels ran (torch.compile, or eagerly)
    shots: list[Shot]
    chapters: list[Chapter]
    chapters_note: str | None  # why there are none, when there are none
    keyframes: list[Keyframe]
    quality: QualityReport
    pacing: Pacing
    activity: list[ActivitySpan]
    variants: list[CropVariant]
    prediction: PerformancePrediction
    content_scores: list[float]  # per frame, PySceneDetect ContentDetector's scale


# --- jobs ----------------------------------------------------------------------

VIDEO_UPLOAD_BYTES_MAX = 2 * 1024**3  # a long 1080p screen recording, with room
VIDEO_UPLOAD_TYPES = ("video/mp4", "video/quicktime", "video/webm", "video/x-matroska", "application/octet-stream")


class VideoJobRequest(_Result):
    """A video already on the server, under the engine's video folder."""

    user_id: UserId
    # Relative to the video folder. No control characters: no file of ours
    # has one in its name, and a NUL raised where the path is looked up.
    path: Annotated[str, Meta(min_length=1, max_length=1024, pattern=NO_CONTROL_CHARACTERS_PATTERN)]
    variants: bool = False  # also encode the 16:9, 9:16 and 1:1 variants (costs more than the analysis)


class VideoJobView(_Result):
    job_id: str
    user_id: str
    status: Literal["queued", "running", "done", "failed"]
    progress: float  # 0..1
    attempts: int
    result: VideoAnalysis | None  # its thumbnail and variant paths are relative: GET /v1/videos/{job_id}/files/{path}
    error: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
