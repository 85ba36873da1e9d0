"""Postgres MVCC snapshots as values: the fence between memory and the ledger.

Every durable write records the id of the Postgres transaction that made it
(xid8). A shard rebuilt from the database at snapshot S already contains every
write visible in S, so it drops any later delivery of those writes: each write
reaches memory exactly once, whatever the order of crash, recovery and retry.
"""

from __future__ import annotations

import msgspec


class Snapshot(msgspec.Struct, frozen=True):
    """`pg_current_snapshot()` parsed: xmin:xmax:xip_list."""

    xmin: int
    xmax: int
    in_progress: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> "Snapshot":
        xmin, xmax, xip = text.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x))

    @classmethod
    def empty(cls) -> "Snapshot":
        """The snapshot before any write: nothing is visible in it."""
        return cls(1, 1, frozenset())

    def sees(self, xid: int) -> bool:
        """Same rule as Postgres's pg_visible_in_snapshot for committed xids."""
        return xid < self.xmin or (xid < self.xmax and xid not in self.in_progress)

    def text(self) -> str:
        return f"{self.xmin}:{self.xmax}:{','.join(str(x) for x in sorted(self.in_progress))}"
