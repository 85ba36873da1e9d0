"""What one durable write changes in the shards' memory, routed per shard.

The ledger builds these inside the same code path that writes the rows, so
memory and Postgres cannot disagree about what a write meant.
"""

from __future__ import annotations

import datetime as dt
from typing import Callable, Hashable

from dailydoco.protocol import LEVELS_MAX

# Balance buckets. 'reversed' clawbacks count as paid (netted in a payout);
# 'refunded' entries drop out of every bucket (they net to zero).
PENDING, APPROVED, PAID = 0, 1, 2
BUCKET_OF_STATUS: dict[str, int | None] = {
    "pending": PENDING,
    "approved": APPROVED,
    "paid": PAID,
    "reversed": PAID,
    "refunded": None,
}


class UserRecord:
    __slots__ = ("user_id", "referral_code", "referrer_id", "upline", "created_at", "body_hash")

    def __init__(self, user_id, referral_code, referrer_id, upline, created_at, body_hash):
        self.user_id: str = user_id
        self.referral_code: str = referral_code
        self.referrer_id: str | None = referrer_id
        self.upline: tuple[str, ...] = tuple(upline)
        self.created_at: dt.datetime = created_at
        self.body_hash: bytes = body_hash

    def __reduce__(self):
        return (UserRecord, tuple(getattr(self, s) for s in self.__slots__))


class ShardDelta:
    """What one durable write changes in one shard's memory.

    balances: (user, currency) -> [d_pending, d_approved, d_paid]
    revenue:  (user, currency) -> deltas of network revenue per level
    joins:    (ancestor, level, members): new members at that level
    users:    new user records owned by this shard
    event_seqs: user -> (first, last) live-event offsets this write gave out
    """

    __slots__ = ("balances", "revenue", "joins", "users", "event_seqs")

    def __init__(self):
        self.balances: dict[tuple[str, str], list[int]] = {}
        self.revenue: dict[tuple[str, str], list[int]] = {}
        self.joins: list[tuple[str, int, int]] = []
        self.users: list[UserRecord] = []
        self.event_seqs: dict[str, tuple[int, int]] = {}

    def add_balance(self, user_id: str, currency: str, bucket: int | None, delta_micros: int,
                    summed: bool = False) -> None:
        """`summed`: the delta sums entries that may cancel out; the currency
        still appears in the user's balances, as it would entry by entry."""
        if bucket is None or (delta_micros == 0 and not summed):
            return
        key = (user_id, currency)
        buckets = self.balances.get(key)
        if buckets is None:
            buckets = self.balances[key] = [0, 0, 0]
        buckets[bucket] += delta_micros

    def move_balance(self, user_id: str, currency: str, from_status: str, to_status: str, micros: int,
                     summed: bool = False) -> None:
        self.add_balance(user_id, currency, BUCKET_OF_STATUS[from_status], -micros, summed)
        self.add_balance(user_id, currency, BUCKET_OF_STATUS[to_status], micros, summed)

    def add_revenue(self, user_id: str, currency: str, level: int, delta_micros: int) -> None:
        key = (user_id, currency)
        levels = self.revenue.get(key)
        if levels is None:
            levels = self.revenue[key] = [0] * LEVELS_MAX
        levels[level - 1] += delta_micros

    def add_revenue_levels(self, user_id: str, currency: str, deltas_micros: list[int]) -> None:
        key = (user_id, currency)
        levels = self.revenue.get(key)
        if levels is None:
            self.revenue[key] = list(deltas_micros)
        else:
            for i, d in enumerate(deltas_micros):
                levels[i] += d

    def users_with_new_balance_view(self) -> set[str]:
        """Whose GET /v1/users/{id}/balance answer this delta changes
        (see storage/balance_views.py): new users, balances, stream offsets."""
        return {r.user_id for r in self.users} | {user_id for user_id, _ in self.balances} | self.event_seqs.keys()

    def is_empty(self) -> bool:
        return not (self.balances or self.revenue or self.joins or self.users or self.event_seqs)

    def __reduce__(self):
        return (_rebuild_delta, (self.balances, self.revenue, self.joins, self.users, self.event_seqs))


def _rebuild_delta(balances, revenue, joins, users, event_seqs):
    delta = ShardDelta()
    delta.balances, delta.revenue, delta.joins, delta.users, delta.event_seqs = (
        balances, revenue, joins, users, event_seqs)
    return delta


class DeltaSet:
    """ShardDeltas keyed by a route of the user id (shard actor, or vshard)."""

    __slots__ = ("_route", "_route_of_user", "by_route")

    def __init__(self, route: Callable[[str], Hashable]):
        self._route = route
        self._route_of_user: dict[str, Hashable] = {}
        self.by_route: dict[Hashable, ShardDelta] = {}

    def for_user(self, user_id: str) -> ShardDelta:
        key = self._route_of_user.get(user_id)
        if key is None:
            key = self._route_of_user[user_id] = self._route(user_id)
        delta = self.by_route.get(key)
        if delta is None:
            delta = self.by_route[key] = ShardDelta()
        return delta
