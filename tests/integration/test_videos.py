"""The video job API end to end: upload or server path -> Postgres queue ->
VideoProcessor actor -> result, including a processor killed mid-job."""

from __future__ import annotations

import io
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the video extra is not installed")

from dailydoco.kernels.analyze import analyze  # noqa: E402
from dailydoco.kernels.synthetic import write_recording  # noqa: E402

from .conftest import unique  # noqa: E402
from .test_live import token_for  # noqa: E402

JOB_WAIT_S = 300.0  # a job takes seconds; a slow host's CI, with the compiler beside it, many times that


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "session.mp4"
    write_recording(path, seed=21, duration_s=12.0, width=320, height=180)
    return path


def wait_for_job(api, job_id: str, until=("done", "failed")) -> dict:
    deadline = time.monotonic() + JOB_WAIT_S
    while time.monotonic() < deadline:
        job = api.service.get(f"/v1/videos/{job_id}").json()
        if job["status"] in until:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job['status']} after {JOB_WAIT_S} s")


def upload(api, user_id: str, data: bytes, content_type: str = "video/mp4"):
    return api.service.post(f"/v1/videos?user_id={user_id}", content=data, headers={"Content-Type": content_type})


def test_an_uploaded_video_is_analysed_and_only_its_owner_reads_it(api, recording):
    owner = api.register(unique("vid"))["user_id"]
    other = api.register(unique("vid"))["user_id"]
    r = upload(api, owner, recording.read_bytes())
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and r.headers["location"] == f"/v1/videos/{job['job_id']}"
    done = wait_for_job(api, job["job_id"])
    assert done["status"] == "done" and done["progress"] == 1.0 and done["error"] is None
    local = analyze(recording, backend="eager")
    assert [s["start_frame"] for s in done["result"]["shots"]] == [s.start_frame for s in local.shots]
    bearer = {"Authorization": f"Bearer {token_for(api, owner)}"}
    assert api.anonymous.get(f"/v1/videos/{job['job_id']}", headers=bearer).status_code == 200
    foreign = {"Authorization": f"Bearer {token_for(api, other)}"}
    assert api.anonymous.get(f"/v1/videos/{job['job_id']}", headers=foreign).status_code == 403


def test_thumbnails_and_variants_are_served_to_the_owner_only(api, recording):
    import av

    owner = api.register(unique("vid"))["user_id"]
    other = api.register(unique("vid"))["user_id"]
    assert api.service.post(f"/v1/videos?user_id={owner}&variants=maybe", content=recording.read_bytes(),
                            headers={"Content-Type": "video/mp4"}).status_code == 422
    r = api.service.post(f"/v1/videos?user_id={owner}&variants=true", content=recording.read_bytes(),
                         headers={"Content-Type": "video/mp4"})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    result = wait_for_job(api, job_id)["result"]
    thumbnails = [kf["thumbnail"] for kf in result["keyframes"]]
    variants = {v["aspect"]: v for v in result["variants"]}
    assert thumbnails and all(t.startswith("thumbnails/") for t in thumbnails)
    assert set(variants) == {"16:9", "9:16", "1:1"} and all(v["path"].startswith("variants/") for v in variants.values())
    owner_auth = {"Authorization": f"Bearer {token_for(api, owner)}"}
    jpeg = api.anonymous.get(f"/v1/videos/{job_id}/files/{thumbnails[0]}", headers=owner_auth)
    assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg" and jpeg.content[:2] == b"\xff\xd8"
    vertical = api.anonymous.get(f"/v1/videos/{job_id}/files/{variants['9:16']['path']}", headers=owner_auth)
    assert vertical.status_code == 200 and vertical.headers["content-type"] == "video/mp4"
    with av.open(io.BytesIO(vertical.content)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.width, stream.codec_context.height) == (variants["9:16"]["width"], 180)
        assert sum(1 for _ in container.decode(stream)) == result["frames"]
    foreign = {"Authorization": f"Bearer {token_for(api, other)}"}
    assert api.anonymous.get(f"/v1/videos/{job_id}/files/{thumbnails[0]}", headers=foreign).status_code == 403
    for name in ("..%2F..%2F..%2Fsecrets.json", "thumbnails/none.jpg", "variants", "../uploads/x.video"):
        r = api.service.get(f"/v1/videos/{job_id}/files/{name}")
        assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json", (name, r.text)


