"""A screen recording in, its structure out: shots, chapters, keyframes,
quality and pacing.

One pass decodes the video in batches and runs the frame kernels, keeping a
handful of numbers per frame; everything after that works on those series.
Per-frame values do not depend on the batch size (kernels carry their state
across batches), so neither does the result.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import statistics
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import msgspec
import numpy as np
import torch

from dailydoco.protocol.video import (
    ACTIVITIES,
    CHAPTER_S_MIN,
    ActivitySpan,
    CHAPTERS_MIN,
    Chapter,
    Keyframe,
    Pacing,
    PerformancePrediction,
    QualityReport,
    Shot,
    VideoAnalysis,
)

from . import frame_kernels as k
from .crops import plan_crops, summarise, write_variants
from .decode import Colour, VideoError, analysis_size, decode_batches, open_video, prefetched
from .thumbnails import write_thumbnails

log = logging.getLogger("dailydoco.video")

BATCH_FRAMES_DEFAULT = 32
CUT_THRESHOLD = 27.0  # PySceneDetect ContentDetector's default, on the same score scale
SCENE_FRAMES_MIN = 15  # ContentDetector's default min_scene_len
FADE_BLACK_LUMA = 20.0  # a frame whose mean luma is at most this is "black" (video black is 16)
DISSOLVE_SCORE_MIN = 2.0  # per-frame change inside a dissolve: steady, well above codec noise...
DISSOLVE_FRAMES_MIN, DISSOLVE_FRAMES_MAX = 8, 45  # ...lasting a quarter second to a second and a half
DISSOLVE_PHASH_BITS_MIN = 16  # and the screens either side of it differ
KEYFRAME_PHASH_BITS_MIN = 10  # a keyframe this close to a chosen one is a near-duplicate
ADAPTIVE_THRESHOLD = 3.0  # AdaptiveDetector's: a frame changing 3x its neighbours' mean is a cut...
ADAPTIVE_CONTENT_MIN = 15.0  # ...when it also changes at least this much (catches low-contrast window switches)
TYPING_MOTION_SHARE_MAX = 0.02  # a keystroke or the cursor changes under 2% of the screen
ACTIVITY_SMOOTH_S = 0.5  # per-frame activity labels take the majority of this window
ACTIVITY_SPAN_S_MIN = 0.5  # shorter spans join the one before them
IDLE_SPAN_S_MIN = 2.0  # a still screen counts as a dwell from this long
SHAKE_MOTION_SHARE_MIN = 0.5  # inside a shot, over half the screen changing at once
SHARPNESS_REFERENCE = 2_000.0  # variance of the Laplacian of crisp text at analysis size
BACKENDS = ("eager", "compile")
_COMPILED_STEPS: dict[str, Callable] = {}
# Compiled graphs, by what they are built for (see _graph_key): those built
# and run, and those a background thread is building.
_BUILT_GRAPHS: set[tuple] = set()
_BUILDING_GRAPHS: set[tuple] = set()
_GRAPHS_LOCK = threading.Lock()
GRAPH_BUILD_NICENESS = 19
# A build whose process is killed while it links (a video processor killed
# mid-job, as test_a_job_survives_its_processor_being_killed does) leaves a
# truncated shared object in inductor's cache on disk, which inductor takes
# as built: every later build on the machine failed loading it ("file too
# short", CI in session 40), and analyses stayed eager for good. A build that
# fails so removes the file and builds again, up to this many files.
BROKEN_BUILDS_REMOVED_MAX = 8
# torch's thread count is the whole process's, and a graph builds beside an
# analysis: set while any runs, put back when the last ends.
_TORCH_THREADS_LOCK = threading.Lock()
_torch_threads_users = 0
_torch_threads_before = 0
QUALITY_WEIGHTS = {"sharpness": 0.35, "exposure": 0.25, "stability": 0.2, "information": 0.2}


@dataclass
class FrameSeries:
    """Per-frame results of the kernels, gathered batch by batch."""

    parts: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    backend: str = "eager"  # the step that computed them

    def add(self, **values: torch.Tensor) -> None:
        for name, value in values.items():
            self.parts.setdefault(name, []).append(value.cpu())

    def array(self, name: str) -> np.ndarray:
        return torch.cat(self.parts[name]).numpy()


def choose_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def choose_backend(requested: str | None, device: torch.device) -> str:
    """`compile` (torch.compile: fused loops, about twice eager's speed on
    this project's CPU) where it can build, else `eager`. TensorRT is not
    wired in: no machine here has it."""
    if requested in BACKENDS:
        return requested
    if requested not in (None, "auto"):
        raise ValueError(f"backend {requested!r} is not one of auto, {', '.join(BACKENDS)}")
    if device.type == "cpu" and shutil.which(os.environ.get("CXX", "g++")) is None:
        return "eager"  # inductor builds C++ on the CPU
    return "compile"


def _compiled_step(device: torch.device):
    """The compiled batch step for a kind of device, built once per process."""
    if device.type not in _COMPILED_STEPS:
        # Fixed shapes (the last batch is padded): one graph per batch size,
        # cached on disk by inductor. On the CPU the kernels run on the
        # host's own threads: the C++ wrapper runs the whole graph without
        # the GIL, so decoding (a thread of its own) overlaps it, where the
        # default Python wrapper held the GIL through every kernel and the
        # two ran one after the other. On CUDA the host only launches.
        _COMPILED_STEPS[device.type] = torch.compile(
            k.batch_step, dynamic=False, options={"cpp_wrapper": device.type == "cpu"})
    return _COMPILED_STEPS[device.type]


@contextmanager
def _torch_threads(count: int):
    global _torch_threads_users, _torch_threads_before
    with _TORCH_THREADS_LOCK:
        if _torch_threads_users == 0:
            _torch_threads_before = torch.get_num_threads()
        _torch_threads_users += 1
        torch.set_num_threads(count)
    try:
        yield
    finally:
        with _TORCH_THREADS_LOCK:
            _torch_threads_users -= 1
            if _torch_threads_users == 0:
                torch.set_num_threads(_torch_threads_before)


def _graph_key(device: torch.device, batch_frames: int, luma: torch.Tensor, chroma: torch.Tensor,
               colour: Colour) -> tuple:
    """What a compiled step is built for: with `dynamic=False`, each shape
    of batch and each colour setting (Python values, baked in) is a graph."""
    return device.type, batch_frames, tuple(luma.shape[1:]), tuple(chroma.shape[1:]), colour.bt709, colour.full_range


def _build_graph(path: str | Path, batch_frames: int, device: torch.device, key: tuple) -> None:
    """Compile the step for `key` by running the first batch of `path` through it."""
    # Behind the analyses (Linux: a thread's own niceness; the compiler's
    # worker processes, started from this thread, inherit it). That orders
    # the cores, not the GIL, which the compiler holds for most of its
    # minute: what an analysis beside it waits for the GIL, and what cuts
    # that, is at ANALYSIS_GIL_SWITCH_INTERVAL_S (actors/video_processor.py).
    # Tried and not kept: the compiler in a process of its own, filling
    # inductor's cache on disk for this one to load; the load here still
    # took over a minute, with the same waits.
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), GRAPH_BUILD_NICENESS)
    try:
        run_kernels(path, batch_frames, device, backend="compile", batches_max=1)
        log.info("the compiled analysis step for %s is built", key)
    except Exception:  # noqa: BLE001 - analyses go on eagerly; the next one tries again
        log.exception("building the compiled analysis step for %s failed; analyses stay eager", key)
    finally:
        with _GRAPHS_LOCK:
            _BUILDING_GRAPHS.discard(key)


def _step_for(key: tuple, backend: str, wait_for_compile: bool, path: str | Path, batch_frames: int,
              device: torch.device) -> tuple[Callable, str]:
    """The step that runs an analysis, and its backend's name. Not waiting
    for a graph not yet built, the analysis runs eagerly while a thread
    builds it for the ones after: compiling takes a minute or more on the
    CPU (83 s on this project's 2 cores, cold cache) for an analysis that
    takes seconds eagerly."""
    if backend != "compile":
        return k.batch_step, "eager"
    with _GRAPHS_LOCK:
        if wait_for_compile or key in _BUILT_GRAPHS:
            return _compiled_step(device), "compile"
        if key not in _BUILDING_GRAPHS:
            _BUILDING_GRAPHS.add(key)
            threading.Thread(target=_build_graph, args=(path, batch_frames, device, key),
                             name="dailydoco-compile", daemon=True).start()
    return k.batch_step, "eager"


def _first_compiled_call(step: Callable, *args, **kwargs):
    """`step(*args, **kwargs)`, removing broken builds from inductor's cache
    (BROKEN_BUILDS_REMOVED_MAX) until it runs."""
    for _ in range(BROKEN_BUILDS_REMOVED_MAX):
        try:
            return step(*args, **kwargs)
        except Exception as exc:
            broken = _broken_cached_build(exc)
            if broken is None:
                raise
            log.warning("inductor's cache held a broken build, %s (a build killed while linking); removed, "
                        "building it again", broken)
            broken.unlink(missing_ok=True)
    return step(*args, **kwargs)


def _broken_cached_build(exc: BaseException) -> Path | None:
    """The shared object in inductor's cache that `exc` (or what it wraps)
    failed to load, if that is what failed."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ImportError) and exc.path and exc.path.endswith(".so") \
                and Path(exc.path).resolve().is_relative_to(Path(cache_dir()).resolve()):
            return Path(exc.path)
        # torch's BackendCompilerFailed keeps what the compiler raised as
        # inner_exception, and is re-raised `from None`.
        exc = getattr(exc, "inner_exception", None) or exc.__cause__ or exc.__context__
    return None


def run_kernels(path: str | Path, batch_frames: int = BATCH_FRAMES_DEFAULT, device: torch.device | None = None,
                progress: Callable[[int, int], None] | None = None, backend: str = "eager",
                wait_for_compile: bool = True, batches_max: int | None = None):
    """Decode and run every frame kernel (or the first `batches_max`
    batches); returns (info, series). `wait_for_compile`: see _step_for."""
    device = device or choose_device()
    if device.type == "cpu":
        # Decoding and the kernels run side by side on threads of their own
        # and share the cores. On two cores, one FFmpeg thread and one torch
        # thread finished a 1080p video 25% sooner than FFmpeg's and torch's
        # own choices (two each), which contended. A graph built beside an
        # analysis gets the count of the analyses it will run in.
        cores = os.cpu_count() or 1
        decode_threads = max(1, cores // 2)
        torch_threads = max(1, cores - decode_threads)
    else:
        decode_threads = 0  # the device computes: FFmpeg takes every core
        torch_threads = torch.get_num_threads()
    with _torch_threads(torch_threads):
        return _run_kernels(path, batch_frames, device, progress, backend, wait_for_compile, batches_max,
                            decode_threads)


def _run_kernels(path, batch_frames, device, progress, backend, wait_for_compile, batches_max, decode_threads):
    """run_kernels, with torch's threads set."""
    container, stream, info = open_video(path, decode_threads)
    series = FrameSeries()
    step = key = None
    previous_hsv = previous_luma = None
    expected = max(1, round(info.duration_s * float(info.fps)))
    try:
        with torch.inference_mode():
            for batches, batch in enumerate(prefetched(decode_batches(container, stream, info, batch_frames))):
                if batches == batches_max:
                    break
                luma, chroma = batch.luma.to(device), batch.chroma.to(device)
                colour = {"bt709": batch.colour.bt709, "full_range": batch.colour.full_range}
                if step is None:  # the first batch tells what the step is for
                    key = _graph_key(device, batch_frames, luma, chroma, batch.colour)
                    step, series.backend = _step_for(key, backend, wait_for_compile, path, batch_frames, device)
                n = luma.shape[0]
                if series.backend == "compile" and n < batch_frames:  # repeat the last frame: same shapes, same graph
                    luma = torch.cat((luma, luma[-1:].expand(batch_frames - n, -1, -1)))
                    chroma = torch.cat((chroma, chroma[-1:].expand(batch_frames - n, -1, -1, -1)))
                if previous_hsv is None:
                    previous_hsv = k.rgb_to_hsv(k.yuv_to_rgb(luma[:1], chroma[:1], **colour))[0]
                    previous_luma = luma[0]
                    previous_dwell = torch.zeros((), dtype=torch.int64, device=device)
                if series.backend == "compile" and batches == 0:  # the call that builds it, or loads it built
                    out = _first_compiled_call(step, luma, chroma, previous_hsv, previous_luma, previous_dwell,
                                               **colour)
                    with _GRAPHS_LOCK:
                        _BUILT_GRAPHS.add(key)
                else:
                    out = step(luma, chroma, previous_hsv, previous_luma, previous_dwell, **colour)
                # Padding repeats frame n-1, so the batch's last HSV frame is that one's.
                previous_hsv, previous_luma, previous_dwell = out.pop("last_hsv"), luma[n - 1], out["dwell"][n - 1]
                series.add(**{name: value[:n] for name, value in out.items()})
                if progress:
                    progress(batch.first_index + n, expected)
    finally:
        container.close()
    if not series.parts:
        raise VideoError(f"{Path(path).name}: the video stream holds no frames")
    return info, series


# --- shots -------------------------------------------------------------------------


def detect_transitions(series: dict[str, np.ndarray]) -> list[tuple[int, str]]:
    """(first frame of the new shot, kind), in order. Reads the per-frame
    content score, adaptive ratio, mean luma, pHash and scroll shift."""
    content, mean_luma, phash = series["content"], series["mean_luma"], series["phash"]
    scrolling = series["scroll"] != 0  # a scrolled page changes a lot, steadily, and is no transition
    n = len(content)
    found: list[tuple[int, str]] = []
    # Fades: runs of black frames; the shot changes at the darkest one.
    black = mean_luma <= FADE_BLACK_LUMA
    blocked = np.zeros(n, bool)  # frames inside a fade or dissolve: no cut is reported there
    i = 0
    while i < n:
        if black[i]:
            j = i
            while j < n and black[j]:
                j += 1
            if i > 0 and j < n:  # a video that starts or ends in black has no fade *between* shots
                found.append((i + int(np.argmin(mean_luma[i:j])), "fade"))
            blocked[max(0, i - SCENE_FRAMES_MIN // 2): min(n, j + SCENE_FRAMES_MIN // 2)] = True
            i = j
        else:
            i += 1
    # Dissolves: a steady, moderate change for a short while, between screens that differ.
    dissolving = (content >= DISSOLVE_SCORE_MIN) & (content < CUT_THRESHOLD) & ~scrolling
    i = 1
    while i < n:
        if dissolving[i] and not blocked[i]:
            j = i
            while j < n and dissolving[j]:
                j += 1
            before, after = phash[i - 1], phash[min(j, n - 1)]
            if DISSOLVE_FRAMES_MIN <= j - i <= DISSOLVE_FRAMES_MAX and \
                    k.hamming(int(before), int(after)) >= DISSOLVE_PHASH_BITS_MIN:
                found.append(((i + j) // 2, "dissolve"))
                blocked[i:j] = True
            i = j
        else:
            i += 1
    # Cuts: ContentDetector's rule or AdaptiveDetector's, at most one per
    # SCENE_FRAMES_MIN frames, never on a frame the previous one scrolled into.
    adaptive = (series["adaptive_ratio"] >= ADAPTIVE_THRESHOLD) & (content >= ADAPTIVE_CONTENT_MIN)
    last = -SCENE_FRAMES_MIN
    for frame in np.flatnonzero(((content >= CUT_THRESHOLD) | adaptive) & ~scrolling):
        if not blocked[frame] and frame - last >= SCENE_FRAMES_MIN:
            found.append((int(frame), "cut"))
            last = int(frame)
    return sorted(found)


def shots_from(transitions: list[tuple[int, str]], frames: int, fps: float) -> list[Shot]:
    starts = [(0, "start")] + [t for t in transitions if 0 < t[0] < frames]
    shots = []
    for (start, kind), (end, _) in zip(starts, starts[1:] + [(frames, "end")], strict=True):
        shots.append(Shot(start_frame=start, end_frame=end, start_s=round(start / fps, 3),
                          end_s=round(end / fps, 3), starts_with=kind))
    return shots


# --- chapters, keyframes, quality, pacing ----------------------------------------------


def chapters_from(shots: list[Shot], content: np.ndarray, duration_s: float) -> tuple[list[Chapter], str | None]:
    """YouTube's rules: the first at 0:00, at least three, each at least 10 s.
    Strongest shot changes first; even spacing where the shots leave too few."""
    if duration_s < CHAPTERS_MIN * CHAPTER_S_MIN:
        return [], f"{duration_s:.1f} s is too short for {CHAPTERS_MIN} chapters of {CHAPTER_S_MIN:g} s"
    starts = [0.0]

    def fits(t: float) -> bool:
        return duration_s - t >= CHAPTER_S_MIN and all(abs(t - s) >= CHAPTER_S_MIN for s in starts)

    strength = {s.start_s: (float(content[s.start_frame]) if s.starts_with == "cut" else CUT_THRESHOLD)
                for s in shots[1:]}
    for t in sorted(strength, key=strength.get, reverse=True):
        if fits(t):
            starts.append(t)
    parts = CHAPTERS_MIN
    while len(starts) < CHAPTERS_MIN:
        for i in range(1, parts):
            t = round(duration_s * i / parts, 3)
            if fits(t):
                starts.append(t)
        parts += 1
    starts.sort()
    return [Chapter(start_s=t, title=f"Part {i + 1}") for i, t in enumerate(starts)], None


def keyframes_from(shots: list[Shot], sharpness: np.ndarray, phash: np.ndarray, fps: float) -> list[Keyframe]:
    """The sharpest frame of each shot's middle, unless it repeats an earlier keyframe."""
    chosen: list[Keyframe] = []
    for shot in shots:
        margin = (shot.end_frame - shot.start_frame) // 10
        lo, hi = shot.start_frame + margin, max(shot.start_frame + margin + 1, shot.end_frame - margin)
        frame = lo + int(np.argmax(sharpness[lo:hi]))
        h = int(phash[frame])
        if any(k.hamming(h, int(c.phash, 16)) < KEYFRAME_PHASH_BITS_MIN for c in chosen):
            continue
        chosen.append(Keyframe(frame=frame, time_s=round(frame / fps, 3), sharpness=round(float(sharpness[frame]), 1),
                               phash=f"{h & (2**64 - 1):016x}"))
    return chosen


def quality_from(series: dict[str, np.ndarray], boundaries: set[int]) -> QualityReport:
    sharp = float(np.median(series["sharpness"]))
    inside = np.array([i not in boundaries for i in range(len(series["motion_share"]))])
    parts = {
        "sharpness": min(1.0, math.log1p(sharp) / math.log1p(SHARPNESS_REFERENCE)),
        "exposure": float(np.mean(series["mean_luma"] > FADE_BLACK_LUMA)),
        "stability": 1.0 - float(np.mean(series["motion_share"][inside] >= SHAKE_MOTION_SHARE_MIN)) if inside.any()
        else 1.0,
        "information": float(np.mean(series["entropy"])) / 8.0,
    }
    score = sum(QUALITY_WEIGHTS[name] * value for name, value in parts.items())
    return QualityReport(score=round(100 * score), **{name: round(100 * v) for name, v in parts.items()})


def activity_from(series: dict[str, np.ndarray], fps: float) -> list[ActivitySpan]:
    """What the user is doing, as spans: idle (the screen still for at least
    IDLE_SPAN_S_MIN), scrolling, typing (small changes: keystrokes, the
    cursor) or motion (anything larger: pop-ups, dragging, video). Each
    frame's label is the majority of its half-second neighbourhood, so a
    keystroke every few frames reads as typing, not flickering idle."""
    n = len(series["dwell"])
    still = series["dwell"] > 0
    long_still = _runs_at_least(still, round(IDLE_SPAN_S_MIN * fps))
    # A short still moment (between keystrokes) does not vote; a long one is idle outright.
    label = np.where(series["scroll"] != 0, 1,
                     np.where(still, -1, np.where(series["motion_share"] <= TYPING_MOTION_SHARE_MAX, 2, 3)))
    window = max(1, round(ACTIVITY_SMOOTH_S * fps)) | 1
    votes = np.stack([np.convolve(label == kind, np.ones(window), mode="same") for kind in range(len(ACTIVITIES))])
    votes[0] = np.where(long_still, window + 1, 0)
    smooth = np.where(votes.sum(axis=0) > 0, votes.argmax(axis=0), 0)  # no vote at all: still
    spans: list[list[int]] = []  # [kind, start, end]
    for start in np.flatnonzero(np.diff(smooth, prepend=-1)):
        spans.append([int(smooth[start]), int(start), n])
        if len(spans) > 1:
            spans[-2][2] = int(start)
    merged: list[list[int]] = []
    for span in spans:
        if merged and (span[2] - span[1] < ACTIVITY_SPAN_S_MIN * fps or span[0] == merged[-1][0]):
            merged[-1][2] = span[2]
        else:
            merged.append(span)
    return [ActivitySpan(kind=ACTIVITIES[kind], start_s=round(a / fps, 3), end_s=round(b / fps, 3))
            for kind, a, b in merged]


def _runs_at_least(mask: np.ndarray, length: int) -> np.ndarray:
    """The frames of `mask` that lie in a run of at least `length` True frames."""
    out = np.zeros_like(mask)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
    for start, end in zip(edges[::2], edges[1::2], strict=True):
        if end - start >= length:
            out[start:end] = True
    return out


def pacing_from(shots: list[Shot], series: dict[str, np.ndarray], fps: float) -> Pacing:
    lengths = [s.end_s - s.start_s for s in shots]
    minutes = sum(lengths) / 60
    return Pacing(shots=len(shots), shots_per_minute=round(len(shots) / minutes, 2) if minutes else 0.0,
                  shot_s_mean=round(statistics.fmean(lengths), 3), shot_s_median=round(statistics.median(lengths), 3),
                  idle_share=round(float(np.mean(series["dwell"] > 0)), 4),
                  longest_idle_s=round(int(series["dwell"].max()) / fps, 3),
                  scrolling_share=round(float(np.mean(series["scroll"] != 0)), 4),
                  text_density_mean=round(float(np.mean(series["text_density"])), 4))


def predict(quality: QualityReport, pacing: Pacing) -> PerformancePrediction:
    """Heuristic: viewers stay for crisp video that changes every 5-20 s and
    drift off during long still stretches. Not fitted to any outcome data."""
    pace = math.exp(-abs(math.log(max(pacing.shot_s_median, 0.1) / 10.0)))
    dwell = 1.0 / (1.0 + pacing.longest_idle_s / 60.0)
    share = (quality.score / 100) * (0.5 + 0.3 * pace + 0.2 * dwell)
    return PerformancePrediction(method="heuristic", expected_watch_share=round(min(1.0, share), 3))


def analyze(path: str | Path, batch_frames: int = BATCH_FRAMES_DEFAULT, device: str | None = None,
            progress: Callable[[int, int], None] | None = None, backend: str | None = None,
            thumbnails_dir: str | Path | None = None, variants_dir: str | Path | None = None,
            wait_for_compile: bool = True) -> VideoAnalysis:
    """The whole analysis; JPEG thumbnails of the keyframes and the encoded
    platform variants are written only when given a folder for them.
    `wait_for_compile=False`: see _step_for; the result's `backend` says
    which step ran."""
    dev = choose_device(device)
    info, series = run_kernels(path, batch_frames, dev, progress, choose_backend(backend, dev), wait_for_compile)
    arrays = {name: series.array(name) for name in series.parts}
    arrays["adaptive_ratio"] = k.adaptive_ratios(torch.from_numpy(arrays["content"])).numpy()
    frames, fps = len(arrays["content"]), float(info.fps)
    duration_s = frames / fps
    transitions = detect_transitions(arrays)
    shots = shots_from(transitions, frames, fps)
    chapters, note = chapters_from(shots, arrays["content"], duration_s)
    quality = quality_from(arrays, {s.start_frame for s in shots})
    pacing = pacing_from(shots, arrays, fps)
    keyframes = keyframes_from(shots, arrays["sharpness"], arrays["phash"], fps)
    if thumbnails_dir is not None:
        written = write_thumbnails(path, [kf.frame for kf in keyframes], thumbnails_dir)
        keyframes = [msgspec.structs.replace(kf, thumbnail=str(p)) for kf, p in zip(keyframes, written, strict=True)]
    plans = plan_crops(info.width, info.height, arrays["saliency_x"], arrays["saliency_y"], shots, fps)
    encoded = write_variants(path, plans, variants_dir) if variants_dir is not None else [None] * len(plans)
    w, h = analysis_size(info.width, info.height)
    return VideoAnalysis(
        width=info.width, height=info.height, fps=round(fps, 3), frames=frames, duration_s=round(duration_s, 3),
        analysis_width=w, analysis_height=h, device=str(dev), backend=series.backend, shots=shots, chapters=chapters,
        chapters_note=note, keyframes=keyframes,
        quality=quality, pacing=pacing, activity=activity_from(arrays, fps),
        variants=[summarise(plan, fps, out) for plan, out in zip(plans, encoded, strict=True)], prediction=predict(quality, pacing),
        content_scores=[round(float(x), 3) for x in arrays["content"]])
