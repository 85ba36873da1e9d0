"""GCRA rate limiting: one stored value (the theoretical arrival time) per key.

End users are limited cluster-wide in Redis (one atomic script); backends with
API keys are trusted and limited per replica in memory, which keeps a Redis
round trip off the hot path of server-to-server traffic.
"""

from __future__ import annotations

import time

import redis.asyncio as redis

# KEYS[1]: the key, KEYS[2..]: keys to read once admitted (a request's data,
# in the same round trip); ARGV: emission interval (µs), burst tolerance (µs).
# Returns {wait µs} or {0, {values...}}. Redis TIME, not the caller's clock,
# so every replica agrees.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local allow_at = tat - tolerance
if now < allow_at then
  return {allow_at - now}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1)
if #KEYS > 1 then
  return {0, redis.call('MGET', unpack(KEYS, 2))}
end
return {0}
"""


class LocalRateLimiter:
    """The same GCRA, in this process's memory."""

    def __init__(self):
        self._tat_us: dict[str, int] = {}

    def retry_after_s(self, key: str, per_second: int, burst: int) -> float:
        now = time.monotonic_ns() // 1_000
        interval = 1_000_000 // per_second
        tat = max(self._tat_us.get(key, now), now)
        allow_at = tat - interval * burst
        if now < allow_at:
            return (allow_at - now) / 1_000_000
        self._tat_us[key] = tat + interval
        return 0.0


class RateLimiter:
    def __init__(self, client: redis.Redis):
        self._script = client.register_script(_GCRA)

    async def retry_after_s(self, key: str, per_second: int, burst: int,
                            read_keys: tuple[str, ...] = ()) -> tuple[float, list[bytes | None]]:
        """(0, the values of `read_keys`) if the request may go now; else
        (seconds until it may, [])."""
        interval_us = 1_000_000 // per_second
        reply = await self._script(keys=["rl:" + key, *read_keys], args=[interval_us, interval_us * burst])
        return reply[0] / 1_000_000, (reply[1] if len(reply) > 1 else [])