def test_a_server_path_stays_inside_the_video_folder(api, recording):
    owner = api.register(unique("vid"))["user_id"]
    folder = Path(api.engine.config.video_dir)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(recording, folder / "inbox.mp4")
    r = api.service.post("/v1/videos", json={"user_id": owner, "path": "inbox.mp4"})
    assert r.status_code == 202, r.text
    assert wait_for_job(api, r.json()["job_id"])["status"] == "done"
    for path, expected in (("../secrets.json", "leaves the video folder"), ("/etc/passwd", "leaves the video folder"),
                           ("missing.mp4", "no video")):
        r = api.service.post("/v1/videos", json={"user_id": owner, "path": path})
        assert r.status_code == 422 and expected in r.json()["detail"], (path, r.text)


def test_bad_requests_are_refused_and_bad_videos_fail_with_the_reason(api, recording):
    owner = api.register(unique("vid"))["user_id"]
    assert upload(api, unique("nobody"), recording.read_bytes()).status_code == 422  # unknown user
    assert upload(api, owner, recording.read_bytes(), "text/plain").status_code == 415
    assert upload(api, owner, b"").status_code == 422
    user_token = {"Authorization": f"Bearer {token_for(api, owner)}", "Content-Type": "video/mp4"}
    assert api.anonymous.post(f"/v1/videos?user_id={owner}", content=b"x", headers=user_token).status_code == 403
    assert api.service.get("/v1/videos/vid_nothing").status_code == 404
    bad = upload(api, owner, b"this is not a video\n" * 100)
    assert bad.status_code == 202
    failed = wait_for_job(api, bad.json()["job_id"])
    assert failed["status"] == "failed" and "not a video" in failed["error"] and failed["result"] is None
    # The processor is healthy: the next job completes.
    assert wait_for_job(api, upload(api, owner, recording.read_bytes()).json()["job_id"])["status"] == "done"


def test_a_job_survives_its_processor_being_killed(api, tmp_path):
    import ray

    from dailydoco.actors.refs import VIDEO_PROCESSOR_NAME

    long_recording = tmp_path / "long.mp4"
    write_recording(long_recording, seed=5, duration_s=45.0, width=640, height=360)  # still running when killed
    owner = api.register(unique("vid"))["user_id"]
    job_id = upload(api, owner, long_recording.read_bytes()).json()["job_id"]
    wait_for_job(api, job_id, until=("running",))
    ray.kill(ray.get_actor(VIDEO_PROCESSOR_NAME, namespace=api.engine.config.namespace), no_restart=True)
    done = wait_for_job(api, job_id)
    assert done["status"] == "done" and done["attempts"] == 2, done["status"]


def test_progress_reaches_the_owners_live_socket_only(api, recording):
    import anyio

    from dailydoco.cluster.live_client import LiveClient
    from dailydoco.protocol.live import VideoProgress

    from .test_live import live_url

    owner = api.register(unique("vid"))["user_id"]
    bystander = api.register(unique("vid"))["user_id"]

    async def run() -> None:
        seen: dict[str, list] = {owner: [], bystander: []}

        async def follow(user_id: str) -> None:
            async def token() -> str:
                return token_for(api, user_id)

            async for item in LiveClient(live_url(api), token).events():
                if isinstance(item, VideoProgress):
                    seen[user_id].append(item)

        async with anyio.create_task_group() as tg:
            tg.start_soon(follow, owner)
            tg.start_soon(follow, bystander)
            await anyio.sleep(1.0)  # both sockets connected
            job_id = (await anyio.to_thread.run_sync(upload, api, owner, recording.read_bytes())).json()["job_id"]
            with anyio.fail_after(JOB_WAIT_S):
                while not any(p.status == "done" for p in seen[owner]):
                    await anyio.sleep(0.1)
            tg.cancel_scope.cancel()
        progress = [p.progress for p in seen[owner]]
        assert {p.job_id for p in seen[owner]} == {job_id}
        assert progress == sorted(progress) and progress[-1] == 1.0 and len(progress) >= 3
        assert seen[bystander] == []

    anyio.run(run)
