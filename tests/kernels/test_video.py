"""Video kernels and analysis on synthetic screen recordings (nothing downloaded)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the video extra is not installed")
av = pytest.importorskip("av", reason="the video extra is not installed")
cv2 = pytest.importorskip("cv2", reason="the video extra is not installed")
scenedetect = pytest.importorskip("scenedetect", reason="the video extra is not installed")

from dailydoco.kernels import frame_kernels as k  # noqa: E402
from dailydoco.kernels.analyze import analyze, run_kernels  # noqa: E402
from dailydoco.kernels.decode import VIDEO_PIXELS_MAX, VideoError  # noqa: E402
from dailydoco.kernels.synthetic import f1_within_one_frame, write_recording  # noqa: E402
from dailydoco.protocol.video import CHAPTER_S_MIN  # noqa: E402

SEEDS = (3, 11)


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    return [(folder / f"rec{seed}.mp4", write_recording(folder / f"rec{seed}.mp4", seed, 45.0)) for seed in SEEDS]


def test_hsv_matches_opencv_to_within_rounding():
    rng = np.random.default_rng(5)
    pixels = np.concatenate([
        rng.integers(0, 256, (4000, 3), dtype=np.uint8),
        np.array([[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0],
                  [7, 7, 8], [200, 10, 199], [128, 128, 127]], np.uint8),
    ])
    ours = k.rgb_to_hsv(torch.from_numpy(pixels).view(1, 1, -1, 3))[0].reshape(3, -1).T.numpy()
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
    rgb = torch.from_numpy(np.stack(frames)[..., ::-1].copy())
    ours = k.content_scores(k.rgb_to_hsv(rgb), k.FrameCarry()).numpy()
    assert theirs.max() > 27  # the frames hold cuts, so the comparison covers large scores too
    assert np.abs(ours - theirs).max() <= 1.0


def test_results_do_not_depend_on_the_batch_size(recordings):
    path, _ = recordings[0]
    results = [analyze(path, batch_frames=n, backend="eager") for n in (1, 7, 64)]
    for other in results[1:]:
        np.testing.assert_allclose(other.content_scores, results[0].content_scores, atol=1e-3)
        assert (other.shots, other.keyframes, other.chapters) == (results[0].shots, results[0].keyframes,
                                                                  results[0].chapters)


def test_per_frame_kernels_carry_state_across_batches(recordings):
    path, _ = recordings[1]
    _, one = run_kernels(path, batch_frames=1000)
    _, many = run_kernels(path, batch_frames=5)
    for name in ("motion_energy", "motion_share", "motion_bbox", "dhash", "phash", "mean_luma", "entropy"):
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
    energy, share, bbox = k.motion(still, k.FrameCarry())
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


def test_compiled_kernels_agree_with_eager(recordings):
    path, _ = recordings[1]
    eager, compiled = analyze(path, backend="eager"), analyze(path, backend="compile")
    assert compiled.backend == "compile"
    np.testing.assert_allclose(compiled.content_scores, eager.content_scores, atol=1e-2)
    assert (compiled.shots, compiled.chapters) == (eager.shots, eager.chapters)
    assert [kf.frame for kf in compiled.keyframes] == [kf.frame for kf in eager.keyframes]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cpu_and_gpu_agree(recordings):
    path, _ = recordings[0]
    cpu, gpu = analyze(path, device="cpu", backend="eager"), analyze(path, device="cuda", backend="eager")
    np.testing.assert_allclose(gpu.content_scores, cpu.content_scores, atol=0.05)
    assert [s.start_frame for s in gpu.shots] == [s.start_frame for s in cpu.shots]
