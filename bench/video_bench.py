"""Video analysis benchmark: this engine against PySceneDetect, same videos, same run.

Synthetic 1080p30 screen recordings (kernels/synthetic.py: typing,
scrolling, pop-ups, window switches, fades, dissolves; known cut frames) are
analysed end to end, decode included, by (a) `kernels.analyze` on the CPU
(and on CUDA where there is one) and (b) PySceneDetect's ContentDetector
with its PyAV backend and default settings. Prints real-time factors
(seconds of video per second of processing), the speed ratio and the F1 of
the cuts found at +-1 frame (and of the fades and dissolves, which only this
engine reports); writes bench/results/video.json.

Run: python bench/video_bench.py [--videos N] [--seconds S]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from scenedetect import ContentDetector, detect

from dailydoco.kernels.analyze import analyze
from dailydoco.kernels.synthetic import f1_within_one_frame, write_recording

RESULTS = Path(__file__).parent / "results" / "video.json"
WIDTH, HEIGHT, FPS = 1920, 1080, 30


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--videos", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=40.0)
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    engines = [(d, b) for d in devices for b in ("eager", "compile")]
    rows: dict[str, dict] = {name: {"video_s": 0.0, "wall_s": 0.0, "f1": [], "fade_f1": [], "dissolve_f1": []} for name in
                             [f"engine ({d}, {b})" for d, b in engines] + ["PySceneDetect ContentDetector (pyav)"]}
    compile_s = {}
    with tempfile.TemporaryDirectory(prefix="dd-video-bench-") as folder:
        for seed in range(args.videos):
            path = Path(folder) / f"rec{seed}.mp4"
            truth = write_recording(path, seed, args.seconds, WIDTH, HEIGHT, FPS)
            cuts, video_s = truth.frames_of("cut"), truth.frames / FPS
            for device, backend in engines:
                if backend == "compile" and device not in compile_s:
                    # Compiling happens once per process (and is cached on
                    # disk); it is timed apart, on this video, and not counted below.
                    _, compile_s[device] = timed(lambda: analyze(path, device=device, backend=backend))
                result, wall = timed(lambda: analyze(path, device=device, backend=backend))
                found = [s.start_frame for s in result.shots if s.starts_with == "cut"]
                row = rows[f"engine ({device}, {backend})"]
                row["video_s"] += video_s
                row["wall_s"] += wall
                row["f1"].append(f1_within_one_frame(found, cuts))
                for kind in ("fade", "dissolve"):  # PySceneDetect's ContentDetector does not tell these apart
                    row[f"{kind}_f1"].append(f1_within_one_frame(
                        [s.start_frame for s in result.shots if s.starts_with == kind], truth.frames_of(kind)))
            scenes, wall = timed(lambda: detect(str(path), ContentDetector(), backend="pyav"))
            row = rows["PySceneDetect ContentDetector (pyav)"]
            row["video_s"] += video_s
            row["wall_s"] += wall
            row["f1"].append(f1_within_one_frame([start.frame_num for start, _ in scenes[1:]], cuts))
            print(f"video {seed}: {truth.frames} frames, {len(cuts)} cuts", flush=True)
    baseline = rows["PySceneDetect ContentDetector (pyav)"]
    results = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
               "when": dt.datetime.now(dt.timezone.utc).isoformat(), "videos": args.videos,
               "seconds_each": args.seconds, "resolution": f"{WIDTH}x{HEIGHT}@{FPS}", "rows": {}}
    print(f"\nvideo benchmark: {args.videos} synthetic {WIDTH}x{HEIGHT}@{FPS} screen recordings of {args.seconds:g} s")
    print("| path | real-time factor | vs PySceneDetect | cut F1 (+-1 frame) | fade F1 | dissolve F1 |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, row in rows.items():
        rtf = row["video_s"] / row["wall_s"]
        ratio = rtf / (baseline["video_s"] / baseline["wall_s"])
        f1 = {kind: sum(row[kind]) / len(row[kind]) if row[kind] else None for kind in ("f1", "fade_f1", "dissolve_f1")}
        results["rows"][name] = {"real_time_factor": round(rtf, 2), "vs_pyscenedetect": round(ratio, 2),
                                 "cut_f1": round(f1["f1"], 3), "wall_s": round(row["wall_s"], 2),
                                 **{kind: f1[kind] and round(f1[kind], 3) for kind in ("fade_f1", "dissolve_f1")}}
        shown = ["-" if f1[kind] is None else f"{f1[kind]:.3f}" for kind in ("fade_f1", "dissolve_f1")]
        print(f"| {name} | {rtf:.1f}x | {ratio:.2f}x | {f1['f1']:.3f} | {shown[0]} | {shown[1]} |")
    for device, seconds in compile_s.items():
        print(f"first run with torch.compile on {device} (compiling included, not in the table): {seconds:.1f} s")
    results["first_compile_run_s"] = {d: round(v, 1) for d, v in compile_s.items()}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
