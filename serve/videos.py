"""The video job API: enqueue an analysis, read its status and result.

Two ways in: an upload (the body is the video, streamed to disk) or a path
under the engine's video folder (never outside it). Either way the job is in
Postgres before the 202, and a VideoProcessor actor runs it.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
from pathlib import Path

import msgspec
from starlette.requests import Request
from starlette.responses import FileResponse, Response

from dailydoco import protocol as p
from dailydoco.actors.video_processor import job_outputs
from dailydoco.protocol.video import (
    VIDEO_UPLOAD_BYTES_MAX,
    VIDEO_UPLOAD_TYPES,
    VideoAnalysis,
    VideoJobRequest,
    VideoJobView,
)
from dailydoco.storage import video_jobs

from .auth import require_reader_of, require_service
from .bodies import ascii_decimal, json_response, path_id, read_body

UPLOAD_FOLDER = "uploads"
OUTPUT_MEDIA_TYPES = {".jpg": "image/jpeg", ".mp4": "video/mp4"}


def new_job_id() -> str:
    return "vid_" + secrets.token_urlsafe(12)


def _is_file(path: Path) -> bool:
    """Path.is_file, but False for a name the system refuses to look up (a
    component over 255 bytes), where Path.is_file raises: that was a 500."""
    try:
        return path.is_file()
    except OSError:
        return False


def job_view(row: video_jobs.VideoJobRow) -> VideoJobView:
    result = msgspec.json.decode(row.result, type=VideoAnalysis) if row.result is not None else None
    return VideoJobView(job_id=row.job_id, user_id=row.user_id, status=row.status, progress=round(row.progress, 3),
                        attempts=row.attempts, result=result, error=row.error, created_at=row.created_at,
                        updated_at=row.updated_at)


class VideoJobs:
    def __init__(self, api, video_dir: str):
        self.api = api  # the EngineApi: principal, pool, shards, body reading
        self.folder = Path(video_dir).resolve()

    def _installed(self) -> None:
        if any(importlib.util.find_spec(m) is None for m in ("torch", "av")):
            raise p.ServiceUnavailable("video processing is not installed here (pip install -e '.[video]')")

    async def _require_user(self, user_id: str) -> None:
        if await self.api._shard_reads_of(user_id).user(user_id) is None:
            raise p.UnknownUser(f"user {user_id!r} does not exist")

    def _inside_folder(self, relative: str) -> Path:
        path = (self.folder / relative).resolve()
        if not path.is_relative_to(self.folder):
            raise p.InvalidRequest(f"path {relative!r} leaves the video folder",
                                   errors=[p.ProblemField(path="$.path", message="must stay inside the video folder")])
        if not _is_file(path):
            raise p.InvalidRequest(f"no video at {relative!r} in the video folder",
                                   errors=[p.ProblemField(path="$.path", message="no such file")])
        return path

    async def _receive_upload(self, request: Request, job_id: str) -> Path:
        declared = ascii_decimal(request.headers.get("content-length"))
        if declared is not None and declared > VIDEO_UPLOAD_BYTES_MAX:
            raise p.PayloadTooLarge(f"upload of {declared} bytes exceeds the {VIDEO_UPLOAD_BYTES_MAX}-byte limit")
        folder = self.folder / UPLOAD_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{job_id}.video"
        received = 0
        try:
            with open(path, "xb") as out:
                async for chunk in request.stream():
                    received += len(chunk)
                    if received > VIDEO_UPLOAD_BYTES_MAX:
                        raise p.PayloadTooLarge(f"upload exceeds the {VIDEO_UPLOAD_BYTES_MAX}-byte limit")
                    out.write(chunk)
                # Durable before the job that names it is: the 202 promises both.
                out.flush()
                os.fsync(out.fileno())
            if received == 0:
                raise p.InvalidRequest("the upload is empty")
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path

    async def create(self, request: Request) -> Response:
        """POST /v1/videos: JSON {user_id, path}, or the video itself with ?user_id=."""
        require_service(await self.api.principal(request))
        self._installed()
        job_id = new_job_id()
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media == "application/json":
            body = await read_body(request, VideoJobRequest)
            user_id, source = body.user_id, self._inside_folder(body.path)
            await self._require_user(user_id)
        elif media in VIDEO_UPLOAD_TYPES:
            query = dict(request.query_params)
            try:
                body = msgspec.convert({**query, "path": "upload"}, VideoJobRequest, strict=False)
            except msgspec.ValidationError as exc:
                raise p.InvalidRequest(f"query parameters: {p.validation_message(exc)}") from exc
            user_id = body.user_id
            await self._require_user(user_id)
            source = await self._receive_upload(request, job_id)
        else:
            raise p.UnsupportedMediaType(
                f"send application/json {{user_id, path}} or the video as one of {', '.join(VIDEO_UPLOAD_TYPES)}"
                f" (got {media or 'none'!r})")
        row = await video_jobs.enqueue(self.api.pool, job_id, user_id, str(source), body.variants)
        return json_response(job_view(row), 202, headers={"Location": f"/v1/videos/{job_id}"})

    async def _readable_job(self, request: Request) -> video_jobs.VideoJobRow:
        principal = await self.api.principal(request)
        job_id = path_id(request, "job_id")
        row = await video_jobs.get(self.api.pool, job_id)
        if row is None:
            raise p.NotFound(f"video job {job_id!r} does not exist")
        require_reader_of(principal, row.user_id)
        return row

    async def get(self, request: Request) -> Response:
        return json_response(job_view(await self._readable_job(request)))

    async def file(self, request: Request) -> Response:
        """GET /v1/videos/{job_id}/files/{path}: a thumbnail or variant the result names."""
        row = await self._readable_job(request)
        relative = request.path_params["path"]
        outputs = job_outputs(self.folder, row.job_id)
        path = None if "\x00" in relative else (outputs / relative).resolve()  # resolving a NUL raises
        media = OUTPUT_MEDIA_TYPES.get(path.suffix) if path is not None else None
        if row.status != "done" or media is None or not path.is_relative_to(outputs) or not _is_file(path):
            raise p.NotFound(f"video job {row.job_id!r} has no file {relative!r}")
        return FileResponse(path, media_type=media)

