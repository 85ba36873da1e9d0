"""Video kernels and analysis on synthetic screen recordings (nothing downloaded)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the video extra is not installed")
av = pytest.importorskip("av", reason="the video extra is not installed")
cv2 = pytest.importorskip("cv2", reason="the video extra is not installed")
scenedetect = pytest.importorskip("scenedetect", reason="the video extra is not installed")

from dailydoco.kernels import frame_kernels as k  # noqa: E402
from dailydoco.kernels.analyze import analyze, run_kernels  # noqa: E402
from dailydoco.kernels.decode import VIDEO_PIXELS_MAX, VideoError  # noqa: E402
from dailydoco.kernels.crops import crop_size  # noqa: E402
from dailydoco.kernels.synthetic import f1_within_one_frame, write_recording  # noqa: E402
from dailydoco.protocol.video import CHAPTER_S_MIN  # noqa: E402

SEEDS = (3, 11)
GRAPH_BUILD_WAIT_S = 600  # 85 s on an idle 2-core machine, cold cache


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    return [(folder / f"rec{seed}.mp4", write_recording(folder / f"rec{seed}.mp4", seed, 45.0)) for seed in SEEDS]


@pytest.fixture(scope="module")
def short_recording(tmp_path_factory):
    """Several screens and transitions, a third of the length: for the tests
    that analyse one video many ways (batch sizes down to one frame)."""
    path = tmp_path_factory.mktemp("videos") / "short.mp4"
    write_recording(path, SEEDS[1], 15.0)
    return path


def test_hsv_matches_opencv_to_within_rounding():
    rng = np.random.default_rng(5)
    pixels = np.concatenate([
        rng.integers(0, 256, (4000, 3), dtype=np.uint8),
        np.array([[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0],
                  [7, 7, 8], [200, 10, 199], [128, 128, 127]], np.uint8),
    ])
    ours = k.rgb_to_hsv(torch.from_numpy(pixels).T.reshape(1, 3, 1, -1))[0].reshape(3, -1).T.numpy()
    theirs = cv2.cvtColor(pixels.reshape(1, -1, 3), cv2.COLOR_RGB2HSV).reshape(-1, 3).astype(np.float32)
    hue_gap = np.abs(ours[:, 0] - theirs[:, 0])
    assert np.minimum(hue_gap, 180 - hue_gap).max() <= 1
    assert np.abs(ours[:, 1:] - theirs[:, 1:]).max() <= 1


def test_content_scores_match_pyscenedetect_on_the_same_frames(recordings):
    from scenedetect.detectors import ContentDetector
    from scenedetect.frame_timecode import FrameTimecode

    path, _ = recordings[0]
    # PySceneDetect 0.7's downscale, pinned: width to 256 with INTER_LINEAR.
    frames = []
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i == 400:
                break
            frames.append(cv2.resize(frame.to_ndarray(format="bgr24"), (256, 144), interpolation=cv2.INTER_LINEAR))
    detector = ContentDetector()
    theirs = np.array([detector._calculate_frame_score(FrameTimecode(i, 30.0), f) for i, f in enumerate(frames)])
    rgb = torch.from_numpy(np.stack(frames)[..., ::-1].transpose(0, 3, 1, 2).copy())  # BGR -> planar RGB
    ours = k.content_scores(k.rgb_to_hsv(rgb), k.FrameCarry()).numpy()
    assert theirs.max() > 27  # the frames hold cuts, so the comparison covers large scores too
    assert np.abs(ours - theirs).max() <= 1.0


def test_rgb_from_sampled_yuv_matches_opencvs_conversion(recordings):
    """The analysis reads Y, U and V samples and makes RGB itself (BT.601,
    video range, as FFmpeg takes unflagged video): OpenCV's conversion of the
    whole frame gives the same pixels to within rounding. (FFmpeg's own fast
    conversion truncates: 1 to 3 below both.)"""
    from dailydoco.kernels.decode import decode_batches, open_video, plane_array, sample_grid

    path = recordings[0][0]
    container, stream, info = open_video(path)
    with container:
        batch = next(decode_batches(container, stream, info, 8))
    ours = k.yuv_to_rgb(batch.luma, batch.chroma, batch.colour.bt709, batch.colour.full_range).numpy()
    rows, cols = sample_grid(info.height, batch.luma.shape[1]), sample_grid(info.width, batch.luma.shape[2])
    theirs = []
    with av.open(str(path)) as container:
        for _, frame in zip(range(8), container.decode(video=0)):
            i420 = np.concatenate([plane_array(p).reshape(-1) for p in frame.planes]).reshape(-1, info.width)
            theirs.append(cv2.cvtColor(i420, cv2.COLOR_YUV2RGB_I420)[rows][:, cols].transpose(2, 0, 1))
    assert not batch.colour.bt709 and not batch.colour.full_range
    assert np.abs(ours - np.stack(theirs)).max() <= 1


def _yuv(ycbcr: np.ndarray) -> tuple:
    """(n, 3) Y, Cb, Cr rows -> the kernels' (1, 1, n) luma and (1, 2, 1, n) chroma."""
    rows = torch.from_numpy(np.ascontiguousarray(ycbcr.T))
    return rows[0].view(1, 1, -1), rows[1:].reshape(1, 2, 1, -1)


