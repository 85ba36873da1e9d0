"""The API's reads of shard memory: a user, their network statistics, and
their balance where its view in Redis had none to give.

A shard that does not answer is read from the ledger instead: the user's
shard rebuilt from Postgres as a restart would rebuild it
(recovery.user_state_from_ledger), exact, and as fresh as the ledger, which
the shard's memory trails.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Literal, TypeVar

import asyncpg

from dailydoco.actors.batching import MicroBatcher, start_shared_task
from dailydoco.actors.recovery import user_state_from_ledger
from dailydoco.actors.refs import ActorRef
from dailydoco.protocol import BalanceView, NetworkStats, ServiceUnavailable, UserView

# Concurrent balance reads of one shard share a Ray call: on this hardware a
# Ray call costs the replica more CPU than the rest of a read.
BALANCE_READS_PER_CALL_MAX = 1_000
SHARD_READ_CALLS_IN_FLIGHT_MAX = 2
# A shard answers a read from memory in a millisecond or two (a balance
# read's p99 through a Ray call was 29 to 104 ms in full benchmark runs).
# One that has not within this is lost with its host, restarting or
# stalled, and its callers would wait for it up to ACTOR_RETRY_DEADLINE_S;
# with the Ray head lost too, no shard is made again before a new head is up.
SHARD_ANSWER_WAIT_S = 0.5

Source = Literal["shard", "ledger"]
T = TypeVar("T")
log = logging.getLogger("dailydoco.shard_reads")


class ShardReads:
    """Reads of one shard. Once a read has waited SHARD_ANSWER_WAIT_S for
    the shard in vain, the shard is silent: that read and every one after
    it are answered from the ledger at once, until a call to the shard
    returns again. Meanwhile it is asked, one call at a time, whether it is
    ready: a shard made again answers that once it has rebuilt its memory,
    as it answers a read."""

    def __init__(self, shard: ActorRef, pool: Callable[[], asyncpg.Pool]):
        self._shard = shard
        self._pool = pool  # the replica's, opened after this
        self._balances = MicroBatcher(self._balances_of, BALANCE_READS_PER_CALL_MAX, SHARD_READ_CALLS_IN_FLIGHT_MAX)
        self._silent = False
        self._probe: asyncio.Task | None = None

    async def user(self, user_id: str) -> UserView | None:
        view, _ = await self._shard_or_ledger(
            lambda: self._call("get_user", user_id), user_id, network=False,
            from_ledger=lambda state: state.user_view(user_id))
        return view

    async def network_stats(self, user_id: str) -> NetworkStats | None:
        stats, _ = await self._shard_or_ledger(
            lambda: self._call("get_network_stats", user_id), user_id, network=True,
            from_ledger=lambda state: state.network_stats(user_id))
        return stats

    async def balance(self, user_id: str) -> tuple[BalanceView | None, Source]:
        """The user's balance, and where it came from."""
        async def from_shard() -> BalanceView | None:
            [view] = await self._balances.submit([user_id])
            return view

        return await self._shard_or_ledger(from_shard, user_id, network=False,
                                           from_ledger=lambda state: state.balance_view(user_id))

    async def _shard_or_ledger(self, from_shard: Callable[[], Awaitable[T | None]], user_id: str, network: bool,
                               from_ledger: Callable[..., T]) -> tuple[T | None, Source]:
        """`from_shard`'s answer, or from the ledger's state of the user's
        shard (None, as from the shard, where there is no such user)."""
        if not self._silent:
            try:
                return await asyncio.wait_for(from_shard(), SHARD_ANSWER_WAIT_S), "shard"
            except (asyncio.TimeoutError, ServiceUnavailable):
                if not self._silent:
                    log.warning("%s did not answer a read within %.1f s; its reads go to the ledger until it does",
                                self._shard.name, SHARD_ANSWER_WAIT_S)
                self._silent = True
        if self._probe is None or self._probe.done():
            self._probe = start_shared_task(self._call("ready"))
            # Its outcome is only whether it returns (see _call); read here, not logged as lost.
            self._probe.add_done_callback(lambda probe: probe.cancelled() or probe.exception())
        state = await user_state_from_ledger(self._pool(), user_id, network)
        return (from_ledger(state) if user_id in state.users else None), "ledger"

    async def _call(self, method: str, *args):
        result = await self._shard.call(method, *args)
        if self._silent:
            log.info("%s answers again; its reads go to it", self._shard.name)
            self._silent = False
        return result

    async def _balances_of(self, user_ids: list[str]) -> list[BalanceView | None]:
        return await self._call("get_balances", user_ids)
