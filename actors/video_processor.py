"""VideoProcessor: runs queued video analysis jobs, one at a time.

Guarantees: a job the API acknowledged (202) is in Postgres and ends `done`
or `failed`. A processor that dies mid-job leaves it `running`; the
supervisor starts a new processor, which queues it again (a video that
stops processors three times fails instead). Bad input fails that job with
the reason and the processor goes on with the next.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
from pathlib import Path

import asyncpg
import msgspec
import nats
import ray

from dailydoco.cluster import nats_io
from dailydoco.cluster.config import EngineConfig
from dailydoco.cluster.process_log import log_to_stderr
from dailydoco.protocol.live import VideoProgress, video_subject
from dailydoco.storage import video_jobs
from dailydoco.storage.pool import DATABASE_ERRORS, open_pool

from .batching import wait_until_set
from .watch import LIVENESS_GROUPS, Watched

PROGRESS_STEP = 0.05  # progress is written at most every 5 % of a video
QUEUE_IDLE_POLL_S = 1.0  # NOTIFY wakes the processor; this catches a notification lost while it reconnects
RETRY_BACKOFF_S = 1.0  # Postgres unreachable: wait and try again
# How long a thread keeps the GIL when another wants it (Python's default:
# 5 ms). An analysis takes and releases it around every kernel and every
# decoded batch; beside the step's compiler, which holds it for most of a
# minute (kernels/analyze.py: _build_graph), it waited up to 5 ms each
# time. A one-off probe on 2 cores, a 12 s recording analysed eagerly again and
# again while the step compiled: the slowest analysis 36.6 s at 5 ms, 11.5 s
# at 0.5 ms; without the compiler, 2.1 s and 1.6 s.
ANALYSIS_GIL_SWITCH_INTERVAL_S = 0.0005

_PROGRESS_ENCODER = msgspec.msgpack.Encoder()
log = logging.getLogger("dailydoco.video")


JOB_OUTPUTS_FOLDER = "outputs"  # under the video folder: outputs/<job_id>/{thumbnails,variants}/


def job_outputs(video_dir: str | Path, job_id: str) -> Path:
    return Path(video_dir).resolve() / JOB_OUTPUTS_FOLDER / job_id


class VideoJobRunner:
    def __init__(self, pool: asyncpg.Pool, video_dir: str | Path, device: str | None = None,
                 nc: nats.NATS | None = None):
        self.pool = pool
        self.video_dir = video_dir
        self.device = device
        self.nc = nc  # progress frames for the user's live sockets; None: none sent
        self.jobs_done = 0
        self._wake = asyncio.Event()

    async def _announce(self, job: video_jobs.VideoJobRow, status: str, progress: float) -> None:
        """Best effort: the job's state is in Postgres whatever happens here."""
        if self.nc is None or not self.nc.is_connected:
            return
        frame = VideoProgress(job_id=job.job_id, user_id=job.user_id, status=status, progress=round(progress, 3))
        try:
            await self.nc.publish(video_subject(job.user_id), _PROGRESS_ENCODER.encode(frame))
        except nats.errors.Error as exc:
            log.warning("video progress not sent: %s", exc)

    async def _progressed(self, job: video_jobs.VideoJobRow, share: float) -> None:
        await video_jobs.set_progress(self.pool, job.job_id, share)
        await self._announce(job, "running", share)

    def wake(self, *_args) -> None:
        self._wake.set()

    async def run_one(self) -> bool:
        """Claim and run the oldest queued job; False when there was none."""
        from dailydoco.kernels.analyze import analyze
        from dailydoco.kernels.decode import VideoError

        job = await video_jobs.claim_next(self.pool)
        if job is None:
            return False
        loop = asyncio.get_running_loop()
        reported = [0.0]
        # Each report is a write and a publish: two in flight passed each
        # other, and the owner's socket saw progress go back (one CI run of
        # session 46). The lock takes them in the order the analysis made
        # them (its waiters are served in turn), and the end of the job after them.
        reports = asyncio.Lock()

        async def report(share: float) -> None:
            async with reports:
                await self._progressed(job, share)

        def progress(done: int, expected: int) -> None:  # on the analysis thread
            share = min(1.0, done / expected)
            if share - reported[0] >= PROGRESS_STEP:
                reported[0] = share
                asyncio.run_coroutine_threadsafe(report(share), loop)

        await self._announce(job, "running", 0.0)
        outputs = job_outputs(self.video_dir, job.job_id)
        shutil.rmtree(outputs, ignore_errors=True)  # a retried job starts clean
        try:
            result = await asyncio.to_thread(
                analyze, job.source_path, device=self.device, progress=progress, thumbnails_dir=outputs / "thumbnails",
                variants_dir=outputs / "variants" if job.variants else None,
                wait_for_compile=False)  # a job's user waits: never a minute for a compiler
            result = _relative_outputs(result, outputs)
        except VideoError as exc:
            async with reports:
                await video_jobs.fail(self.pool, job.job_id, str(exc))
                await self._announce(job, "failed", reported[0])
        except Exception as exc:  # noqa: BLE001 - the job fails, the processor goes on
            log.exception("video job %s failed", job.job_id)
            async with reports:
                await video_jobs.fail(self.pool, job.job_id, f"internal error: {type(exc).__name__}")
                await self._announce(job, "failed", reported[0])
        else:
            async with reports:
                await video_jobs.finish(self.pool, job.job_id, msgspec.json.encode(result).decode())
                await self._announce(job, "done", 1.0)
        self.jobs_done += 1
        return True

    async def run(self) -> None:
        while True:
            try:
                if await self.run_one():
                    continue
            except DATABASE_ERRORS as exc:
                log.warning("video queue unreachable (%s); retrying", exc)
                await asyncio.sleep(RETRY_BACKOFF_S)
                continue
            self._wake.clear()
            await wait_until_set(self._wake, QUEUE_IDLE_POLL_S)