def test_yuv_conversion_follows_the_streams_matrix_and_range():
    # BT.709, video range: 100 % colour bars and black and white come out as themselves.
    bars = np.array([[63, 102, 240], [173, 42, 26], [32, 240, 118], [16, 128, 128], [235, 128, 128]], np.uint8)
    rgb = k.yuv_to_rgb(*_yuv(bars), bt709=True)[0].reshape(3, -1).T.numpy()
    expected = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 0, 0], [255, 255, 255]], np.float32)
    assert np.abs(rgb - expected).max() <= 1
    # BT.601, full range (JPEG, yuvj): OpenCV's YCrCb conversion.
    ycbcr = np.random.default_rng(1).integers(0, 256, (500, 3), dtype=np.uint8)
    ours = k.yuv_to_rgb(*_yuv(ycbcr), full_range=True)[0].reshape(3, -1).T.numpy()
    theirs = cv2.cvtColor(ycbcr[:, [0, 2, 1]].reshape(1, -1, 3), cv2.COLOR_YCrCb2RGB)[0].astype(np.float32)
    assert np.abs(ours - theirs).max() <= 1


def test_a_stream_flagged_bt709_full_range_is_converted_as_flagged(tmp_path):
    from dailydoco.kernels.decode import decode_batches, open_video

    path = tmp_path / "bt709-full.mp4"
    colour = (200, 120, 40)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 320, 180, "yuv420p"
        stream.codec_context.colorspace, stream.codec_context.color_range = 1, 2  # BT.709, full (JPEG) range
        for _ in range(8):
            frame = av.VideoFrame.from_ndarray(np.full((180, 320, 3), colour, np.uint8), format="rgb24")
            frame = frame.reformat(format="yuv420p", dst_colorspace=1, dst_color_range=2)
            frame.colorspace, frame.color_range = 1, 2
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    container, stream, info = open_video(path)
    with container:
        batch = next(decode_batches(container, stream, info, 8))
    assert (batch.colour.bt709, batch.colour.full_range) == (True, True)
    rgb = k.yuv_to_rgb(batch.luma, batch.chroma, batch.colour.bt709, batch.colour.full_range)
    assert (rgb[:, :, 8:-8, 8:-8] - torch.tensor(colour, dtype=torch.float32).view(1, 3, 1, 1)).abs().max() <= 3


