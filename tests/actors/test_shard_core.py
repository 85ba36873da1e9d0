from dailydoco.actors.shard_core import ShardState
from dailydoco.storage.deltas import ShardDelta
from dailydoco.storage.snapshots import Snapshot


def _delta(user, micros):
    delta = ShardDelta()
    delta.add_balance(user, "USD", 0, micros)
    return delta


def test_fence_drops_what_the_snapshot_holds_and_repeats():
    state = ShardState([0], Snapshot(100, 105, frozenset({102})))
    assert not state.apply(99, _delta("a", 5))  # committed before the snapshot
    assert not state.apply(101, _delta("a", 5))  # visible in it
    assert state.apply(102, _delta("a", 5))  # in flight at the snapshot
    assert not state.apply(102, _delta("a", 5))  # a retried delivery
    assert state.apply(200, _delta("a", 7))
    assert state.balance_view("a").balances[0].pending_micros == 12
