"""`dailydoco video analyze FILE`: the video analysis, locally, with a progress bar."""

from __future__ import annotations

import sys
import time

import msgspec

PROGRESS_BAR_WIDTH = 30


def _progress(started: float):
    def show(done: int, expected: int) -> None:
        share = min(1.0, done / expected)
        bar = "#" * int(share * PROGRESS_BAR_WIDTH)
        rate = done / max(time.monotonic() - started, 1e-9)
        print(f"\r[{bar:<{PROGRESS_BAR_WIDTH}}] {share:6.1%}  {done} frames  {rate:,.0f} frames/s",
              end="", file=sys.stderr, flush=True)

    return show


def run_video(args) -> int:
    try:
        from dailydoco.kernels.analyze import analyze
        from dailydoco.kernels.decode import VideoError
    except ImportError as exc:
        print(f"dailydoco video: the video extra is not installed ({exc.name}): "
              "pip install -e '.[video]' (install torch==2.13.0 first where there is no GPU)", file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        result = analyze(args.file, batch_frames=args.batch_frames, device=args.device, backend=args.backend,
                         thumbnails_dir=args.thumbnails, variants_dir=args.variants,
                         progress=None if args.quiet else _progress(started))
    except VideoError as exc:
        print(f"\ndailydoco video: {exc}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - started
    if not args.quiet:
        print(file=sys.stderr)
    if args.json:
        sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
        return 0
    print(f"{args.file}: {result.width}x{result.height} @ {result.fps:g} fps, {result.duration_s:.1f} s, "
          f"analysed in {elapsed:.1f} s ({result.duration_s / elapsed:.1f}x real time) on {result.device} "
          f"({result.backend})")
    print(f"shots: {len(result.shots)}  " + ", ".join(f"{s.start_s:.2f}s {s.starts_with}" for s in result.shots[1:]))
    if result.chapters:
        print("chapters (YouTube):")
        for chapter in result.chapters:
            print(f"  {chapter.youtube_timestamp} {chapter.title}")
    else:
        print(f"chapters: none ({result.chapters_note})")
    print("keyframes: " + ", ".join(f"{kf.time_s:.2f}s" for kf in result.keyframes))
    if args.thumbnails:
        print(f"thumbnails: {len(result.keyframes)} JPEGs in {args.thumbnails}")
    print("activity: " + ", ".join(f"{a.start_s:.1f}-{a.end_s:.1f}s {a.kind}" for a in result.activity))
    for v in result.variants:
        print(f"variant {v.aspect}: {v.width}x{v.height} crop" + (f" -> {v.path}" if v.path else ""))
    q, pace = result.quality, result.pacing
    print(f"quality {q.score}/100 (sharpness {q.sharpness}, exposure {q.exposure}, stability {q.stability}, "
          f"information {q.information})")
    print(f"pacing: {pace.shots_per_minute} shots/min, median shot {pace.shot_s_median} s, idle {pace.idle_share:.0%}, "
          f"longest still {pace.longest_idle_s} s, scrolling {pace.scrolling_share:.0%}, "
          f"text density {pace.text_density_mean:.2f}")
    print(f"prediction ({result.prediction.method}): expected watch share {result.prediction.expected_watch_share:.0%}")
    return 0