def test_videos_not_in_yuv420p_are_converted_then_analysed(tmp_path):
    path = tmp_path / "yuv444.mp4"
    rng = np.random.default_rng(4)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv444p"
        for i in range(60):
            img = np.full((360, 640, 3), (40, 90, 200) if i < 30 else (230, 200, 20), np.uint8)
            img[100:140, 50 + i:250 + i] = rng.integers(0, 256, 3, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.pix_fmt == "yuv444p"
    result = analyze(path, backend="eager")
    assert result.frames == 60 and [s.start_frame for s in result.shots] == [0, 30]


def test_results_do_not_depend_on_the_batch_size(short_recording, recordings):
    # Down to one frame a batch on the short video; chapters need 30 s and
    # more, so they are compared on a full-length one.
    for path, sizes in ((short_recording, (1, 7, 64)), (recordings[0][0], (7, 64))):
        results = [analyze(path, batch_frames=n, backend="eager") for n in sizes]
        for other in results[1:]:
            np.testing.assert_allclose(other.content_scores, results[0].content_scores, atol=1e-3)
            assert (other.shots, other.keyframes, other.chapters) == (results[0].shots, results[0].keyframes,
                                                                      results[0].chapters)
    assert results[0].chapters  # a comparison of something


def test_per_frame_kernels_carry_state_across_batches(short_recording):
    _, one = run_kernels(short_recording, batch_frames=1000)
    _, many = run_kernels(short_recording, batch_frames=5)
    for name in ("motion_energy", "motion_share", "motion_bbox", "dhash", "phash", "mean_luma", "entropy", "scroll",
                 "dwell", "text_density", "saliency_x", "saliency_y"):
        np.testing.assert_allclose(many.array(name), one.array(name), atol=1e-3, err_msg=name)


def test_cuts_and_fades_found_at_least_as_well_as_pyscenedetect(recordings):
    from scenedetect import ContentDetector, detect

    for path, truth in recordings:
        result = analyze(path, backend="eager")
        ours = f1_within_one_frame([s.start_frame for s in result.shots if s.starts_with == "cut"], truth.frames_of("cut"))
        scenes = detect(str(path), ContentDetector(), backend="pyav")
        theirs = f1_within_one_frame([start.frame_num for start, _ in scenes[1:]], truth.frames_of("cut"))
        assert ours >= theirs and ours >= 0.9, (path.name, ours, theirs)
        fades = [s.start_frame for s in result.shots if s.starts_with == "fade"]
        assert f1_within_one_frame(fades, truth.frames_of("fade")) == 1.0


def test_chapters_keyframes_quality_and_pacing_are_valid(recordings):
    path, truth = recordings[0]
    result = analyze(path, backend="eager")
    starts = [c.start_s for c in result.chapters]
    assert starts[0] == 0.0 and len(starts) >= 3
    assert all(b - a >= CHAPTER_S_MIN for a, b in zip(starts, starts[1:] + [result.duration_s]))
    assert result.chapters[0].youtube_timestamp == "0:00"
    hashes = [int(kf.phash, 16) for kf in result.keyframes]
    assert all(k.hamming(a, b) >= 10 for i, a in enumerate(hashes) for b in hashes[i + 1:])
    assert 0 <= result.quality.score <= 100 and result.prediction.method == "heuristic"
    assert result.frames == truth.frames and result.pacing.shots == len(result.shots)
    assert result.backend == "eager" and result.device == "cpu"


def test_thumbnails_are_jpegs_of_the_keyframes(recordings, tmp_path):
    path, _ = recordings[1]
    result = analyze(path, backend="eager", thumbnails_dir=tmp_path / "thumbs")
    assert result.keyframes and all(kf.thumbnail for kf in result.keyframes)
    with av.open(str(path)) as container:
        frames = {i: f.to_ndarray(format="bgr24") for i, f in enumerate(container.decode(video=0))
                  if i in {kf.frame for kf in result.keyframes}}
    for kf in result.keyframes:
        image = cv2.imread(kf.thumbnail)
        assert image.shape == (360, 640, 3)
        # It is that frame: close to the decoded frame itself (JPEG loses a little).
        assert np.abs(image.astype(int) - frames[kf.frame].astype(int)).mean() < 6


def test_motion_box_covers_what_changed():
    still = torch.full((2, 40, 60), 100, dtype=torch.uint8)
    still[1, 10:20, 30:45] = 200  # a pop-up
    energy, share, bbox = k.motion(k.luma_change(still, k.FrameCarry()))
    assert energy[0] == 0 and bbox[0].tolist() == [-1, -1, -1, -1]
    assert bbox[1].tolist() == [30, 10, 45, 20]
    assert share[1] == pytest.approx(150 / 2400)


def test_perceptual_hashes_tell_near_duplicates_from_different_frames():
    rng = np.random.default_rng(1)
    base = torch.from_numpy(rng.integers(0, 256, (1, 64, 64), dtype=np.uint8)).float()
    base = torch.nn.functional.avg_pool2d(base.unsqueeze(0), 5, 1, 2).squeeze(0).to(torch.uint8)
    brighter = (base.float() * 1.1).clamp(max=255).to(torch.uint8)
    other = base.flip(2)
    frames = torch.cat((base, brighter, other))
    for hashes in (k.dhash(frames), k.phash(frames)):
        a, b, c = (int(h) for h in hashes)
        assert k.hamming(a, b) <= 4 < 16 <= k.hamming(a, c)


def test_adaptive_ratio_matches_pyscenedetect_adaptive_detector(recordings):
    from scenedetect import AdaptiveDetector, SceneManager, StatsManager, open_video

    path, _ = recordings[0]
    stats = StatsManager()
    manager = SceneManager(stats)
    detector = AdaptiveDetector()
    manager.add_detector(detector)
    manager.detect_scenes(open_video(str(path), backend="pyav"))
    # The same scores in (ours match theirs to +-1, tested above; a ratio of scores near zero
    # amplifies that), the same ratios out: the kernel is AdaptiveDetector's rule, batched.
    scores = np.array([stats.get_metrics(i, ["content_val"])[0] for i in range(1350)], np.float32)
    scores = np.nan_to_num(scores)  # frame 0 has no stored score; the detector takes it as 0
    theirs = np.array([stats.get_metrics(i, [detector._adaptive_ratio_key])[0] for i in range(2, 1348)])
    ours = k.adaptive_ratios(torch.from_numpy(scores)).numpy()
    assert theirs.max() == 255.0  # cuts between still screens hit the cap
    np.testing.assert_allclose(ours[2:1348], theirs, rtol=1e-4, atol=1e-4)
    assert (ours[:2] == 0).all() and (ours[1348:] == 0).all()


def test_scroll_shift_finds_the_rows_the_page_moved():
    rng = np.random.default_rng(2)
    page = torch.from_numpy(rng.integers(0, 256, (200, 64), dtype=np.uint8))
    page = torch.nn.functional.avg_pool2d(page.float().view(1, 1, 200, 64), (1, 3), 1, (0, 1)).view(200, 64)
    frames = torch.stack([page[offset:offset + 96] for offset in (0, 3, 6, 6, 4)]).to(torch.uint8)
    frames[:, :8] = 30  # a title bar that does not move
    shifts = k.scroll_shift(frames, k.FrameCarry()).tolist()
    assert shifts == [0, 3, 3, 0, -2]  # the first frame has nothing before it; frame 3 stands still
    typed = frames[3].clone().unsqueeze(0)
    typed[0, 40:44, 10:14] = 255  # a keystroke is no scroll
    assert k.scroll_shift(typed, k.FrameCarry(luma=frames[3])).tolist() == [0]


def test_dwell_counts_still_frames_across_batches():
    still = torch.tensor([True, True, False, True, True, True])
    assert k.dwell_frames(still, torch.tensor(4)).tolist() == [5, 6, 0, 1, 2, 3]
    first = k.dwell_frames(still[:4], torch.tensor(0))
    second = k.dwell_frames(still[4:], first[-1])
    assert torch.cat((first, second)).tolist() == [1, 2, 0, 1, 2, 3]


def test_activity_spans_follow_what_the_user_did(recordings):
    """Scrolling, idle and typing screens of the synthetic recordings come out as such."""
    for path, truth in recordings:
        result = analyze(path, backend="eager")
        fps = result.fps
        label = np.empty(result.frames, object)
        for span in result.activity:
            label[round(span.start_s * fps):round(span.end_s * fps)] = span.kind
        assert result.activity[0].start_s == 0 and result.activity[-1].end_s == result.duration_s
        wanted = {"scrolling": ("scrolling", 0.9), "idle": ("idle", 0.8), "typing": ("typing", 0.5)}
        for screen in truth.screens:
            if screen.activity in wanted:
                kind, share = wanted[screen.activity]
                found = np.mean(label[screen.start_frame:screen.end_frame] == kind)
                assert found >= share, (path.name, screen, found)
        scrolled = sum(s.end_frame - s.start_frame for s in truth.screens if s.activity == "scrolling")
        assert result.pacing.scrolling_share == pytest.approx(scrolled / result.frames, abs=0.03)
        assert 0 < result.pacing.text_density_mean < 1


def test_text_density_tells_a_page_from_a_blank_screen():
    blank = torch.full((1, 64, 64), 200, dtype=torch.uint8)
    page = blank.clone()
    page[0, 1::4, 4:60] = 20  # lines of text: a dark stroke in every row of blocks, 14 blocks of 16 wide
    density = k.text_density(k.block_contrast(torch.cat((blank, page)))).tolist()
    assert density == [0.0, 14 / 16]


def test_crops_follow_the_saliency(tmp_path):
    """A page whose text is on the right: the 9:16 and 1:1 crops sit on the right."""
    path = tmp_path / "right.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
        for t in range(60):
            img = np.full((360, 640, 3), 235, np.uint8)
            img[40:320:12, 440:620] = 20  # text on the right
            img[40 + (t % 20) * 12: 46 + (t % 20) * 12, 440:450] = 255  # a cursor moving down it
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    result = analyze(path, backend="eager", variants_dir=tmp_path / "variants")
    variants = {v.aspect: v for v in result.variants}
    assert (variants["9:16"].width, variants["9:16"].height) == crop_size(640, 360, "9:16") == (202, 360)
    assert variants["16:9"].x_per_s == [0, 0] and (variants["16:9"].width, variants["16:9"].height) == (640, 360)
    for aspect in ("9:16", "1:1"):
        v = variants[aspect]
        assert all(x + v.width >= 600 and x <= 440 for x in v.x_per_s), (aspect, v.x_per_s)
        with av.open(v.path) as container:
            decoded = [f.to_ndarray(format="gray") for f in container.decode(video=0)]
        assert len(decoded) == result.frames and decoded[0].shape == (v.height, v.width)
        # The encoded frame is the source's crop at the planned place.
        with av.open(str(path)) as container:
            source = next(container.decode(video=0)).to_ndarray(format="gray")
        x = v.x_per_s[0]
        assert np.abs(decoded[0].astype(int) - source[:v.height, x:x + v.width].astype(int)).mean() < 3


def test_variants_keep_the_audio(tmp_path):
    path = tmp_path / "talk.mp4"
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=30)
        video.width, video.height, video.pix_fmt = 320, 180, "yuv420p"
        sound = container.add_stream("aac", rate=44100)
        for t in range(45):
            img = np.full((180, 320, 3), 40 + t, np.uint8)
            for packet in video.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        tone = np.sin(np.arange(1024 * 65) * 2 * np.pi * 440 / 44100).astype(np.float32)
        for i in range(65):
            frame = av.AudioFrame.from_ndarray(tone[None, i * 1024:(i + 1) * 1024], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 44100, i * 1024
            for packet in sound.encode(frame):
                container.mux(packet)
        for stream in (video, sound):
            for packet in stream.encode():
                container.mux(packet)
    result = analyze(path, backend="eager", variants_dir=tmp_path / "variants")
    for v in result.variants:
        with av.open(v.path) as container:
            assert container.streams.audio and container.streams.audio[0].codec_context.name == "aac"
            assert sum(1 for _ in container.decode(audio=0)) >= 60


# --- bad input --------------------------------------------------------------------------


def _audio_only(path) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=44100)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 44100
        for _ in range(20):
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _huge(path) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=1)
        stream.width, stream.height, stream.pix_fmt = 4096, 2304, "yuv420p"
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.zeros((2304, 4096, 3), np.uint8), format="rgb24")):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_bad_input_gets_a_clear_error(recordings, tmp_path):
    good, _ = recordings[0]
    cases = {
        "text.mp4": (lambda p: p.write_text("not a video at all\n" * 50), "not a video"),
        "empty.mp4": (lambda p: p.write_bytes(b""), "empty"),
        "truncated.mp4": (lambda p: p.write_bytes(good.read_bytes()[: good.stat().st_size // 3]), "not a video FFmpeg can read"),
        "audio.m4a": (_audio_only, "no video stream"),
        "huge.mp4": (_huge, f"{VIDEO_PIXELS_MAX:,}-pixel limit"),
    }
    for name, (make, expected) in cases.items():
        path = tmp_path / name
        make(path)
        with pytest.raises(VideoError, match=expected):
            analyze(path, backend="eager")
    with pytest.raises(VideoError, match="not a file"):
        analyze(tmp_path / "missing.mp4", backend="eager")
    assert analyze(good, batch_frames=64, backend="eager").frames > 0  # and the next good video still works


def test_compiled_kernels_agree_with_eager_and_an_analysis_need_not_wait_for_them(recordings):
    """As the video processor runs it (`wait_for_compile=False`): the first
    analysis runs eagerly while a thread compiles the step (a minute and
    more); the ones after it, once built, run the compiled step, which
    agrees with eager."""
    path, _ = recordings[1]
    eager = analyze(path, backend="eager")
    first = analyze(path, backend="compile", wait_for_compile=False)
    assert first == eager  # backend "eager" included
    # None left when the build ended first (inductor's cache on disk warm: seconds).
    for builder in [thread for thread in threading.enumerate() if thread.name == "dailydoco-compile"]:
        builder.join(timeout=GRAPH_BUILD_WAIT_S)
        assert not builder.is_alive(), f"the compiled step is built within {GRAPH_BUILD_WAIT_S} s"
    compiled = analyze(path, backend="compile", wait_for_compile=False)
    assert compiled.backend == "compile"
    np.testing.assert_allclose(compiled.content_scores, eager.content_scores, atol=1e-2)
    assert (compiled.shots, compiled.chapters) == (eager.shots, eager.chapters)
    assert [kf.frame for kf in compiled.keyframes] == [kf.frame for kf in eager.keyframes]


def _backend_in_a_new_process(path: Path, inductor_cache: Path) -> subprocess.CompletedProcess:
    """A compiled analysis in a process of its own (inductor's caches in
    memory empty), on `inductor_cache`; prints the backend that ran."""
    return subprocess.run(
        [sys.executable, "-c", f"from dailydoco.kernels.analyze import analyze;"
                               f" print(analyze({str(path)!r}, backend='compile').backend)"],
        env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_cache)},
        capture_output=True, text=True, timeout=GRAPH_BUILD_WAIT_S)


def test_a_build_killed_while_linking_is_built_again(recordings, tmp_path):
    """A build whose process is killed while it links leaves a truncated
    shared object in inductor's cache, which inductor takes as built (CI,
    session 40: every build after failed loading it, and analyses stayed
    eager). The next build removes it and builds it again."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    path, _ = recordings[1]
    inductor_cache = tmp_path / "inductor"
    # A copy of the machine's cache, warm once the test above has built the
    # step (run alone, this test builds it first): the break stays in the copy.
    shutil.copytree(cache_dir(), inductor_cache)
    if not list(inductor_cache.rglob("*.main.so")):
        assert _backend_in_a_new_process(path, inductor_cache).returncode == 0
    for built in inductor_cache.rglob("*.main.so"):
        built.write_bytes(b"")  # as a linker killed as it began writing leaves it
    analysed = _backend_in_a_new_process(path, inductor_cache)
    assert analysed.returncode == 0, analysed.stderr[-4000:]
    assert analysed.stdout.split()[-1] == "compile"
    assert "held a broken build" in analysed.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cpu_and_gpu_agree(recordings):
    path, _ = recordings[0]
    cpu, gpu = analyze(path, device="cpu", backend="eager"), analyze(path, device="cuda", backend="eager")
    np.testing.assert_allclose(gpu.content_scores, cpu.content_scores, atol=0.05)
    assert [s.start_frame for s in gpu.shots] == [s.start_frame for s in cpu.shots]
