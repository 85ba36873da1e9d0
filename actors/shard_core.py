"""A shard's in-memory state, and the deltas that change it.

Everything here is plain Python, so the seeded simulation drives the very code
the Ray actor runs. State changes only through `ShardDelta`s, each tagged with
the xid of the Postgres transaction that made it durable; `ShardState.apply`
fences them against the snapshot the state was rebuilt at (see
storage/snapshots.py), so a delta reaches memory exactly once.
"""

from __future__ import annotations

from collections import deque

from dailydoco.protocol import (
    LEVELS_MAX,
    BalanceView,
    CurrencyBalance,
    LevelRevenue,
    NetworkStats,
    StreamPosition,
    UserView,
)
from dailydoco.storage.deltas import APPROVED, PAID, PENDING, ShardDelta, UserRecord
from dailydoco.storage.snapshots import Snapshot

# Recent xids applied since recovery, to drop a retried delivery. A retry comes
# within seconds; this many deltas cover minutes at full write rate.
APPLIED_XIDS_REMEMBERED_MAX = 200_000


class UserStats:
    __slots__ = ("direct_referrals", "size_by_level", "revenue_by_level", "balances")

    def __init__(self):
        self.direct_referrals = 0
        self.size_by_level = [0] * LEVELS_MAX
        self.revenue_by_level: dict[str, list[int]] = {}
        self.balances: dict[str, list[int]] = {}  # currency -> [pending, approved, paid]

    def to_wire(self) -> list:
        return [self.direct_referrals, self.size_by_level, self.revenue_by_level, self.balances]

    @classmethod
    def from_wire(cls, wire: list) -> "UserStats":
        stats = cls()
        stats.direct_referrals, stats.size_by_level, stats.revenue_by_level, stats.balances = wire
        return stats


class ShardState:
    """Users, network statistics and balances of a set of virtual shards."""

    def __init__(self, vshards: list[int], recovered_at: Snapshot, stream_epoch: str = ""):
        self.vshards = frozenset(vshards)
        self.recovered_at = recovered_at
        self.stream_epoch = stream_epoch
        self.users: dict[str, UserRecord] = {}
        self.stats: dict[str, UserStats] = {}
        # user -> the highest live-event offset with every event up to it
        # applied. Two writers' deliveries can arrive out of order; a range
        # that comes early waits in _early_ranges until the gap closes, so a
        # balance never claims an offset whose change it lacks.
        self.stream_offsets: dict[str, int] = {}
        self._early_ranges: dict[str, dict[int, int]] = {}
        self._applied_xids: set[int] = set()
        self._applied_order: deque[int] = deque()

    def stats_of(self, user_id: str) -> UserStats:
        stats = self.stats.get(user_id)
        if stats is None:
            stats = self.stats[user_id] = UserStats()
        return stats

    def apply(self, xid: int, delta: ShardDelta) -> bool:
        """Apply a delta made durable by transaction `xid`, at most once.

        Returns False when the state already holds it: the state was rebuilt
        at a snapshot that sees `xid`, or this xid was applied before.
        """
        if self.recovered_at.sees(xid) or xid in self._applied_xids:
            return False
        self._applied_xids.add(xid)
        self._applied_order.append(xid)
        if len(self._applied_order) > APPLIED_XIDS_REMEMBERED_MAX:
            self._applied_xids.discard(self._applied_order.popleft())
        self.apply_unfenced(delta)
        return True

    def apply_unfenced(self, delta: ShardDelta) -> None:
        """Apply without the xid fence: recovery replays rows it selected itself."""
        for record in delta.users:
            self.users[record.user_id] = record
        for ancestor, level, members in delta.joins:
            stats = self.stats_of(ancestor)
            stats.size_by_level[level - 1] += members
            if level == 1:
                stats.direct_referrals += members
        for (user_id, currency), levels in delta.revenue.items():
            have = self.stats_of(user_id).revenue_by_level.setdefault(currency, [0] * LEVELS_MAX)
            for i, d in enumerate(levels):
                have[i] += d
        for (user_id, currency), buckets in delta.balances.items():
            have = self.stats_of(user_id).balances.setdefault(currency, [0, 0, 0])
            have[PENDING] += buckets[PENDING]
            have[APPROVED] += buckets[APPROVED]
            have[PAID] += buckets[PAID]
        for user_id, (first_seq, last_seq) in delta.event_seqs.items():
            self._advance_stream(user_id, first_seq, last_seq)

    def _advance_stream(self, user_id: str, first_seq: int, last_seq: int) -> None:
        offset = self.stream_offsets.get(user_id, 0)
        if last_seq <= offset:
            return
        if first_seq != offset + 1:
            self._early_ranges.setdefault(user_id, {})[first_seq] = last_seq
            return
        offset = last_seq
        early = self._early_ranges.get(user_id)
        if early is not None:
            while offset + 1 in early:
                offset = early.pop(offset + 1)
            if not early:
                del self._early_ranges[user_id]
        self.stream_offsets[user_id] = offset

    # --- views ---------------------------------------------------------------

    def balance_view(self, user_id: str) -> BalanceView:
        stats = self.stats.get(user_id)
        return BalanceView(user_id=user_id, balances=_currency_balances(stats),
                           stream=StreamPosition(epoch=self.stream_epoch, offset=self.stream_offsets.get(user_id, 0)))

    def network_stats(self, user_id: str) -> NetworkStats:
        stats = self.stats.get(user_id) or UserStats()
        size = list(stats.size_by_level)
        depth = max((i + 1 for i, n in enumerate(size) if n), default=0)
        could_refer = sum(size[:-1])
        return NetworkStats(
            user_id=user_id,
            direct_referrals=stats.direct_referrals,
            network_size=sum(size),
            size_by_level=size,
            revenue_by_level=[
                LevelRevenue(currency=c, revenue_micros_by_level=list(v)) for c, v in sorted(stats.revenue_by_level.items())
            ],
            depth=depth,
            commission_earned=_currency_balances(stats),
            viral_coefficient=round(sum(size[1:]) / could_refer, 4) if could_refer else 0.0,
        )

    def user_view(self, user_id: str) -> UserView | None:
        record = self.users.get(user_id)
        if record is None:
            return None
        return user_view(record)


def user_view(record: UserRecord) -> UserView:
    return UserView(
        user_id=record.user_id,
        referral_code=record.referral_code,
        referrer_id=record.referrer_id,
        upline=list(record.upline),
        created_at=record.created_at,
    )


def _currency_balances(stats: UserStats | None) -> list[CurrencyBalance]:
    if stats is None:
        return []
    return [
        CurrencyBalance(currency=c, pending_micros=b[PENDING], approved_micros=b[APPROVED], paid_micros=b[PAID],
                        earned_micros=b[PENDING] + b[APPROVED] + b[PAID])
        for c, b in sorted(stats.balances.items())
    ]
