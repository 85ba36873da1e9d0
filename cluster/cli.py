"""`dailydoco`: run the engine, fill it with a demo network."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time

import msgspec

from .config import load_config


class _StopRequested(Exception):
    """SIGTERM or SIGINT arrived: leave the `with` block, which stops everything."""


def _raise_stop(*_) -> None:
    raise _StopRequested


def _already_stopping(*_) -> None:
    # A second Ctrl-C, or `timeout`, which signals the command and its process
    # group both: the stop under way is not interrupted halfway.
    print("dailydoco: already stopping", flush=True)


def _up(args: argparse.Namespace) -> int:
    from .demo import HTTP_TIMEOUT_S as DEMO_HTTP_TIMEOUT_S, run_demo
    from .embedded import StateDirInUse
    from .system import EngineSystem

    config = load_config()
    if args.port is not None:
        config = msgspec.structs.replace(config, http_port=args.port)
    # What this process logs (an embedded server restarted, say) reads as its own lines.
    logging.basicConfig(level=logging.WARNING, format="dailydoco: %(message)s")
    print(f"dailydoco: starting (state in {config.state_dir}) ...", flush=True)
    try:
        system = EngineSystem(config).start()
    except StateDirInUse as exc:
        print(f"dailydoco: {exc}", file=sys.stderr)
        return 1
    try:
        system.servers.watch()
        # After the start, since ray.init installs handlers of its own. The
        # handler raises rather than set an Event: it runs in the main thread,
        # which may be inside that Event's lock.
        signal.signal(signal.SIGTERM, _raise_stop)
        signal.signal(signal.SIGINT, _raise_stop)
        print(f"dailydoco: API listening on {system.url}", flush=True)
        print(f"  postgres {system.postgres_url}\n  redis    {system.redis_url}")
        for region, nats_url in system.region_nats_urls.items():
            home = " (home: events are published here)" if region == config.region else ""
            print(f"  region {region}{home}: nats {nats_url}, API and live gateway {system.region_urls[region]}")
        print(f"  service API key: {system.secrets.service_api_key}  (admin key and signing key in "
              f"{config.state_dir}/secrets.json)")
        print(f"  try: curl -H 'X-API-Key: {system.secrets.service_api_key}' {system.url}/readyz", flush=True)
        print(f"  live page: {system.url}/live, and <region's API>/live in each region  (sign in with a token "
              "from POST /v1/users/{id}/tokens)", flush=True)
        demo_stop = threading.Event()
        demo = threading.Thread(
            target=run_demo, daemon=True,
            args=(system.region_urls, system.secrets.service_api_key, args.demo_users, args.viral_coefficient,
                  args.demo_purchases_per_s, demo_stop))
        if args.demo:
            demo.start()
        try:
            while True:
                time.sleep(3600)
        except _StopRequested:
            signal.signal(signal.SIGTERM, _already_stopping)
            signal.signal(signal.SIGINT, _already_stopping)
            print("dailydoco: stopping ...", flush=True)
            # The demo's last request finishes before the API goes away.
            demo_stop.set()
            if demo.is_alive():
                demo.join(DEMO_HTTP_TIMEOUT_S)
    finally:
        system.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dailydoco", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the whole system (embedded servers unless DD_*_URL say otherwise)")
    up.add_argument("--port", type=int, default=None, help="HTTP port (default DD_HTTP_PORT or 8000)")
    up.add_argument("--demo", action="store_true", help="fill it with a simulated viral network and purchases")
    up.add_argument("--demo-users", type=int, default=2_000)
    up.add_argument("--viral-coefficient", type=float, default=1.3)
    up.add_argument("--demo-purchases-per-s", type=int, default=200)
    config = load_config()
    watch = sub.add_parser("watch", help="print a user's live events (commissions, referrals, balance changes)")
    watch.add_argument("user_id")
    watch.add_argument("--url", default=f"http://127.0.0.1:{config.http_port}", help="the API (default %(default)s)")
    watch.add_argument("--token", default=None, help="the user's token (default: issue one with the service key)")
    watch.add_argument("--state-dir", default=config.state_dir, help="where `up` keeps secrets.json")
    watch.add_argument("--encoding", choices=("json", "msgpack"), default="json")
    watch.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    watch.add_argument("--max-events", type=int, default=None, help="exit after this many events")
    video = sub.add_parser("video", help="video processing").add_subparsers(dest="video_command", required=True)
    analyze = video.add_parser("analyze", help="shots, chapters, keyframes, activity, quality, crops of a screen recording")
    analyze.add_argument("file")
    analyze.add_argument("--batch-frames", type=int, default=32)
    analyze.add_argument("--device", default=None, help="cpu or cuda (default: cuda where there is one)")
    analyze.add_argument("--backend", choices=("auto", "eager", "compile"), default="auto",
                         help="torch.compile where it can build (default), or eager")
    analyze.add_argument("--thumbnails", metavar="DIR", default=None, help="write a JPEG per keyframe into DIR")
    analyze.add_argument("--variants", metavar="DIR", default=None,
                         help="encode the 16:9, 9:16 and 1:1 crops that follow the saliency into DIR")
    analyze.add_argument("--json", action="store_true", help="print the full result as JSON")
    analyze.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.command == "video":
        from .video_cli import run_video

        return run_video(args)
    if args.command == "up":
        return _up(args)
    if args.command == "watch":
        from .watch import run_watch

        return run_watch(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
