"""Synthetic screen recordings with known transitions, made with PyAV.

A recording is a run of "screens" (a desktop colour, a window with a title
bar and lines of text) joined by window switches (hard cuts), fades through
black and dissolves; inside a screen the user types, scrolls, sits idle or
gets a pop-up. Everything is drawn from a seed, so tests and the benchmark
know exactly where each transition is. Nothing is downloaded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np

FADE_FRAMES = 16  # half to black, half back
DISSOLVE_FRAMES = 20
SCREEN_S_MIN, SCREEN_S_MAX = 2.5, 6.0
ACTIVITIES = ("typing", "scrolling", "idle", "popup")
SCROLL_HEIGHTS_PER_FRAME = 72  # a scroll moves the page 1/72 of the screen a frame: about 0.4 screens a second


@dataclass
class Transition:
    kind: str  # "cut", "fade" or "dissolve"
    frame: int  # cut: first frame of the new screen; fade: darkest frame; dissolve: middle frame


@dataclass
class ScreenSpan:
    activity: str  # one of ACTIVITIES
    start_frame: int
    end_frame: int  # exclusive; transitions lie between screens


@dataclass
class GroundTruth:
    frames: int
    fps: int
    transitions: list[Transition] = field(default_factory=list)
    screens: list[ScreenSpan] = field(default_factory=list)

    def frames_of(self, kind: str) -> list[int]:
        return [t.frame for t in self.transitions if t.kind == kind]


class _Screen:
    """One window layout; `render(t)` draws it `t` frames into its activity."""

    def __init__(self, rng: random.Random, width: int, height: int):
        self.w, self.h = width, height
        self.desktop = np.array(_hsv_colour(rng, 0.5, 0.6), np.uint8)
        self.window = np.array(_hsv_colour(rng, 0.08, 0.97), np.uint8)
        self.title = np.array(_hsv_colour(rng, 0.7, 0.55), np.uint8)
        self.ink = np.array(_hsv_colour(rng, 0.6, 0.25), np.uint8)
        self.activity = rng.choice(ACTIVITIES)
        self.box = (int(width * rng.uniform(0.03, 0.12)), int(height * rng.uniform(0.05, 0.12)),
                    int(width * rng.uniform(0.85, 0.97)), int(height * rng.uniform(0.85, 0.95)))
        line_h = max(4, height // 40)
        self.line_h = line_h
        # A page of text taller than the window, so scrolling shows new lines.
        self.lines = [(rng.randint(2, 12) * width // 100, rng.randint(30, 85) * width // 100) for _ in range(200)]
        self.popup_at = rng.randint(10, 30)

    def render(self, t: int) -> np.ndarray:
        img = np.empty((self.h, self.w, 3), np.uint8)
        img[:] = self.desktop
        x0, y0, x1, y1 = self.box
        img[y0:y1, x0:x1] = self.window
        bar = max(6, self.h // 30)
        img[y0:y0 + bar, x0:x1] = self.title
        lh = self.line_h
        scroll = (t * max(1, self.h // SCROLL_HEIGHTS_PER_FRAME)) if self.activity == "scrolling" else 0
        typed_chars = t * 2 if self.activity == "typing" else 10**9
        first = scroll // (2 * lh)
        y = y0 + bar + lh - scroll % (2 * lh)
        for i, (indent, length) in enumerate(self.lines[first:], start=first):
            if y + lh > y1:
                break
            if y >= y0 + bar:
                if self.activity == "typing":
                    length = min(length, max(0, typed_chars - i * 40) * self.w // 200)
                img[y:y + lh, x0 + indent:min(x1, x0 + indent + length)] = self.ink
            y += 2 * lh
        if self.activity == "popup" and self.popup_at <= t < self.popup_at + 20:
            px0, py0 = x0 + (x1 - x0) // 3, y0 + (y1 - y0) // 3
            img[py0:py0 + (y1 - y0) // 4, px0:px0 + (x1 - x0) // 3] = self.title
        return img


def f1_within_one_frame(found: list[int], truth: list[int]) -> float:
    """F1 of detected transition frames against the known ones, a detection
    matching an unmatched known frame at most one frame away."""
    unmatched, hits = list(truth), 0
    for frame in found:
        match = next((t for t in unmatched if abs(t - frame) <= 1), None)
        if match is not None:
            unmatched.remove(match)
            hits += 1
    if not hits:
        return 1.0 if not found and not truth else 0.0
    precision, recall = hits / len(found), hits / len(truth)
    return 2 * precision * recall / (precision + recall)


def _hsv_colour(rng: random.Random, saturation: float, value: float) -> tuple[int, int, int]:
    import colorsys

    r, g, b = colorsys.hsv_to_rgb(rng.random(), saturation, value)
    return int(r * 255), int(g * 255), int(b * 255)


def write_recording(path: str | Path, seed: int, duration_s: float, width: int = 640, height: int = 360,
                    fps: int = 30, crf: int = 23) -> GroundTruth:
    """Write an H.264 (yuv420p) MP4 and return where its transitions are."""
    rng = random.Random(seed)
    total = int(duration_s * fps)
    truth = GroundTruth(frames=total, fps=fps)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "ultrafast", "tune": "stillimage"}

        def emit(img: np.ndarray) -> None:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)

        written = 0
        screen = _Screen(rng, width, height)
        t = 0
        while written < total:
            length = int(rng.uniform(SCREEN_S_MIN, SCREEN_S_MAX) * fps)
            start = written
            for _ in range(min(length, total - written)):
                emit(screen.render(t))
                written, t = written + 1, t + 1
            truth.screens.append(ScreenSpan(screen.activity, start, written))
            if written >= total:
                break
            following, kind = _Screen(rng, width, height), rng.choices(("cut", "fade", "dissolve"), (6, 1, 1))[0]
            steps = {"cut": 0, "fade": FADE_FRAMES, "dissolve": DISSOLVE_FRAMES}[kind]
            if written + steps + fps > total:
                kind, steps = "cut", 0  # no room left for a transition and a screen after it
            if kind == "cut":
                truth.transitions.append(Transition("cut", written))
            elif kind == "fade":
                a, b = screen.render(t).astype(np.float32), following.render(0).astype(np.float32)
                half = FADE_FRAMES // 2
                truth.transitions.append(Transition("fade", written + half))
                for i in range(FADE_FRAMES):
                    level = abs(i - half) / half  # 1 -> 0 (black) -> 1
                    emit(((a if i < half else b) * level).astype(np.uint8))
                written += FADE_FRAMES
            else:
                a, b = screen.render(t).astype(np.float32), following.render(0).astype(np.float32)
                truth.transitions.append(Transition("dissolve", written + DISSOLVE_FRAMES // 2))
                for i in range(DISSOLVE_FRAMES):
                    mix = (i + 1) / (DISSOLVE_FRAMES + 1)
                    emit((a * (1 - mix) + b * mix).astype(np.uint8))
                written += DISSOLVE_FRAMES
            screen, t = following, 0
        for packet in stream.encode():
            container.mux(packet)
    truth.frames = written
    return truth
