"""The API's reads of shard memory: a user, their network statistics, and
their balance where its view in Redis had none to give.

A shard that does not answer is read from the ledger instead: the user's
shard rebuilt from Postgres as a restart would rebuild it
(recovery.user_state_from_ledger), exact, and as fresh as the ledger, which
the shard's memory trails.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Literal, TypeVar

import asyncpg

from dailydoco.actors.batching import MicroBatcher
from dailydoco.actors.recovery import user_state_from_ledger
from dailydoco.actors.refs import SilenceWatch
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


class ShardReads:
    """Reads of one shard. Once a read has waited SHARD_ANSWER_WAIT_S for
    the shard in vain, the shard is silent: that read and every one after
    it are answered from the ledger at once, until a call to the shard
    returns again (SilenceWatch: meanwhile it is asked whether it is ready,
    which a shard made again answers once it has rebuilt its memory). The
    replica shares the watch with the shard's registrations (RingWrites):
    a shard silent to one is silent to both."""

    def __init__(self, shard: SilenceWatch, pool: Callable[[], asyncpg.Pool]):
        self._shard = shard
        self._pool = pool  # the replica's, opened after this
        self._balances = MicroBatcher(self._balances_of, BALANCE_READS_PER_CALL_MAX, SHARD_READ_CALLS_IN_FLIGHT_MAX)

    async def user(self, user_id: str) -> UserView | None:
        view, _ = await self._shard_or_ledger(
            lambda: self._shard.call("get_user", user_id), user_id, network=False,
            from_ledger=lambda state: state.user_view(user_id))
        return view

    async def network_stats(self, user_id: str) -> NetworkStats | None:
        stats, _ = await self._shard_or_ledger(
            lambda: self._shard.call("get_network_stats", user_id), user_id, network=True,
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
        if not self._shard.silent:
            try:
                return await asyncio.wait_for(from_shard(), SHARD_ANSWER_WAIT_S), "shard"
            except (asyncio.TimeoutError, ServiceUnavailable):
                self._shard.fell_silent(f"a read within {SHARD_ANSWER_WAIT_S} s")
        self._shard.probe()
        state = await user_state_from_ledger(self._pool(), user_id, network)
        return (from_ledger(state) if user_id in state.users else None), "ledger"

    async def _balances_of(self, user_ids: list[str]) -> list[BalanceView | None]:
        return await self._shard.call("get_balances", user_ids)
