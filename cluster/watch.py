"""`dailydoco watch USER`: print a user's live events as they arrive.

The gap-free way to follow a stream: read the balance over HTTP (it says
which offset it includes), then subscribe from that offset. A StreamReset
(the stream could not be resumed) reloads the balance and goes on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

import anyio
import httpx
import msgspec

from dailydoco.protocol.live import Publication, StreamReset, VideoProgress

from .live_client import LiveClient, LiveStreamEnded

HTTP_TIMEOUT_S = 10.0
TOKEN_TTL_S = 3600


def _service_key(state_dir: str) -> str:
    path = Path(state_dir) / "secrets.json"
    try:
        return json.loads(path.read_text())["service_api_key"]
    except (OSError, KeyError, ValueError) as exc:
        raise SystemExit(f"dailydoco watch: no service key in {path} (pass --token, or run where `up` ran)") from exc


async def watch(api_url: str, user_id: str, token: str | None, state_dir: str, encoding: str,
                out: TextIO = sys.stdout, max_events: int | None = None) -> int:
    async with httpx.AsyncClient(base_url=api_url, timeout=HTTP_TIMEOUT_S) as http:
        async def issue_token() -> str:
            if token is not None:
                return token
            r = await http.post(f"/v1/users/{user_id}/tokens", json={"ttl_s": TOKEN_TTL_S},
                                headers={"X-API-Key": _service_key(state_dir)})
            if r.status_code != 201:
                raise SystemExit(f"dailydoco watch: cannot get a token for {user_id!r}: {r.status_code} {r.text}")
            return r.json()["token"]

        bearer = await issue_token()

        async def reload() -> dict:
            r = await http.get(f"/v1/users/{user_id}/balance", headers={"Authorization": f"Bearer {bearer}"})
            if r.status_code != 200:
                raise SystemExit(f"dailydoco watch: {r.status_code} {r.text}")
            balance = r.json()
            print(f"balance {json.dumps(balance['balances'])}  (stream offset {balance['stream']['offset']})",
                  file=out, flush=True)
            return balance

        balance = await reload()

        async def tokens() -> str:
            nonlocal bearer
            bearer = await issue_token()
            return bearer

        ws_url = api_url.replace("http://", "ws://", 1).rstrip("/") + "/v1/live"
        client = LiveClient(ws_url, tokens, encoding=encoding,  # type: ignore[arg-type]
                            offset=balance["stream"]["offset"], epoch=balance["stream"]["epoch"])
        printed = 0
        try:
            async for item in client.events():
                if isinstance(item, VideoProgress):
                    print(f"video job {item.job_id}: {item.status} {item.progress:.0%}", file=out, flush=True)
                    continue
                if isinstance(item, StreamReset):
                    print("stream could not be resumed: reloading", file=out, flush=True)
                    balance = await reload()
                    continue
                assert isinstance(item, Publication)
                event = msgspec.to_builtins(item.event)
                kind = event.pop("type")
                print(f"{item.offset:>8}  {item.at:%H:%M:%S.%f}  {kind:<20} {json.dumps(event)}", file=out, flush=True)
                printed += 1
                if max_events is not None and printed >= max_events:
                    return 0
        except LiveStreamEnded as ended:
            print(f"dailydoco watch: {ended}", file=sys.stderr)
            return 1
    return 0


def run_watch(args) -> int:
    return anyio.run(watch, args.url, args.user_id, args.token, args.state_dir, args.encoding, sys.stdout,
                     args.max_events, backend=args.backend)