def _relative_outputs(result, outputs: Path):
    """Thumbnail and variant paths as the API serves them, relative to the
    job's outputs: the server's own folders are nobody's business."""
    def relative(path: str | None) -> str | None:
        return None if path is None else Path(path).relative_to(outputs).as_posix()

    return msgspec.structs.replace(
        result,
        keyframes=[msgspec.structs.replace(kf, thumbnail=relative(kf.thumbnail)) for kf in result.keyframes],
        variants=[msgspec.structs.replace(v, path=relative(v.path)) for v in result.variants])


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=4, concurrency_groups=LIVENESS_GROUPS)
class VideoProcessorActor(Watched):
    """The Ray shell, watched by the supervisor; created with num_gpus=1 where
    the cluster has a GPU, so the analysis runs on it."""

    def __init__(self, index: int, config: EngineConfig, postgres_url: str, nats_url: str):
        log_to_stderr()
        self.keep_loop_ticking()
        sys.setswitchinterval(ANALYSIS_GIL_SWITCH_INTERVAL_S)  # this process analyses, nothing else
        self.video_dir = config.video_dir
        self.postgres_url = postgres_url
        self.nats_url = nats_url
        self.runner: VideoJobRunner | None = None
        self._task: asyncio.Task | None = None
        self._listening: asyncio.Task | None = None

    async def ready(self) -> bool:
        if self._task is None:
            pool = await open_pool(self.postgres_url, min_size=1, max_size=2)
            requeued, failed = await video_jobs.requeue_abandoned(pool)
            if requeued or failed:
                log.warning("video jobs left running by a stopped processor: %d queued again, %d failed",
                            requeued, failed)
            self.runner = VideoJobRunner(pool, self.video_dir, "cuda" if ray.get_gpu_ids() else "cpu")
            asyncio.get_running_loop().create_task(self._connect_nats())
            self._listening = asyncio.get_running_loop().create_task(self._listen())
            self._task = asyncio.get_running_loop().create_task(self.runner.run())
        return True

    async def _listen(self) -> None:
        """LISTEN for new jobs on a connection of its own, connected again
        whenever it is lost (a database restart, a cut connection); the
        queue's poll covers the gap."""
        while True:
            listener = None
            try:
                listener = await asyncpg.connect(self.postgres_url)
                lost = asyncio.Event()
                listener.add_termination_listener(lambda _: lost.set())
                await listener.add_listener(video_jobs.VIDEO_JOBS_NOTIFY_CHANNEL, self.runner.wake)
                self.runner.wake()  # a job queued while no one listened
                await lost.wait()
                log.warning("the video queue's LISTEN connection was lost; connecting again")
            except DATABASE_ERRORS as exc:
                log.warning("the video queue's LISTEN connection failed (%s); retrying", exc)
            finally:
                if listener is not None and not listener.is_closed():
                    listener.terminate()
            await asyncio.sleep(RETRY_BACKOFF_S)

    async def _connect_nats(self) -> None:
        # In the background: jobs run while NATS is down, only without progress frames.
        self.runner.nc = await nats_io.connect(self.nats_url, name="dailydoco-video")

    def jobs_done(self) -> int:
        return self.runner.jobs_done if self.runner else 0

    def raise_if_broken(self) -> None:
        for task, what in ((self._task, "video job loop"), (self._listening, "video queue's LISTEN loop")):
            if task is not None and task.done():
                raise RuntimeError(f"{what} ended") from task.exception()
